"""What an analyzer sees: the store, the trained dictionaries, and where to write."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..stores.netcdf import StoreInfo, check_store


@dataclass
class AnalysisContext:
    """Inputs and output folder of one analyzer.

    ``dictionaries`` maps a hook point to its dictionary folder (``weights.safetensors``,
    ``config.json``, ``metrics.json``); ``out_dir`` is the analyzer's own folder
    (``reports/<run>/analyze/<analyzer>/``); ``model_dir`` / ``data_dir`` come from the
    pipeline so analyzers can re-read notes (e.g. for context windows). ``sweeps`` maps a
    hook trained as a sweep to every member's folder ({label: folder}, in the sweep's
    order); ``dictionaries`` then holds the member the analyze stage chose.
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
    progress_factory: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    model_adapter: Any = None  # the pipeline's PluginRef of the model adapter
    registry: Any = None
    sweeps: dict[str, dict[str, Path]] = field(default_factory=dict)

    def adapter(self, device: str | None = None) -> Any:
        """The pipeline's model adapter, loaded (once per device); None without a model."""
        if self.model_adapter is None or self.registry is None or self.model_dir is None:
            return None
        device = device or self.device
        cache = self.extra.setdefault("_adapters", {})
        if device not in cache:
            adapter = self.model_adapter.build(self.registry)
            adapter.load(self.model_dir, device=device)
            cache[device] = adapter
        return cache[device]

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
        """Time signatures ``(start beat, numerator, denominator)`` per store song index, from
        the dataset's ``sources.json`` (``meters`` of each song) where it records them."""
        if self.data_dir is None:
            return {}
        from ..adapters.mmt.dataset import open_dataset

        try:
            sources = open_dataset(self.data_dir, self.data_split).sources or {}
        except UserError:
            return {}
        songs = sources.get("songs", sources) if isinstance(sources, dict) else {}
        out = {}
        for index, name in enumerate(self.store.songs):
            info = songs.get(name) if isinstance(songs, dict) else None
            meters = info.get("meters") if isinstance(info, dict) else None
            if meters:
                out[index] = [(float(b), int(n), int(d)) for b, n, d in meters]
        return out

    @cached_property
    def store(self) -> StoreInfo:
        """The checked activation store."""
        return check_store(self.store_path)

    def load_dictionary(self, hook: str) -> Any:
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


def check_dictionary_matches_store(cfg: dict[str, Any], store: StoreInfo, folder: Path) -> None:
    """A dictionary from another model, store or hook point is refused (one line, naming both)."""
    hook = cfg.get("hook_point")
    if hook not in store.hooks:
        raise UserError(f"{folder}: dictionary for hook point {hook!r}, which store {store.path} "
                        f"does not hold (hooks: {', '.join(store.hooks)})")
    data = cfg.get("data", {}) if isinstance(cfg.get("data"), dict) else {}
    model = cfg.get("model", {}) if isinstance(cfg.get("model"), dict) else {}
    store_sha = store.manifest.get("attrs", {}).get("model_sha256")
    their_sha = model.get("sha256") or data.get("model_sha256")
    if store_sha and their_sha and store_sha != their_sha:
        raise UserError(f"{folder}: dictionary was trained on activations of model sha256 "
                        f"{their_sha[:12]}..., store {store.path} comes from {store_sha[:12]}...")
    if int(cfg.get("d_in", store.d_model)) != store.d_model:
        raise UserError(f"{folder}: dictionary d_in {cfg.get('d_in')} does not match the store's "
                        f"d_model {store.d_model}")
