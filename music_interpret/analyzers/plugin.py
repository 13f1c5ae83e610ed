"""Entry-point module of the built-in analyzers (add a class to the list to register it)."""

from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl
def mi_analyzers() -> list[type]:
    from .causal import CausalAnalyzer
    from .dictionary_compare import DictionaryCompareAnalyzer
    from .examples import TopExamplesAnalyzer
    from .feature_token import FeatureTokenAnalyzer
    from .probing import ProbeAnalyzer
    from .transposition import TranspositionAnalyzer

    return [
        FeatureTokenAnalyzer,
        CausalAnalyzer,
        ProbeAnalyzer,
        TopExamplesAnalyzer,
        TranspositionAnalyzer,
        DictionaryCompareAnalyzer,
    ]
