"""Entry-point module of the built-in pipeline stages."""

from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl
def mi_stages() -> list[type]:
    from .analyze import AnalyzeStage
    from .extract import ExtractStage
    from .preprocess import PreprocessStage
    from .report import ReportStage
    from .train import TrainStage

    return [ExtractStage, PreprocessStage, TrainStage, AnalyzeStage, ReportStage]
