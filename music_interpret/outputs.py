"""Which folders a stage may write and replace, and the locks that keep two runs apart.

The rule (never delete what we did not create): a stage publishes into its output
folder only when that folder does not exist or carries the stage's own completion
marker (``.stage.json`` naming the same stage); it resumes only from a
``<output>.partial`` folder that carries the engine's partial marker. Outputs may
not overlap the model or data folders, the run folder, or another stage's output
(an output nested inside an *earlier* stage's output is derived data and allowed,
as the ``preprocess`` statistics inside the store are). Every output folder a run
writes is locked for the run, wherever it lies: the lock files live in one folder
of the system's temporary directory, named by a hash of the output's absolute path
(a lock beside the output would create the folders above it before the stage that
owns them has published them).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import UserError
from .jsonio import write_json_atomic

MARKER = ".stage.json"
PARTIAL_MARKER = ".fingerprint"
PARTIAL_SUFFIX = ".partial"


def partial_dir(out_dir: Path) -> Path:
    """The folder a stage writes into before it is published as ``out_dir``."""
    return out_dir.with_name(out_dir.name + PARTIAL_SUFFIX)


def read_marker(out_dir: Path) -> dict[str, Any] | None:
    """The completion marker of a published stage output, or None."""
    try:
        marker = json.loads((out_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def read_partial_marker(work_dir: Path) -> tuple[str, str | None] | None:
    """(fingerprint, stage) of a partial folder's marker (stage None in older ones), or None."""
    try:
        lines = (work_dir / PARTIAL_MARKER).read_text(encoding="utf-8").split()
    except (OSError, ValueError):
        return None
    if not lines:
        return None
    return lines[0], (lines[1] if len(lines) > 1 else None)


def write_partial_marker(work_dir: Path, fp: str, stage: str) -> None:
    (work_dir / PARTIAL_MARKER).write_text(f"{fp}\n{stage}\n", encoding="utf-8")


def _inside(path: Path, folder: Path) -> bool:
    """True when ``path`` lies strictly inside ``folder``."""
    return path != folder and folder in path.parents


def ownership_problem(stage: str, out_dir: Path) -> str | None:
    """Why ``stage`` may not replace ``out_dir`` or resume from its partial folder (None: it may)."""
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            return f"{out_dir} exists and is not a folder; refusing to replace it"
        marker = read_marker(out_dir)
        if marker is None:
            return (f"{out_dir} exists and was not written by stage {stage!r} (no {MARKER}); "
                    "refusing to replace it: choose another output folder or move it away")
        if marker.get("stage") != stage:
            return (f"{out_dir} holds the output of stage {marker.get('stage')!r}, not {stage!r}; "
                    "refusing to replace it")
    work = partial_dir(out_dir)
    if work.exists() or work.is_symlink():
        partial = read_partial_marker(work) if work.is_dir() else None
        if partial is None or partial[1] not in (None, stage):
            return (f"{work} exists and is not a partial output of stage {stage!r} "
                    f"(no {PARTIAL_MARKER} of it); refusing to replace it")
    return None


def overlap_problems(
    outputs: dict[str, Path],
    order: Sequence[str],
    checked: Sequence[str],
    inputs: dict[str, Path],
    run_dir: Path,
) -> list[str]:
    """Outputs of the ``checked`` stages that overlap an input, the run folder or each other.

    ``outputs``: resolved output folder of every stage of the pipeline; ``order``: the
    pipeline's stage order; ``inputs``: name (``model.path``) -> resolved folder.
    """
    problems = []
    for name in checked:
        out = outputs.get(name)
        if out is None:
            continue
        for key, inp in inputs.items():
            if out == inp or _inside(inp, out):
                problems.append(f"{out} is or contains the input {key} ({inp})")
            elif _inside(out, inp):
                problems.append(f"{out} lies inside the input {key} ({inp})")
        if out == run_dir or _inside(run_dir, out):
            problems.append(f"{out} is or contains the run folder {run_dir}")
        for other, path in outputs.items():
            if other == name:
                continue
            if path == out:
                problems.append(f"{out} is also the output of stage {other!r}")
            elif _inside(path, out) and order.index(other) < order.index(name):
                problems.append(f"{out} contains the output of the earlier stage {other!r} ({path})")
            elif _inside(out, path) and order.index(other) > order.index(name):
                problems.append(f"{out} lies inside the output of the later stage {other!r} ({path})")
    return problems


@contextlib.contextmanager
def folder_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a lock file) or fail at once naming ``what``."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{what}: another run is writing it; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def lock_folder() -> Path:
    """Where the output locks of this user live."""
    return Path(tempfile.gettempdir()) / f"music-interpret-locks-{os.getuid()}"


def output_lock(out_dir: Path) -> contextlib.AbstractContextManager[None]:
    """Lock of one stage output folder (a file named by the hash of its absolute path)."""
    key = hashlib.sha256(os.fsencode(out_dir.resolve())).hexdigest()[:32]
    return folder_lock(lock_folder() / f"{key}.lock", str(out_dir))


def run_lock(run_dir: Path) -> contextlib.AbstractContextManager[None]:
    """Lock of a run folder (``<run>/.lock``)."""
    return folder_lock(run_dir / ".lock", str(run_dir))


def prepare_work_dir(out_dir: Path, fp: str, stage: str, force: bool) -> bool:
    """Reuse the partial folder of ``out_dir`` if it has the same fingerprint (resume);
    start afresh otherwise. Only a partial folder of this stage (carrying its marker)
    is ever removed. Returns True when the folder was created now.
    """
    work_dir = partial_dir(out_dir)
    if work_dir.exists():
        problem = ownership_problem(stage, out_dir)
        if problem:
            raise UserError(problem)
        marker = read_partial_marker(work_dir)
        if force or marker is None or marker[0] != fp:
            shutil.rmtree(work_dir)
    created = not work_dir.exists()
    work_dir.mkdir(parents=True, exist_ok=True)
    write_partial_marker(work_dir, fp, stage)
    return created


def publish(stage: str, work_dir: Path, out_dir: Path, marker: dict[str, Any]) -> dict[str, Any]:
    """Marker into the work folder, then swap it into place; returns what was published.

    An existing output is replaced only when it carries this stage's marker (checked
    again here: the folder may have changed while the stage ran).
    """
    problem = ownership_problem(stage, out_dir)
    if problem:
        raise UserError(f"{problem}; the finished output stays in {work_dir}")
    (work_dir / PARTIAL_MARKER).unlink(missing_ok=True)
    write_json_atomic(work_dir / MARKER, marker)
    swap_into_place(work_dir, out_dir)
    return published_identity(read_marker(out_dir) or {})


def published_identity(marker: dict[str, Any]) -> dict[str, Any]:
    """What the manifest records of a published output: its marker's identity."""
    return {"fingerprint": marker.get("fingerprint"), "publish_id": marker.get("publish_id"),
            "finished_at": marker.get("finished_at")}


def drop_if_empty(work_dir: Path) -> None:
    """Remove a partial folder that holds nothing but its marker (the stage wrote nothing)."""
    with contextlib.suppress(OSError):
        if [p.name for p in work_dir.iterdir()] == [PARTIAL_MARKER]:
            shutil.rmtree(work_dir)


def swap_into_place(new: Path, dest: Path) -> None:
    """Rename the finished folder ``new`` to ``dest``; an existing ``dest`` is first moved
    aside, then removed, so ``dest`` is at every moment either the old or the new whole."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(new, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, dest)
