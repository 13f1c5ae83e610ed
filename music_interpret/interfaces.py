"""Base classes of the plugin kinds (contract).

Every plugin class carries a unique ``name`` (what ``pipeline.yaml`` refers to),
a one-line ``description`` and a ``Config`` dataclass that the engine fills
strictly from YAML. The engine instantiates a plugin as ``cls(config)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # heavy imports stay out of start-up
    import numpy as np
    import torch

    from .config import Pipeline
    from .engine import StageContext
    from .plugins import PluginRegistry

KINDS = ("model_adapter", "activation_store", "dictionary_learner", "analyzer", "stage")


@dataclass
class EmptyConfig:
    """Config of a plugin that takes no options."""


class Plugin:
    """Common part of every plugin class."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type] = EmptyConfig

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.Config()


@dataclass
class Batch:
    """A padded batch of model inputs.

    ``codes`` is (B, T, F) int64, ``mask`` (B, T) bool (True on real tokens);
    ``song`` gives each row's index into the dataset's song table and
    ``offset`` the position of the row's first token inside that song's code
    sequence (non-zero for the later windows of a long song).
    """

    codes: torch.Tensor
    mask: torch.Tensor
    song: Sequence[int] = field(default_factory=list)
    offset: Sequence[int] = field(default_factory=list)


@dataclass
class ModelInfo:
    """What a model folder holds, told without loading its weights."""

    d_model: int
    hook_points: list[str]
    n_parameters: int


class ModelAdapter(Plugin, ABC):
    """Wraps a trained model: loading, data, hook points, patching, token metadata."""

    kind = "model_adapter"

    def input_embeddings(self) -> tuple[list[str], torch.Tensor]:
        """The loaded model's input embedding rows as directions of the residual stream:
        (names such as ``pitch=C4``, matrix (rows, d_model)). Analyses use them as the
        control "does the stream still carry the token's own input?"."""
        raise NotImplementedError

    def describe(self, model_dir: Path, device: str = "cpu") -> ModelInfo:
        """Width, hook points and size of the model in ``model_dir`` without loading its weights;
        raises ``UserError`` for what :meth:`load` would refuse (used by ``validate``)."""
        raise NotImplementedError

    @abstractmethod
    def load(self, model_dir: Path, device: str = "cpu") -> None:
        """Load the model found in ``model_dir`` onto ``device``."""

    @abstractmethod
    def hook_points(self) -> list[str]:
        """Names of every hook point the loaded model offers."""

    @abstractmethod
    def run_with_hooks(self, batch: Batch, hook_points: Sequence[str]) -> dict[str, torch.Tensor]:
        """One no-grad forward pass returning the activation (B, T, D) at each hook point."""

    @abstractmethod
    def run_with_patch(
        self,
        batch: Batch,
        hook_point: str,
        fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Forward with ``fn`` replacing the activation at ``hook_point``; per-field next-token losses."""

    @abstractmethod
    def token_metadata(self, codes: np.ndarray) -> Mapping[str, np.ndarray]:
        """Per-token musical metadata (event_type, beat, position, pitch, ...) for (T, F) codes."""

    # -- optional: causal analyses (``analyzers/causal.py``, ``learners/downstream.py``) ----

    def patched_logits(
        self,
        batch: Batch,
        hook_point: str,
        fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """No-grad forward with ``fn`` replacing the activation at ``hook_point`` (None: clean);
        returns every output field's logits, ``{field: (B, T, n_field)}`` in the model's field
        order. Position t predicts token t+1. ``fn`` may replace the activation or add to it."""
        raise NotImplementedError

    def generate(
        self,
        prompt: np.ndarray,
        steps: int,
        *,
        seed: int,
        temperature: float = 1.0,
        filter_thres: float = 0.9,
        patch: tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    ) -> np.ndarray:
        """Up to ``steps`` new codes (n, F) continuing ``prompt`` (T0, F) with the model's own
        decoding rules, drawn from a generator seeded with ``seed`` (the same seed gives the
        same samples), optionally with ``patch = (hook point, fn)`` applied at every step."""
        raise NotImplementedError

    def label_target(self, attribute: str, value: str) -> tuple[str, list[int] | None]:
        """Which output field a label ``attribute=value`` (see ``analyzers/attributes.py``)
        concerns, and, when the model predicts the label directly (``next.pitch_class=C``),
        the codes of that field whose summed probability is the label's probability (else
        None). Raises ``KeyError`` for an attribute the model has no field for."""
        raise NotImplementedError


class ActivationStore(Plugin, ABC):
    """Writes and reads extracted activations with per-token coordinates."""

    kind = "activation_store"

    @abstractmethod
    def create(self, path: Path, *, hooks: Sequence[str], d_model: int, songs: Sequence[str],
               sources: Sequence[str], attrs: Mapping[str, Any], resume: bool = True) -> Any:
        """Start (or resume) a store; the writer offers ``next_song``, ``n_shards``,
        ``write_shard(acts, coords, song_start, song_stop)`` and ``finish(summary)``."""

    @abstractmethod
    def tokens_per_shard(self, n_hooks: int, d_model: int) -> int:
        """How many tokens a shard should hold."""

    @abstractmethod
    def open(self, path: Path, hooks: Sequence[str] | None = None) -> Any:
        """The whole store as one ``xarray.Dataset``."""


class DictionaryLearner(Plugin, ABC):
    """Learns a sparse dictionary (e.g. a sparse autoencoder) from stored activations."""

    kind = "dictionary_learner"


class Analyzer(Plugin, ABC):
    """Relates learned features to musical attributes and writes analysis outputs."""

    kind = "analyzer"

    @abstractmethod
    def analyze(self, ctx: Any) -> dict[str, Any]:
        """Analyse ``ctx.dictionaries`` against ``ctx.store``; write only into ``ctx.out_dir``.

        ``ctx`` is an :class:`music_interpret.analyzers.context.AnalysisContext`.
        Returns a small summary for the run manifest.
        """


class Stage(Plugin, ABC):
    """One step of ``pipeline.yaml``; its ``Config`` is the YAML section of the same name.

    The engine gives the stage an empty or partially filled ``ctx.work_dir``; the
    stage writes everything there and the engine publishes it as ``ctx.out_dir``
    only after :meth:`run` returned, so an interrupted stage never looks complete.
    """

    kind = "stage"
    #: top-level sections of ``pipeline.yaml`` the stage needs (``"model"``, ``"data"``)
    requires: ClassVar[tuple[str, ...]] = ()

    def inputs(self, ctx: StageContext) -> list[Path]:
        """Files whose content decides the stage's result (hashed into its fingerprint)."""
        return []

    def check(self, pipeline: Pipeline, registry: PluginRegistry) -> list[str]:
        """Problems :meth:`run` would meet that can be found before anything runs (one line
        each, naming the key or file); ``validate`` and ``run`` call it first."""
        return []

    @abstractmethod
    def run(self, ctx: StageContext) -> dict[str, Any] | None:
        """Do the work, writing into ``ctx.work_dir``; return a small summary for the manifest."""
