"""The public façade for plugin authors: everything a plugin package imports from
music-interpret, and nothing else it needs to reach into.

>>> from music_interpret.plugin import Stage, StageContext, hookimpl

* registration: :data:`hookimpl` (hooks ``mi_model_adapters``, ``mi_activation_stores``,
  ``mi_dictionary_learners``, ``mi_analyzers``, ``mi_stages`` and the lifecycle hooks of
  :mod:`music_interpret.hookspecs`);
* the plugin kinds and their doors: :class:`ModelAdapter` (with :class:`SongDataset`),
  :class:`ActivationStore` (with :class:`StoreReader`, :class:`StoreWriter`,
  :class:`BlockSource`), :class:`DictionaryLearner`, :class:`Analyzer`, :class:`Stage`;
* the data crossing the doors: :class:`Batch`, :class:`EventVocabulary`,
  :class:`SongTokens`, :class:`Window`, :class:`NoteTable`, :class:`ShardInfo`,
  :class:`ModelInfo`, :data:`COORDINATES`, :data:`RESOLUTION`, :func:`window_ranges`;
* the contexts plugins run in: :class:`StageContext`, :class:`AnalysisContext`;
* :class:`UserError` (one line, no traceback, exit status 2) and :func:`open_store`.
"""

from __future__ import annotations

from .analyzers.context import AnalysisContext
from .context import StageContext
from .doors import (
    COORDINATES,
    NOT_APPLICABLE,
    RESOLUTION,
    SPLITS,
    STORE_COORDINATES,
    EventVocabulary,
    ModelInfo,
    NoteTable,
    ShardInfo,
    SongTokens,
    Window,
    window_ranges,
)
from .errors import UserError
from .hookspecs import hookimpl
from .interfaces import (
    ActivationStore,
    Analyzer,
    Batch,
    BlockSource,
    DictionaryLearner,
    EmptyConfig,
    ModelAdapter,
    SongDataset,
    Stage,
    StoreReader,
    StoreWriter,
)
from .stores import open_store

__all__ = [
    "COORDINATES", "NOT_APPLICABLE", "RESOLUTION", "SPLITS", "STORE_COORDINATES", "ActivationStore",
    "AnalysisContext", "Analyzer", "Batch", "BlockSource", "DictionaryLearner", "EmptyConfig",
    "EventVocabulary", "ModelAdapter", "ModelInfo", "NoteTable", "ShardInfo", "SongDataset",
    "SongTokens", "Stage", "StageContext", "StoreReader", "StoreWriter", "UserError", "Window",
    "hookimpl", "open_store", "window_ranges",
]
