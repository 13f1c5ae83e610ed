"""Hook specifications of the ``music_interpret`` pluggy project (contract).

Registration hooks return lists of plugin classes; lifecycle hooks observe the
stages the engine runs. Every hook name carries the ``mi_`` prefix.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "music_interpret"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def mi_model_adapters() -> list[type]:
    """Return model adapter classes (subclasses of ``interfaces.ModelAdapter``)."""


@hookspec
def mi_activation_stores() -> list[type]:
    """Return activation store classes (subclasses of ``interfaces.ActivationStore``)."""


@hookspec
def mi_dictionary_learners() -> list[type]:
    """Return dictionary learner classes (subclasses of ``interfaces.DictionaryLearner``)."""


@hookspec
def mi_analyzers() -> list[type]:
    """Return analyzer classes (subclasses of ``interfaces.Analyzer``)."""


@hookspec
def mi_stages() -> list[type]:
    """Return pipeline stage classes (subclasses of ``interfaces.Stage``)."""


@hookspec
def mi_stage_start(stage: str, run_dir: str, config: Any) -> None:
    """Called before a stage runs (not called when it is skipped)."""


@hookspec
def mi_stage_end(stage: str, run_dir: str, status: str, seconds: float) -> None:
    """Called after a stage finished; ``status`` is ``done`` or ``skipped``."""


@hookspec
def mi_stage_error(stage: str, run_dir: str, error: BaseException) -> None:
    """Called when a stage raised; the error is re-raised afterwards."""
