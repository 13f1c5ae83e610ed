"""The ``analyze`` stage: run the configured analyzers on the trained dictionaries.

Each analyzer writes into its own folder, ``reports/<run>/analyze/<analyzer>/``, and
returns a summary that lands in the run manifest. The store comes from the
``extract`` stage (or ``analyze.store``), the dictionaries from the ``train`` stage
(or ``analyze.dictionaries``, a folder holding ``<hook>/config.json``).

A hook trained as a sweep holds one dictionary per member,
``<hook>/<p1>=<v1>[,<p2>=<v2>]/config.json``. The analyzers that look at one dictionary
per hook get the member named by ``analyze.member`` (a label, or some of its parts such
as ``d_sae=1024``: the first member, in the sweep's order, that has them; default: the
first member); analyzers that compare dictionaries (``dictionary_compare``) get every
member through ``AnalysisContext.sweeps``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..config import PluginRef
from ..errors import UserError
from ..interfaces import Stage

if TYPE_CHECKING:
    from ..context import StageContext

DEFAULT_ANALYZERS = ["feature_token", "causal", "probe", "top_examples"]


@dataclass
class AnalyzeConfig:
    """Options of ``analyze`` (each analyzer's own options go in its entry of ``analyzers``)."""

    analyzers: list[PluginRef] = field(default_factory=lambda: list(DEFAULT_ANALYZERS),
                                       metadata={"plugin": "analyzer"})
    hooks: list[str] = field(default_factory=list)
    store: Path | None = field(default=None, metadata={"input": True})
    dictionaries: Path | None = field(default=None, metadata={"input": True})
    max_tokens: int | None = None
    member: str | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        names = [ref.name if isinstance(ref, PluginRef) else ref for ref in self.analyzers]
        if len(set(names)) != len(names):
            raise ValueError(f"analyzers: each analyzer may appear once, got {names}")


class AnalyzeStage(Stage):
    """Relate the learned features to musical attributes."""

    name = "analyze"
    description = ("Run analyzers (feature-token association, causal tests, probes, top examples) "
                   "on the dictionaries.")
    Config = AnalyzeConfig
    requires: ClassVar[tuple[str, ...]] = ("model", "data")

    def inputs(self, ctx: StageContext) -> list[Path]:
        return [p for p in (self.config.store, self.config.dictionaries) if p is not None]

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from ..analyzers.context import AnalysisContext

        cfg: AnalyzeConfig = self.config
        store = cfg.store or ctx.output_of("extract")
        train_dir = None
        if cfg.dictionaries is not None:
            dict_root = cfg.dictionaries
        else:
            train_dir = ctx.output_of("train")
            dict_root = train_dir / "dictionaries"
        found, sweeps = find_dictionaries(dict_root)
        for hook, members in sweeps.items():
            found[hook] = choose_member(members, cfg.member, hook)
        if not found:
            raise UserError(f"{dict_root}: no trained dictionaries (expected <hook>/config.json "
                            f"or, for a sweep, <hook>/<member>/config.json)")
        hooks = cfg.hooks or list(found)
        missing = [h for h in hooks if h not in found]
        if missing:
            raise UserError(f"analyze.hooks: no dictionary for {', '.join(missing)} in {dict_root} "
                            f"(trained: {', '.join(found)})")
        header = ctx.pipeline.header
        summary: dict[str, Any] = {}
        for ref in cfg.analyzers:
            analyzer = ref.build(ctx.registry)
            out = ctx.work_dir / ref.name
            out.mkdir(parents=True, exist_ok=True)
            actx = AnalysisContext(
                store_path=Path(store), dictionaries={h: found[h] for h in hooks}, out_dir=out,
                model_dir=header.model.path, data_dir=header.data.path, data_split=header.data.split,
                device=ctx.device, seed=ctx.seed, max_tokens=cfg.max_tokens, train_dir=train_dir,
                progress_factory=lambda it=None, **kw: ctx.progress(it, **kw),
                model_adapter=header.model.adapter, registry=ctx.registry,
                sweeps={h: sweeps[h] for h in hooks if h in sweeps},
            )
            summary[ref.name] = analyzer.analyze(actx)
        if sweeps:
            summary["sweep_members"] = {h: found[h].name for h in hooks if h in sweeps}
        return summary


def find_dictionaries(root: Path) -> tuple[dict[str, Path], dict[str, dict[str, Path]]]:
    """({hook: folder} of single dictionaries, {hook: {member label: folder}} of sweeps); a
    sweep's members in the order of its ``sweep.json`` (else by name)."""
    import json

    single = {p.parent.name: p.parent for p in sorted(root.glob("*/config.json"))}
    sweeps: dict[str, dict[str, Path]] = {}
    for folder in sorted(p for p in root.glob("*") if p.is_dir() and p.name not in single):
        members = {p.parent.name: p.parent for p in sorted(folder.glob("*/config.json"))}
        if not members:
            continue
        try:
            order = [m["label"] for m in json.loads((folder / "sweep.json").read_text())["members"]]
        except (OSError, ValueError, KeyError, TypeError):
            order = []
        ranked = [n for n in order if n in members] + [n for n in members if n not in order]
        sweeps[folder.name] = {n: members[n] for n in ranked}
    return single, sweeps


def choose_member(members: dict[str, Path], wanted: str | None, hook: str) -> Path:
    """The sweep member named by ``wanted`` (a label, or some of its ``p=v`` parts; None:
    the first member)."""
    if wanted is None:
        return next(iter(members.values()))
    parts = {p.strip() for p in wanted.split(",")}
    for name, folder in members.items():
        if parts <= set(name.split(",")):
            return folder
    raise UserError(f"analyze.member: no member of the sweep of {hook} matches {wanted!r} "
                    f"(members: {', '.join(members)})")
