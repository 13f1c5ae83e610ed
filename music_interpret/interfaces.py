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
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

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

if TYPE_CHECKING:  # heavy imports stay out of start-up
    import numpy as np
    import torch
    import xarray as xr

    from .analyzers.context import AnalysisContext
    from .config import Pipeline
    from .context import StageContext
    from .plugins import PluginRegistry
    from .rowmaps import MappedShard

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


# -- the activation store door ---------------------------------------------------------


class StoreWriter(Protocol):
    """What :meth:`ActivationStore.create` returns: appends shards of whole songs."""

    @property
    def next_song(self) -> int:
        """First song not yet in a complete shard (where a resumed run continues)."""

    @property
    def n_shards(self) -> int:
        """Complete shards written."""

    @property
    def n_tokens(self) -> int:
        """Tokens in complete shards."""

    def write_shard(self, acts: np.ndarray, coords: Mapping[str, np.ndarray],
                    song_start: int, song_stop: int) -> Any:
        """Write ``acts`` (n_tokens, n_hooks, d_model) float32 and the token coordinates."""

    def finish(self, summary: Mapping[str, Any] | None = None) -> None:
        """Mark the store complete."""


class BlockSource(Protocol):
    """Fast reads of one hook point's activations, as float32, shard by shard."""

    def pieces(self, shard: int, start: int, stop: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """Tokens [start, stop) of a shard as pieces ``(s, e, array)``."""

    def read(self, shard: int, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of a shard as a new (n, d_model) array."""

    def rows(self, shard: int, rows: np.ndarray) -> np.ndarray:
        """The tokens ``rows`` (sorted, unique) of a shard."""

    def close(self) -> None:
        """Release open files."""

    def __enter__(self) -> BlockSource: ...

    def __exit__(self, *exc: object) -> None: ...


class StoreReader(ABC):
    """Typed read access to one activation store (what :meth:`ActivationStore.open` returns).

    Tokens are numbered over the whole store, shard after shard; shards hold whole songs.
    The concrete helpers at the end are written against the abstract members.
    """

    path: Path

    @property
    @abstractmethod
    def store_name(self) -> str:
        """Name of the store plugin that wrote (and reads) the store."""

    @property
    @abstractmethod
    def store_id(self) -> str:
        """Unique id of the store (statistics and dictionaries record it)."""

    @property
    @abstractmethod
    def hooks(self) -> list[str]:
        """The hook points stored."""

    @property
    @abstractmethod
    def d_model(self) -> int:
        """Width of the stored activations."""

    @property
    @abstractmethod
    def dtype(self) -> str:
        """Stored precision (``float32``, ``float16``, ``bfloat16``); reads give float32."""

    @property
    @abstractmethod
    def n_tokens(self) -> int:
        """Tokens in the store."""

    @property
    @abstractmethod
    def attrs(self) -> dict[str, Any]:
        """What the writer recorded: model, checkpoint hash, dataset, split, events, ..."""

    @property
    def digest(self) -> str | None:
        """sha256 of what identifies the store's exact content (its manifest), if it has one."""
        return None

    @property
    def summary(self) -> dict[str, Any]:
        """What the writer recorded when it finished (counts, timings)."""
        return {}

    @property
    @abstractmethod
    def songs(self) -> list[str]:
        """The song table: song names (coordinate ``song`` indexes it)."""

    @property
    @abstractmethod
    def song_sources(self) -> list[str]:
        """Where each song of the table came from."""

    @property
    @abstractmethod
    def shard_table(self) -> list[ShardInfo]:
        """Every shard, in order."""

    @property
    @abstractmethod
    def vocabulary(self) -> EventVocabulary:
        """The event vocabulary of the adapter the activations came from."""

    @abstractmethod
    def hook_index(self, hook: str) -> int:
        """Position of ``hook`` among :attr:`hooks`; ``UserError`` naming the stored ones."""

    @abstractmethod
    def read_coords(self, shard: int, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Token coordinates of a shard (every stored one unless ``names`` is given)."""

    @abstractmethod
    def blocks(self, hook: str, lock: Any = None) -> BlockSource:
        """A reader of ``hook``'s activations (a context manager; close it)."""

    @abstractmethod
    def open_dataset(self, hooks: Sequence[str] | None = None, *, lazy: bool | None = None,
                     parallel: bool = False, chunk_tokens: int | None = None,
                     load_coords: bool = True) -> xr.Dataset:
        """The whole store as one ``xarray.Dataset`` (see :func:`~music_interpret.open_activations`)."""

    @abstractmethod
    def writer_options(self) -> dict[str, Any]:
        """Options of the store plugin's ``Config`` that write a store laid out like this one."""

    def map_shards(self) -> list[MappedShard]:
        """Every shard's activation rows memory-mapped (zero-copy training batches); raises
        :class:`~music_interpret.rowmaps.NotMappable` where the store cannot."""
        from .rowmaps import NotMappable

        raise NotMappable(f"{self.path}: the {self.store_name} store offers no memory maps")

    # -- helpers written against the members above ----------------------------------

    def read_block(self, shard: int, hook: str, start: int, stop: int) -> np.ndarray:
        """Activations (stop - start, d_model) float32 of tokens [start, stop) of a shard."""
        with self.blocks(hook) as reader:
            return reader.read(shard, start, stop)

    def iter_blocks(self, hook: str, block_tokens: int, max_tokens: int | None = None,
                    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(store offset, activations)`` blocks in store order, up to ``max_tokens``."""
        limit = self.n_tokens if max_tokens is None else max_tokens
        with self.blocks(hook) as reader:
            for shard in self.shard_table:
                n = min(shard.tokens, limit - shard.token_start)
                for start in range(0, max(n, 0), block_tokens):
                    yield shard.token_start + start, reader.read(shard.index, start,
                                                                 min(n, start + block_tokens))
                if shard.token_start + shard.tokens >= limit:
                    return

    def iter_coords(self, names: Sequence[str], max_tokens: int | None = None,
                    ) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """``(shard, tokens used, coordinates of the whole shard)`` in store order, stopping
        after ``max_tokens`` tokens."""
        left = self.n_tokens if max_tokens is None else min(max_tokens, self.n_tokens)
        for shard in self.shard_table:
            if left <= 0:
                return
            yield shard.index, min(left, shard.tokens), self.read_coords(shard.index, names)
            left -= shard.tokens

    def gather_coords(self, tokens: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Coordinates of the store tokens ``tokens`` (any shape; -1 stays -1), int32."""
        import numpy as np

        out = {k: np.full(tokens.shape, -1, np.int32) for k in names}
        for shard in self.shard_table:
            here = (tokens >= shard.token_start) & (tokens < shard.token_start + shard.tokens)
            if here.any():
                coords = self.read_coords(shard.index, names)
                for k in names:
                    out[k][here] = coords[k][tokens[here] - shard.token_start]
        return out

    def read_rows(self, hook: str, index: np.ndarray, chunk: int = 16_384) -> np.ndarray:
        """Activations (n, d_model) float32 of the store tokens ``index`` (sorted)."""
        import numpy as np

        out = np.empty((len(index), self.d_model), np.float32)
        with self.blocks(hook) as reader:
            for shard in self.shard_table:
                offset = shard.token_start
                for s in range(0, shard.tokens, chunk):
                    e = min(shard.tokens, s + chunk)
                    a, b = np.searchsorted(index, [offset + s, offset + e])
                    if a < b:
                        out[a:b] = reader.read(shard.index, s, e)[index[a:b] - offset - s]
        return out

    def statistics(self, stats: Any = None) -> xr.Dataset:
        """The preprocess statistics of this store (``<store>/stats/stats.nc`` unless
        ``stats`` names a file, folder or Dataset); ``UserError`` when missing or when they
        belong to another store."""
        from .stats import check_stats_for, load_stats

        ds = load_stats(self.path / "stats" if stats is None else stats)
        check_stats_for(ds, self)
        return ds


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
