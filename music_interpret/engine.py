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
import json
import os
import platform
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import Pipeline
from .context import StageContext
from .datainput import data_problems, import_data
from .errors import ConfigError, DiskFull, StageFailed, StageUnavailable, UserError
from .hashing import InputHasher
from .jsonio import dumps, fingerprint, to_jsonable, write_bytes_atomic, write_json_atomic
from .outputs import (
    MARKER,
    drop_if_empty,
    output_lock,
    overlap_problems,
    ownership_problem,
    partial_dir,
    prepare_work_dir,
    publish,
    published_identity,
    read_marker,
    run_lock,
)
from .plugins import PluginRegistry
from .ranks import DistInfo
from .version import __version__

__all__ = ["MARKER", "Engine", "InputHasher", "StageContext", "fingerprint", "preflight", "to_jsonable",
           "write_json_atomic"]

MANIFEST_RESERVE = 4096  # spare bytes kept in manifest.json, so that a full disk can still record the end


def now() -> str:
    """UTC time stamp in ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def stage_output_dir(cls: type, pipeline: Pipeline, config: Any) -> Path:
    """Where a stage publishes its output (``reports/<run>/<stage>`` unless it says otherwise)."""
    custom = getattr(cls, "output_dir", None)
    if callable(custom):
        return Path(custom(pipeline, config))
    return pipeline.run_dir / cls.name


def versions(registry: PluginRegistry) -> dict[str, Any]:
    """Versions of Python, key libraries and loaded plugin distributions."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "music_interpret": __version__,
    }
    for mod in ("numpy", "torch", "xarray", "h5py", "h5netcdf", "netCDF4", "sklearn"):
        module = sys.modules.get(mod)
        if module is not None:
            info[mod] = getattr(module, "__version__", "?")
    info["plugins"] = sorted({f"{i.distribution}=={i.version}" for i in registry.infos})
    return info


def stage_outputs(pipeline: Pipeline, registry: PluginRegistry) -> dict[str, Path]:
    """Resolved output folder of every available stage of the pipeline."""
    outs = {}
    for name in pipeline.header.stages:
        cls = registry.find("stage", name)
        if cls is not None:
            outs[name] = stage_output_dir(cls, pipeline, pipeline.stage_configs.get(name)).resolve()
    return outs


def preflight(pipeline: Pipeline, registry: PluginRegistry, stages: list[str] | None = None) -> list[str]:
    """Everything ``run`` would refuse about ``stages`` (default: all), before anything runs.

    Output folders that may not be replaced or that overlap inputs, the run folder or
    other outputs; a run folder that is a file; and each stage's own :meth:`check`.
    """
    header = pipeline.header
    names = list(header.stages if stages is None else stages)
    problems = []
    for path in (header.output_dir, pipeline.run_dir):
        if path.exists() and not path.is_dir():
            problems.append(f"output_dir: {path} is a file, not a folder")
            return problems
    outs = stage_outputs(pipeline, registry)
    inputs = {f"{key}.path": section.path.resolve()
              for key, section in (("model", header.model), ("data", header.data)) if section is not None}
    for line in overlap_problems(outs, header.stages, names, inputs, pipeline.run_dir.resolve()):
        problems.append(line)
    problems.extend(data_problems(pipeline, registry))
    for name in names:
        if name in outs and (problem := ownership_problem(name, outs[name])):
            problems.append(f"{_output_key(pipeline, name)}: {problem}")
        cls = registry.find("stage", name)
        if cls is not None:
            check = getattr(cls(pipeline.stage_configs.get(name)), "check", None)
            if callable(check):
                problems.extend(check(pipeline, registry))
    return list(dict.fromkeys(problems))


def _output_key(pipeline: Pipeline, name: str) -> str:
    """``<stage>.output`` when the pipeline sets it, else the stage's name."""
    config = pipeline.stage_configs.get(name)
    return f"{name}.output" if getattr(config, "output", None) is not None else name


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write the run manifest atomically, with ``MANIFEST_RESERVE`` spare bytes of blanks.

    When the disk is full the atomic write (which needs new blocks) fails; the text is
    then written in place into the blocks the file already holds, if it fits.
    """
    text = dumps(manifest)
    body = text.rstrip("\n")
    pad = MANIFEST_RESERVE - len(body.encode()) % MANIFEST_RESERVE + MANIFEST_RESERVE
    try:
        write_bytes_atomic(path, (body + " " * (pad - 1) + "\n").encode())
    except DiskFull:
        data = text.encode()
        size = path.stat().st_size if path.exists() else 0
        if len(data) > size:
            raise
        with open(path, "r+b") as fh:  # the same size: no new blocks
            fh.write(data[:-1] + b" " * (size - len(data)) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())


class Engine:
    """Runs a validated pipeline."""

    def __init__(self, pipeline: Pipeline, registry: PluginRegistry, *, log: Any = None) -> None:
        self.pipeline = pipeline
        self.registry = registry
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.manifest_path = pipeline.run_dir / "manifest.json"
        self.dist = DistInfo()
        self._ranked_stage = False  # inside a stage that every rank runs

    def _selected(self, only: list[str] | None) -> list[str]:
        stages = list(self.pipeline.header.stages)
        if only is None:
            return stages
        if not only:
            raise UserError(f"--stages: no stage named (stages: {', '.join(stages)})")
        for name in only:
            if name not in stages:
                raise UserError(f"--stages: {name!r} is not a stage of this pipeline "
                                f"(stages: {', '.join(stages)})")
        return [s for s in stages if s in only]

    def run(self, only: list[str] | None = None, force: bool = False) -> dict[str, Any]:
        """Run the selected stages in pipeline order; returns the manifest.

        ``manifest["examined"]`` lists the stages this call ran or skipped. Under
        ``torchrun`` (:mod:`music_interpret.ranks`) rank 0 runs the pipeline and the other
        ranks follow it: they return ``{"rank": r, "ran": [stages they took part in]}``.
        """
        from . import ranks

        self.dist = ranks.info()
        if not self.dist.enabled:
            return self._run(only, force)
        if not self.dist.main:
            return self._follow()
        try:
            manifest = self._run(only, force)
        except BaseException as exc:
            if not self._ranked_stage:  # the others wait for a message: tell them to stop
                ranks.send({"action": "abort", "error": f"{type(exc).__name__}: {exc}".splitlines()[0]})
            raise  # (inside a shared stage, torchrun stops the others when this rank exits)
        ranks.send({"action": "end"})
        return manifest

    def _follow(self) -> dict[str, Any]:
        """Ranks other than 0: run the distributed stages rank 0 announces, until it ends."""
        from . import ranks

        ran = []
        while True:
            msg = ranks.receive()
            if msg["action"] == "end":
                return {"rank": self.dist.rank, "ran": ran}
            if msg["action"] == "abort":
                raise StageFailed(f"rank {self.dist.rank}: rank 0 stopped the run ({msg['error']})")
            data = self.pipeline.header.data
            if data is not None and msg.get("data"):
                data.path, data.format = Path(msg["data"]["path"]), msg["data"]["format"]
                data.converted_from = msg["data"]["converted_from"] and Path(msg["data"]["converted_from"])
            name = msg["stage"]
            cls = self.registry.get("stage", name)
            config = self.pipeline.stage_configs.get(name)
            ctx = StageContext(name, config, self.pipeline, self.registry, Path(msg["out_dir"]),
                               Path(msg["work_dir"]), {k: Path(v) for k, v in msg["upstream"].items()},
                               bool(msg["force"]), msg["fingerprint"], self.dist)
            cls(config).run(ctx)
            ranks.barrier()
            ran.append(name)

    def _announce(self, ctx: StageContext) -> None:
        """Rank 0: have the other ranks run ``ctx``'s stage along with this one."""
        from . import ranks

        data = self.pipeline.header.data
        ranks.send({
            "action": "stage", "stage": ctx.name, "out_dir": str(ctx.out_dir),
            "work_dir": str(ctx.work_dir), "upstream": {k: str(v) for k, v in ctx.upstream.items()},
            "force": ctx.force, "fingerprint": ctx.fingerprint,
            "data": data and {"path": str(data.path), "format": data.format,
                              "converted_from": data.converted_from and str(data.converted_from)},
        })

    def _run(self, only: list[str] | None, force: bool) -> dict[str, Any]:
        selected = self._selected(only)
        for name in selected:
            if self.registry.find("stage", name) is None:
                raise StageUnavailable(f"stage {name!r} is not available in this installation: "
                                       "no installed plugin provides it")
        problems = preflight(self.pipeline, self.registry, selected)
        if problems:
            raise ConfigError(problems)
        run_dir = self.pipeline.run_dir
        outs = stage_outputs(self.pipeline, self.registry)
        with run_lock(run_dir), contextlib.ExitStack() as locks:
            for name in selected:
                locks.enter_context(output_lock(outs[name]))
            import_data(self.pipeline, self.registry)  # data.format: convert the folder once
            hasher = InputHasher(run_dir / ".hash-cache.json")
            manifest = self._start_manifest(hasher)
            manifest["examined"] = []
            upstream: dict[str, Path] = {}
            upstream_fp: dict[str, str] = {}
            failure: BaseException | None = None
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
                    manifest["examined"].append(name)
                    upstream_fp[name] = self._run_stage(
                        cls, config, out_dir, dict(upstream), dict(upstream_fp), hasher, manifest,
                        force, f"[{selected.index(name) + 1}/{len(selected)}]",
                    )
                manifest["status"] = "complete"
            except KeyboardInterrupt as exc:
                failure = exc
                manifest["status"] = "interrupted"
                raise
            except BaseException as exc:
                failure = exc
                manifest["status"] = "failed"
                manifest["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                raise
            finally:
                manifest["finished_at"] = now()
                try:
                    write_manifest(self.manifest_path, manifest)
                except (OSError, UserError) as exc:
                    if failure is None:
                        raise
                    # the stage's own error is the one to report
                    self.log(f"warning: could not record the end of the run in {self.manifest_path}: {exc}")
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

    def _notify(self, hook: str, **kwargs: Any) -> None:
        """Call every plugin's observer ``hook``; one that raises is reported, never fatal."""
        caller = getattr(self.registry.hook, hook)
        for impl in reversed(caller.get_hookimpls()):  # pluggy's order: last registered first
            try:
                impl.function(*[kwargs[a] for a in impl.argnames])
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - an observer must not stop the run
                text = str(exc).strip().splitlines()
                self.log(f"warning: plugin {impl.plugin_name}: {hook} raised {type(exc).__name__}"
                         + (f": {text[0]}" if text else "") + " (ignored)")

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
        work_dir = partial_dir(out_dir)
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
        if not force and marker and marker.get("fingerprint") == fp and marker.get("stage") == name:
            entry.update(status="skipped", reason="up to date", summary=marker.get("summary"),
                         published=published_identity(marker))
            self.log(f"{label} {name}: skipped (output up to date: {out_dir})")
            self._notify("mi_stage_end", stage=name, run_dir=str(ctx.run_dir), status="skipped", seconds=0.0)
            return fp
        created = prepare_work_dir(out_dir, fp, name, force)
        self.log(f"{label} {name}: running")
        entry.update(status="running", started_at=now())
        write_manifest(self.manifest_path, manifest)
        self._notify("mi_stage_start", stage=name, run_dir=str(ctx.run_dir), config=config)
        ranked = self.dist.enabled and bool(getattr(cls, "distributed", False))
        if ranked:
            ctx.dist = self.dist
            self._announce(ctx)
        t0 = time.perf_counter()
        try:
            try:
                self._ranked_stage = ranked
                summary = stage.run(ctx)
                if ranked:
                    from . import ranks

                    ranks.barrier()  # every rank has finished writing into the work folder
                self._ranked_stage = False
            except SystemExit as exc:  # a stage that exits has failed, whatever its code
                raise StageFailed(f"stage {name!r} failed: it called sys.exit({exc.code!r})") from None
        except KeyboardInterrupt:
            entry.update(status="interrupted", seconds=round(time.perf_counter() - t0, 3))
            self.log(f"{label} {name}: interrupted; partial output kept in {work_dir}")
            raise
        except BaseException as exc:
            entry.update(status="failed", seconds=round(time.perf_counter() - t0, 3),
                         error=f"{type(exc).__name__}: {exc}".splitlines()[0])
            if created:
                drop_if_empty(work_dir)
            self._notify("mi_stage_error", stage=name, run_dir=str(ctx.run_dir), error=exc)
            raise
        seconds = time.perf_counter() - t0
        published = publish(name, work_dir, out_dir, {
            "stage": name, "fingerprint": fp, "publish_id": uuid.uuid4().hex, "finished_at": now(),
            "seconds": round(seconds, 3), "summary": to_jsonable(summary)})
        entry.update(status="done", seconds=round(seconds, 3), summary=to_jsonable(summary),
                     published=published)
        self.log(f"{label} {name}: done in {seconds:.1f}s -> {out_dir}")
        self._notify("mi_stage_end", stage=name, run_dir=str(ctx.run_dir), status="done", seconds=seconds)
        return fp
