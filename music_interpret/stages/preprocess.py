"""The ``preprocess`` stage: per-hook statistics and the normalisation of a store.

Its output folder is ``<store>/stats`` (next to the shards): ``stats.nc`` and
``normalization.json``, plus ``normalized/`` (a normalised copy of the store) with
``materialize: true``. The training loader normalises on the fly from these files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Pipeline
from ..context import StageContext
from ..errors import UserError
from ..interfaces import Stage
from ..normalize import DEFAULT_MODE, Mode
from ..stats import STATS_DIR


@dataclass
class PreprocessConfig:
    """Options of ``preprocess``."""

    normalization: Mode = DEFAULT_MODE
    outlier_factor: float = 4.0
    materialize: bool = False
    block_tokens: int = 65_536

    def __post_init__(self) -> None:
        if not self.outlier_factor > 0:
            raise ValueError(f"outlier_factor must be positive, got {self.outlier_factor}")
        if self.block_tokens < 1:
            raise ValueError(f"block_tokens must be positive, got {self.block_tokens}")


class PreprocessStage(Stage):
    """Activation statistics (moments, norms, outliers) and normalisation parameters."""

    name = "preprocess"
    description = "Per-hook activation statistics and normalisation parameters, next to the store."
    Config = PreprocessConfig

    @staticmethod
    def output_dir(pipeline: Pipeline, config: PreprocessConfig) -> Path:
        from .extract import ExtractStage

        extract = pipeline.stage_configs.get("extract")
        if extract is None:
            raise UserError("preprocess: needs the 'extract' section of the pipeline "
                            "(it writes its statistics next to the extracted store)")
        return ExtractStage.output_dir(pipeline, extract) / STATS_DIR

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from ..normalize import materialize, write_normalization
        from ..stats import NORMALIZATION_FILE, STATS_FILE, compute_stats, write_stats

        cfg: PreprocessConfig = self.config
        store = ctx.output_of("extract") if "extract" in ctx.upstream else ctx.out_dir.parent
        info = ctx.open_store(store)
        bar = ctx.progress(total=info.n_tokens * len(info.hooks), unit="tok", unit_scale=True)
        try:
            stats = compute_stats(info, outlier_factor=cfg.outlier_factor,
                                  block_tokens=cfg.block_tokens, progress=bar,
                                  scratch_dir=ctx.work_dir)
        finally:
            bar.close()
        write_stats(stats, ctx.work_dir / STATS_FILE)
        write_normalization(ctx.work_dir / NORMALIZATION_FILE, stats, cfg.normalization)
        summary: dict[str, Any] = {
            "store": str(info.path), "normalization": cfg.normalization,
            "hooks": {
                str(h): {"count": int(stats["count"].sel(hook=h)),
                         "mean_norm": round(float(stats["mean_norm"].sel(hook=h)), 6),
                         "outlier_fraction": round(float(stats["outlier_fraction"].sel(hook=h)), 6)}
                for h in stats["hook"].values
            },
        }
        if cfg.materialize:
            out = materialize(info, ctx.work_dir / "normalized", cfg.normalization, stats,
                              block_tokens=cfg.block_tokens)
            summary["materialized"] = str(ctx.out_dir / out.name)
        return summary
