"""Runs the stages of a pipeline in order: skip-if-done, crash safety, run manifest.

Each stage writes into ``<out>.partial/`` and the engine renames that folder to
``<out>/`` only after the stage returned, with a ``.stage.json`` marker holding
the stage's fingerprint (config, upstream fingerprints, input hashes). A stage
whose published output carries the same fingerprint is skipped on re-run. A
``.partial`` folder left by a crash is handed back to the stage when the
fingerprint still matches, so that stages able to resume can do so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__
from .config import Pipeline
from .errors import StageUnavailable, UserError
from .plugins import PluginRegistry

MARKER = ".stage.json"
PARTIAL_MARKER = ".fingerprint"


def now() -> str:
    """UTC time stamp in ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def to_jsonable(value: Any) -> Any:
    """Dataclasses, paths and tuples to plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary name in the same folder, fsync, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def fingerprint(data: Any) -> str:
    """sha256 of the canonical JSON of ``data``."""
    blob = json.dumps(to_jsonable(data), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class InputHasher:
    """sha256 of files and folders, cached by (size, mtime) in the run folder."""

    def __init__(self, cache_file: Path) -> None:
        self.cache_file = cache_file
        try:
            self.cache: dict[str, Any] = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            self.cache = {}

    def file(self, path: Path, resolved: Path | None = None) -> str:
        """Hash of one file; ``resolved``: its absolute path when the caller knows it."""
        st = path.stat()
        key = str(resolved or path.resolve())
        hit = self.cache.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        self.cache[key] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
        return h.hexdigest()

    def path(self, path: Path) -> str:
        """Hash of a file, or of a folder's files (relative names and contents)."""
        if path.is_file():
            return self.file(path)
        if not path.exists():
            return "missing"
        h = hashlib.sha256()
        root = path.resolve()
        for sub in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            rel = sub.relative_to(path)
            h.update(str(rel).encode())
            h.update(self.file(sub, root / rel).encode())
        return h.hexdigest()

    def save(self) -> None:
        with contextlib.suppress(OSError):
            write_json_atomic(self.cache_file, self.cache)


@dataclass
class StageContext:
    """What a stage sees: its config, where to write, and what ran before it."""

    name: str
    config: Any
    pipeline: Pipeline
    registry: PluginRegistry
    out_dir: Path
    work_dir: Path
    upstream: dict[str, Path] = field(default_factory=dict)
    force: bool = False
    fingerprint: str = ""

    @property
    def run_dir(self) -> Path:
        return self.pipeline.run_dir

    @property
    def seed(self) -> int:
        return self.pipeline.header.seed

    @property
    def device(self) -> str:
        """``cpu``/``cuda``/...; ``auto`` picks CUDA when available."""
        device = self.pipeline.header.device
        if device != "auto":
            return device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def output_of(self, stage: str) -> Path:
        """Published output folder of an earlier stage; UserError when it has not run."""
        path = self.upstream.get(stage)
        if path is None or not (path / MARKER).exists():
            raise UserError(f"stage {self.name!r} needs the output of stage {stage!r}, "
                            f"which has not completed for run {self.pipeline.header.run!r}")
        return path

    def progress(self, iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
        """A tqdm progress bar labelled with the stage name."""
        from tqdm.auto import tqdm

        kwargs.setdefault("desc", self.name)
        kwargs.setdefault("dynamic_ncols", True)
        kwargs.setdefault("disable", None)  # off when stderr is not a terminal
        return tqdm(iterable, **kwargs)


def stage_output_dir(cls: type, pipeline: Pipeline, config: Any) -> Path:
    """Where a stage publishes its output (``reports/<run>/<stage>`` unless it says otherwise)."""
    custom = getattr(cls, "output_dir", None)
    if callable(custom):
        return Path(custom(pipeline, config))
    return pipeline.run_dir / cls.name


def read_marker(out_dir: Path) -> dict[str, Any] | None:
    """The completion marker of a published stage output, or None."""
    try:
        return json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def versions(registry: PluginRegistry) -> dict[str, Any]:
    """Versions of Python, key libraries and loaded plugin distributions."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "music_interpret": __version__,
    }
    for mod in ("numpy", "torch", "xarray", "netCDF4", "sklearn"):
        module = sys.modules.get(mod)
        if module is not None:
            info[mod] = getattr(module, "__version__", "?")
    info["plugins"] = sorted({f"{i.distribution}=={i.version}" for i in registry.infos})
    return info


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Refuse to run two processes on the same run folder at once."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{run_dir}: another run is using this folder") from None
        yield


class Engine:
    """Runs a validated pipeline."""

    def __init__(self, pipeline: Pipeline, registry: PluginRegistry, *, log: Any = None) -> None:
        self.pipeline = pipeline
        self.registry = registry
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.manifest_path = pipeline.run_dir / "manifest.json"

    def _selected(self, only: list[str] | None) -> list[str]:
        stages = list(self.pipeline.header.stages)
        if only is None:
            return stages
        for name in only:
            if name not in stages:
                raise UserError(f"--stages: {name!r} is not a stage of this pipeline "
                                f"(stages: {', '.join(stages)})")
        return [s for s in stages if s in only]

    def run(self, only: list[str] | None = None, force: bool = False) -> dict[str, Any]:
        """Run the selected stages in pipeline order; returns the manifest."""
        selected = self._selected(only)
        for name in selected:
            if self.registry.find("stage", name) is None:
                raise StageUnavailable(f"stage {name!r} is not available in this installation: "
                                       "no installed plugin provides it")
        run_dir = self.pipeline.run_dir
        with run_lock(run_dir):
            hasher = InputHasher(run_dir / ".hash-cache.json")
            manifest = self._start_manifest(hasher)
            upstream: dict[str, Path] = {}
            upstream_fp: dict[str, str] = {}
            try:
                for name in self.pipeline.header.stages:
                    cls = self.registry.get("stage", name) if name in selected else self.registry.find("stage", name)
                    config = self.pipeline.stage_configs.get(name)
                    out_dir = stage_output_dir(cls, self.pipeline, config) if cls else run_dir / name
                    upstream[name] = out_dir
                    if name not in selected:
                        marker = read_marker(out_dir)
                        upstream_fp[name] = marker["fingerprint"] if marker else "absent"
                        continue
                    upstream_fp[name] = self._run_stage(
                        cls, config, out_dir, dict(upstream), dict(upstream_fp), hasher, manifest,
                        force, f"[{selected.index(name) + 1}/{len(selected)}]",
                    )
                manifest["status"] = "complete"
            except KeyboardInterrupt:
                manifest["status"] = "interrupted"
                raise
            except BaseException as exc:
                manifest["status"] = "failed"
                manifest["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                raise
            finally:
                manifest["finished_at"] = now()
                write_json_atomic(self.manifest_path, manifest)
                hasher.save()
        return manifest

    def _start_manifest(self, hasher: InputHasher) -> dict[str, Any]:
        header = self.pipeline.header
        inputs = {}
        for section in (header.model, header.data):
            if section is not None:
                inputs[str(section.path)] = hasher.path(section.path)
        previous: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            previous = json.loads(self.manifest_path.read_text()).get("stages", {})
        previous = {k: v for k, v in previous.items() if k in header.stages}
        return {
            "run": header.run,
            "pipeline": str(self.pipeline.source) if self.pipeline.source else None,
            "started_at": now(),
            "status": "running",
            "argv": sys.argv,
            "config": to_jsonable(self.pipeline.raw),
            "versions": versions(self.registry),
            "inputs": inputs,
            "stages": previous,
        }

    def _run_stage(
        self,
        cls: type,
        config: Any,
        out_dir: Path,
        upstream: dict[str, Path],
        upstream_fp: dict[str, str],
        hasher: InputHasher,
        manifest: dict[str, Any],
        force: bool,
        label: str,
    ) -> str:
        name = cls.name
        work_dir = out_dir.with_name(out_dir.name + ".partial")
        ctx = StageContext(name, config, self.pipeline, self.registry, out_dir, work_dir, upstream, force)
        stage = cls(config)
        header = self.pipeline.header
        inputs = {str(p): hasher.path(Path(p)) for p in stage.inputs(ctx)}
        fp = fingerprint({
            "stage": name,
            "config": config,
            "model": header.model.adapter.name if header.model else None,
            "seed": header.seed,
            "inputs": inputs,
            "global_inputs": manifest["inputs"],
            "upstream": {k: v for k, v in upstream_fp.items() if k != name},
        })
        ctx.fingerprint = fp
        entry: dict[str, Any] = {"output": str(out_dir), "fingerprint": fp, "inputs": inputs}
        manifest["stages"][name] = entry
        marker = read_marker(out_dir)
        if not force and marker and marker.get("fingerprint") == fp:
            entry.update(status="skipped", reason="up to date", summary=marker.get("summary"))
            self.log(f"{label} {name}: skipped (output up to date: {out_dir})")
            self.registry.hook.mi_stage_end(stage=name, run_dir=str(ctx.run_dir), status="skipped", seconds=0.0)
            return fp
        self._prepare_work_dir(work_dir, fp, force)
        self.log(f"{label} {name}: running")
        entry.update(status="running", started_at=now())
        write_json_atomic(self.manifest_path, manifest)
        self.registry.hook.mi_stage_start(stage=name, run_dir=str(ctx.run_dir), config=config)
        t0 = time.perf_counter()
        try:
            summary = stage.run(ctx)
        except KeyboardInterrupt:
            entry.update(status="interrupted", seconds=round(time.perf_counter() - t0, 3))
            self.log(f"{label} {name}: interrupted; partial output kept in {work_dir}")
            raise
        except BaseException as exc:
            entry.update(status="failed", seconds=round(time.perf_counter() - t0, 3),
                         error=f"{type(exc).__name__}: {exc}".splitlines()[0])
            self.registry.hook.mi_stage_error(stage=name, run_dir=str(ctx.run_dir), error=exc)
            raise
        seconds = time.perf_counter() - t0
        self._publish(work_dir, out_dir, {"stage": name, "fingerprint": fp, "finished_at": now(),
                                          "seconds": round(seconds, 3), "summary": to_jsonable(summary)})
        entry.update(status="done", seconds=round(seconds, 3), summary=to_jsonable(summary))
        self.log(f"{label} {name}: done in {seconds:.1f}s -> {out_dir}")
        self.registry.hook.mi_stage_end(stage=name, run_dir=str(ctx.run_dir), status="done", seconds=seconds)
        return fp

    @staticmethod
    def _prepare_work_dir(work_dir: Path, fp: str, force: bool) -> None:
        """Reuse a partial folder of the same fingerprint (resume); start afresh otherwise."""
        if work_dir.exists():
            try:
                same = (work_dir / PARTIAL_MARKER).read_text().strip() == fp
            except OSError:
                same = False
            if force or not same:
                shutil.rmtree(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / PARTIAL_MARKER).write_text(fp + "\n")

    @staticmethod
    def _publish(work_dir: Path, out_dir: Path, marker: dict[str, Any]) -> None:
        """Marker into the work folder, then swap it into place."""
        (work_dir / PARTIAL_MARKER).unlink(missing_ok=True)
        write_json_atomic(work_dir / MARKER, marker)
        if out_dir.exists():
            old = out_dir.with_name(out_dir.name + f".old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(work_dir, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work_dir, out_dir)
