"""Base classes of the plugin kinds: the only doors generic code goes through (contract).

Every plugin class carries a unique ``name`` (what ``pipeline.yaml`` refers to),
a one-line ``description`` and a ``Config`` dataclass that the engine fills
strictly from YAML. The engine instantiates a plugin as ``cls(config)``.

Stages, analyzers, learners and the report reach a model only through
:class:`ModelAdapter` (and the :class:`SongDataset` it opens) and stored activations
only through :class:`ActivationStore` and the :class:`StoreReader` its ``open``
returns; the data crossing these doors is defined in :mod:`music_interpret.doors`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .doors import (
    COORDINATES,
    RESOLUTION,
    SPLITS,
    EventVocabulary,
    ModelInfo,
    NoteTable,
    ShardInfo,
    SongTokens,
    Window,
)
from .stores.reader import BlockSource, StoreReader, StoreWriter

if TYPE_CHECKING:  # heavy imports stay out of start-up
    import numpy as np
    import torch

    from .analyzers.context import AnalysisContext
    from .config import Pipeline
    from .context import StageContext
    from .plugins import PluginRegistry

__all__ = ["COORDINATES", "KINDS", "RESOLUTION", "SPLITS", "ActivationStore", "Analyzer", "Batch",
           "BlockSource", "DictionaryLearner", "EmptyConfig", "EventVocabulary", "ModelAdapter",
           "ModelInfo", "NoteTable", "Plugin", "ShardInfo", "SongDataset", "SongTokens", "Stage",
           "StoreReader", "StoreWriter", "Window"]

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

    def _missing(self, what: str) -> NotImplementedError:
        return NotImplementedError(f"the {self.name or type(self).__name__} {self.kind.replace('_', ' ')} "
                                   f"does not implement {what}")


@dataclass
class Batch:
    """A padded batch of model inputs.

    ``codes`` is (B, T, ...) int64 (MMT: (B, T, 6) field codes), ``mask`` (B, T) bool
    (True on real tokens); ``song`` gives each row's index into the dataset's song table
    and ``offset`` the position of the row's first token inside that song's tokens.
    """

    codes: torch.Tensor
    mask: torch.Tensor
    song: Sequence[int] = field(default_factory=list)
    offset: Sequence[int] = field(default_factory=list)


# -- the model door ----------------------------------------------------------------------


class SongDataset(ABC):
    """The songs a model adapter reads from a dataset folder, restricted to one split.

    ``names`` are the songs of the split in order; iterating yields them. A song read
    with :meth:`read` is the adapter's own object: generic code only hands it back to
    the adapter (:meth:`ModelAdapter.tokenize`, :meth:`ModelAdapter.transpose`, ...).
    """

    names: tuple[str, ...]
    split: str | None

    @property
    @abstractmethod
    def location(self) -> Path:
        """The folder the songs are read from (for messages and provenance)."""

    @abstractmethod
    def read(self, name: str) -> Any:
        """The song ``name``; ``UserError`` when it is not in the split or unreadable."""

    @abstractmethod
    def source(self, name: str) -> str:
        """Where the song came from (a corpus path or the file read), for the song table."""

    def meters(self, name: str) -> list[tuple[float, int, int]] | None:
        """Time signatures ``(start beat, numerator, denominator)`` the dataset records for
        the song, or None."""
        return None

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names


class ModelAdapter(Plugin, ABC):
    """The only door to a model: identity, data, tokens, rendering, forward passes, patching.

    *Identity* (after :meth:`load`): :attr:`checkpoint_sha256`, :attr:`model_config`,
    :attr:`d_model`, :meth:`hook_points`; :meth:`describe` without the weights.
    *Data* (no weights needed): :meth:`open_dataset`, :meth:`tokenize`,
    :meth:`event_vocabulary`, :meth:`render_notes`, :meth:`transpose`; with the weights:
    :meth:`check_dataset`, :meth:`song_windows`, :meth:`pad`.
    *Forward*: :meth:`run_with_hooks`, :meth:`run_with_patch`, :meth:`patched_logits`,
    :meth:`generate`, :meth:`label_target`, :meth:`input_embeddings`,
    :meth:`embed_coordinates`. Position t of a window predicts the window's row t+1.
    """

    kind = "model_adapter"

    # -- identity ------------------------------------------------------------------------

    @abstractmethod
    def load(self, model_dir: Path, device: str = "cpu") -> None:
        """Load the model found in ``model_dir`` onto ``device``."""

    def describe(self, model_dir: Path, device: str = "cpu") -> ModelInfo:
        """Width, hook points and size of the model in ``model_dir`` without loading its weights;
        raises ``UserError`` for what :meth:`load` would refuse (used by ``validate``)."""
        raise self._missing("describe")

    @abstractmethod
    def hook_points(self) -> list[str]:
        """Names of every hook point the loaded model offers."""

    @property
    def checkpoint_sha256(self) -> str:
        """SHA-256 of the loaded checkpoint file (recorded in stores and dictionaries)."""
        raise self._missing("checkpoint_sha256")

    @property
    def model_config(self) -> dict[str, Any]:
        """The loaded model's configuration as JSON values (recorded in stores)."""
        raise self._missing("model_config")

    @property
    def d_model(self) -> int:
        """Width of the residual stream of the loaded model."""
        raise self._missing("d_model")

    # -- data ----------------------------------------------------------------------------

    def open_dataset(self, path: Path, split: str | None = None) -> SongDataset:
        """The songs of the dataset folder ``path`` in ``split`` (None or ``all``, ``train``,
        ``valid``, ``test``); ``UserError`` naming the folder for what cannot be read."""
        raise self._missing("open_dataset")

    def data_format(self, path: Path, format: str) -> str:
        """What ``data.format`` means for the folder ``path``: ``notes`` (read as it is) or the
        format :meth:`import_data` converts (``auto``: guessed from the files); ``UserError``
        naming the folder when it holds nothing of that format."""
        if format == "notes":
            return "notes"
        raise self._missing(f"data.format {format!r} (it reads only notes datasets)")

    def import_data(self, path: Path, format: str, cache_dir: Path) -> Path:
        """Convert the music files of ``path`` (``format`` as :meth:`data_format` returned it)
        into a dataset inside ``cache_dir``, reused while the files and the conversion are
        unchanged; returns the dataset folder for :meth:`open_dataset`."""
        raise self._missing("import_data")

    def check_dataset(self, dataset: SongDataset) -> None:
        """``UserError`` when the dataset was encoded for another model than the loaded one."""

    def event_vocabulary(self) -> EventVocabulary:
        """What the coordinates ``event_type`` and ``instrument`` mean for this adapter."""
        raise self._missing("event_vocabulary")

    def tokenize(self, song: Any) -> SongTokens:
        """The whole song as tokens with their coordinates (:data:`COORDINATES`)."""
        raise self._missing("tokenize")

    def song_windows(self, tokens: SongTokens, stride: int | None = None) -> list[Window]:
        """Model windows covering every token of ``tokens`` once (needs :meth:`load`);
        ``stride``: the adapter's step between windows (None: its default)."""
        raise self._missing("song_windows")

    def pad(self, inputs: Sequence[np.ndarray]) -> Batch:
        """Window inputs (each (L_i, ...)) zero-padded into one :class:`Batch` (CPU tensors)."""
        raise self._missing("pad")

    @abstractmethod
    def token_metadata(self, codes: np.ndarray) -> Mapping[str, np.ndarray]:
        """Coordinates (:data:`COORDINATES`) of model input rows outside a song (a window,
        generated tokens); beats are those of the rows."""

    def render_notes(self, tokens: SongTokens) -> NoteTable:
        """The notes of a tokenized song, for piano rolls, MIDI and text."""
        raise self._missing("render_notes")

    def transpose(self, song: Any, semitones: int) -> Any | None:
        """The song with every pitch moved by ``semitones`` (None when a pitch leaves the
        model's range)."""
        raise self._missing("transpose")

    # -- forward passes and patching ----------------------------------------------------

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
        """Forward with ``fn`` replacing the activation at ``hook_point``; per-field next-token
        losses (and their sum ``total``) over real targets."""

    def patched_logits(
        self,
        batch: Batch,
        hook_point: str,
        fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """No-grad forward with ``fn`` replacing the activation at ``hook_point`` (None: clean);
        returns every output field's logits, ``{field: (B, T, n_field)}`` in the model's field
        order. Position t predicts token t+1. ``fn`` may replace the activation or add to it."""
        raise self._missing("patched_logits")

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
        """Up to ``steps`` new input rows continuing ``prompt`` with the model's own decoding
        rules, drawn from a generator seeded with ``seed`` (the same seed gives the same
        samples), optionally with ``patch = (hook point, fn)`` applied at every step."""
        raise self._missing("generate")

    def label_target(self, attribute: str, value: str) -> tuple[str, list[int] | None]:
        """Which output field a label ``attribute=value`` (see ``analyzers/attributes.py``)
        concerns, and, when the model predicts the label directly (``next.pitch_class=C``),
        the codes of that field whose summed probability is the label's probability (else
        None). Raises ``KeyError`` for an attribute the model has no field for."""
        raise self._missing("label_target")

    def input_embeddings(self) -> tuple[list[str], torch.Tensor]:
        """The loaded model's input embedding rows as directions of the residual stream:
        (names such as ``pitch=C4``, matrix (rows, d_model)). Analyses use them as the
        control "does the stream still carry the token's own input?"."""
        raise self._missing("input_embeddings")

    def embed_coordinates(self, coords: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str]:
        """The model's input embedding of tokens rebuilt from their stored coordinates, float32
        (n, d_model), and one line on what it leaves out."""
        raise self._missing("embed_coordinates")


# -- the activation store door (the reader lives in stores/reader.py) -------------------


class ActivationStore(Plugin, ABC):
    """Writes and reads extracted activations with per-token coordinates."""

    kind = "activation_store"

    @classmethod
    def recognizes(cls, path: Path) -> bool:
        """Whether ``path`` looks like a store this plugin wrote (checked before :meth:`open`)."""
        return False

    @abstractmethod
    def create(self, path: Path, *, hooks: Sequence[str], d_model: int, songs: Sequence[str],
               sources: Sequence[str], attrs: Mapping[str, Any], resume: bool = True,
               dtype: str = "float32") -> StoreWriter:
        """Start (or resume) a store. ``attrs`` records provenance; ``event_vocabulary``
        (:meth:`EventVocabulary.to_json`) and ``instrument_names`` in it describe the codes."""

    @abstractmethod
    def tokens_per_shard(self, n_hooks: int, d_model: int) -> int:
        """How many tokens a shard should hold."""

    def attach(self, path: Path, rank: int) -> StoreWriter:
        """Optional, for ``extract`` under ``torchrun``: a writer of rank ``rank``'s shards in
        the store that rank 0 opened with :meth:`create`. Its ``write_shard`` takes the
        shard's place (``index=``, ``token_start=``); rank 0's writer then gets
        ``join_parts()`` before ``finish``. Stores without it are written by one process."""
        raise NotImplementedError

    @abstractmethod
    def open(self, path: Path, *, verify: bool = False) -> StoreReader:
        """The checked store at ``path`` (``verify``: also compare every shard's checksum);
        ``UserError`` naming the file for what is wrong."""


# -- learners, analyzers, stages ----------------------------------------------------------


class DictionaryLearner(Plugin, ABC):
    """Learns a sparse dictionary (e.g. a sparse autoencoder) from stored activations."""

    kind = "dictionary_learner"


class Analyzer(Plugin, ABC):
    """Relates learned features to musical attributes and writes analysis outputs."""

    kind = "analyzer"

    @abstractmethod
    def analyze(self, ctx: AnalysisContext) -> dict[str, Any]:
        """Analyse ``ctx.dictionaries`` against ``ctx.store``; write only into ``ctx.out_dir``.

        Returns a small JSON summary: the run manifest records it and the report shows it.
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
    #: under ``torchrun``, run on every rank with ``ctx.dist`` set (:mod:`music_interpret.ranks`);
    #: otherwise rank 0 runs the stage alone
    distributed: ClassVar[bool] = False

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
