"""What an analyzer sees: :class:`AnalysisContext` (the store, the trained dictionaries,
where to write, and the doors to the pipeline's model and data)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:
    from ..config import PluginRef
    from ..doors import EventVocabulary
    from ..interfaces import ModelAdapter, SongDataset, StoreReader
    from ..learners.dictionary import Dictionary
    from ..plugins import PluginRegistry


@dataclass
class AnalysisContext:
    """Inputs and output folder of one analyzer (the contract third-party analyzers see).

    ``store_path``: the activation store (:attr:`store` opens it through its plugin);
    ``dictionaries`` maps a hook point to its dictionary folder (``weights.safetensors``,
    ``config.json``, ``metrics.json``; :meth:`load_dictionary` loads and checks one);
    ``out_dir`` is the analyzer's own folder (``reports/<run>/analyze/<analyzer>/``), the
    only place it writes; ``model_dir`` / ``data_dir`` / ``data_split`` and
    ``model_adapter`` (the pipeline's plugin reference) give the model and songs through
    :meth:`adapter` and :meth:`open_dataset`. ``sweeps`` maps a hook trained as a sweep to
    every member's folder ({label: folder}, in the sweep's order); ``dictionaries`` then
    holds the member the analyze stage chose. ``max_tokens`` caps the tokens an analysis
    reads (the first ones of the store); ``seed``, ``device``; ``train_dir`` is the train
    stage's output; ``extra`` is free room (caches).
    """

    store_path: Path
    dictionaries: dict[str, Path]
    out_dir: Path
    model_dir: Path | None = None
    data_dir: Path | None = None
    data_split: str = "all"
    device: str = "cpu"
    seed: int = 0
    max_tokens: int | None = None
    train_dir: Path | None = None
    progress_factory: Callable[..., Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    model_adapter: PluginRef | None = None  # the pipeline's model adapter
    registry: PluginRegistry | None = None
    sweeps: dict[str, dict[str, Path]] = field(default_factory=dict)

    @cached_property
    def store(self) -> StoreReader:
        """The checked activation store, opened by the store plugin that wrote it."""
        from ..stores import open_store

        return open_store(self.store_path, registry=self.registry)

    @property
    def vocabulary(self) -> EventVocabulary:
        """The event vocabulary of the store's tokens."""
        return self.store.vocabulary

    def _registry(self) -> PluginRegistry:
        from ..plugins import get_registry

        return self.registry or get_registry()

    def adapter(self, device: str | None = None) -> ModelAdapter | None:
        """The pipeline's model adapter, loaded (once per device); None without a model."""
        if self.model_adapter is None or self.model_dir is None:
            return None
        device = device or self.device
        cache = self.extra.setdefault("_adapters", {})
        if device not in cache:
            adapter = self.model_adapter.build(self._registry())
            adapter.load(self.model_dir, device=device)
            cache[device] = adapter
        return cache[device]

    def data_adapter(self) -> ModelAdapter:
        """The adapter that reads the songs, without its model: the pipeline's, else the one
        the store records, else the default."""
        from ..config import DEFAULT_ADAPTER

        if "_data_adapter" not in self.extra:
            if self.model_adapter is not None:
                adapter = self.model_adapter.build(self._registry())
            else:
                registry = self._registry()
                cls = registry.get("model_adapter", str(self.store.attrs.get("model_adapter")
                                                        or DEFAULT_ADAPTER))
                adapter = cls(cls.Config())
            self.extra["_data_adapter"] = adapter
        return self.extra["_data_adapter"]

    def open_dataset(self, split: str | None = None) -> SongDataset | None:
        """The pipeline's songs in ``split`` (default ``data_split``; ``all`` for every song),
        read by :meth:`data_adapter`; None without a data folder."""
        if self.data_dir is None:
            return None
        return self.data_adapter().open_dataset(self.data_dir, split or self.data_split)

    def input_embeddings(self) -> tuple[list[str], Any] | None:
        """The model's input-embedding rows (names, (rows, d_model) CPU tensor), or None when
        there is no model or its adapter does not offer them."""
        adapter = self.adapter("cpu")
        if adapter is None:
            return None
        try:
            names, rows = adapter.input_embeddings()
        except NotImplementedError:
            return None
        return names, rows.detach().float().cpu()

    def song_meters(self) -> dict[int, list[tuple[float, int, int]]]:
        """Time signatures ``(start beat, numerator, denominator)`` per store song index,
        where the dataset records them (``SongDataset.meters``)."""
        try:
            dataset = self.open_dataset()
        except (UserError, NotImplementedError):
            return {}
        if dataset is None:
            return {}
        out = {}
        for index, name in enumerate(self.store.songs):
            meters = dataset.meters(name) if name in dataset else None
            if meters:
                out[index] = meters
        return out

    def load_dictionary(self, hook: str) -> Dictionary:
        """The dictionary trained on ``hook``, checked against this store (hashes in its config)."""
        from ..learners.io import load_dictionary

        if hook not in self.dictionaries:
            raise UserError(f"no dictionary was trained for hook point {hook!r} "
                            f"(trained: {', '.join(self.dictionaries) or 'none'})")
        folder = self.dictionaries[hook]
        dictionary = load_dictionary(folder, device=self.device)
        check_dictionary_matches_store(dictionary.config, self.store, folder)
        return dictionary

    def progress(self, iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
        """A progress bar (tqdm) labelled by the caller."""
        if self.progress_factory is not None:
            return self.progress_factory(iterable, **kwargs)
        from tqdm.auto import tqdm

        return tqdm(iterable, disable=None, **kwargs)


def check_dictionary_matches_store(cfg: dict[str, Any], store: StoreReader, folder: Path) -> None:
    """A dictionary from another model, store or hook point is refused (one line, naming both)."""
    hook = cfg.get("hook_point")
    if hook not in store.hooks:
        raise UserError(f"{folder}: dictionary for hook point {hook!r}, which store {store.path} "
                        f"does not hold (hooks: {', '.join(store.hooks)})")
    data = cfg.get("data", {}) if isinstance(cfg.get("data"), dict) else {}
    model = cfg.get("model", {}) if isinstance(cfg.get("model"), dict) else {}
    store_sha = store.attrs.get("model_sha256")
    their_sha = model.get("sha256") or data.get("model_sha256")
    if store_sha and their_sha and store_sha != their_sha:
        raise UserError(f"{folder}: dictionary was trained on activations of model sha256 "
                        f"{their_sha[:12]}..., store {store.path} comes from {store_sha[:12]}...")
    if int(cfg.get("d_in", store.d_model)) != store.d_model:
        raise UserError(f"{folder}: dictionary d_in {cfg.get('d_in')} does not match the store's "
                        f"d_model {store.d_model}")
