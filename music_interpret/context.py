"""What a stage sees: :class:`StageContext` (its config, where to write, what ran before,
and the doors to the pipeline's model, data and activation stores)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Pipeline
from .errors import UserError
from .outputs import MARKER
from .ranks import DistInfo

if TYPE_CHECKING:
    from .interfaces import ModelAdapter, SongDataset, StoreReader
    from .plugins import PluginRegistry


@dataclass
class StageContext:
    """What a stage sees: its config, where to write, and what ran before it."""

    name: str
    config: Any
    pipeline: Pipeline
    registry: PluginRegistry
    out_dir: Path
    work_dir: Path
    upstream: dict[str, Path] = field(default_factory=dict)
    force: bool = False
    fingerprint: str = ""
    #: this process's rank when a ``distributed`` stage runs under ``torchrun``
    #: (:mod:`music_interpret.ranks`); the world of one otherwise
    dist: DistInfo = field(default_factory=DistInfo)

    @property
    def run_dir(self) -> Path:
        return self.pipeline.run_dir

    @property
    def seed(self) -> int:
        return self.pipeline.header.seed

    @property
    def device(self) -> str:
        """``cpu``/``cuda``/...; ``auto`` picks CUDA when available."""
        from .resources import resolve_device

        return resolve_device(self.pipeline.header.device)

    def output_of(self, stage: str) -> Path:
        """Published output folder of an earlier stage; UserError when it has not run."""
        path = self.upstream.get(stage)
        if path is None or not (path / MARKER).exists():
            raise UserError(f"stage {self.name!r} needs the output of stage {stage!r}, "
                            f"which has not completed for run {self.pipeline.header.run!r}")
        return path

    def open_store(self, path: Path, *, verify: bool = False) -> StoreReader:
        """The activation store at ``path``, opened by the store plugin that wrote it."""
        from .stores import open_store

        return open_store(path, verify=verify, registry=self.registry)

    def data_adapter(self) -> ModelAdapter:
        """The model adapter that reads the pipeline's data (``model.adapter``, or the default
        adapter in a pipeline without a model section), built but not loaded."""
        from .datainput import data_adapter

        return data_adapter(self.pipeline, self.registry)

    def model_adapter(self, device: str | None = None) -> ModelAdapter:
        """The pipeline's model adapter with its model loaded onto ``device`` (default: the
        pipeline's device); UserError without a model section."""
        model = self.pipeline.header.model
        if model is None:
            raise UserError(f"stage {self.name!r} needs the pipeline's model section")
        adapter = model.adapter.build(self.registry)
        adapter.load(model.path, device=device or self.device)
        return adapter

    def open_dataset(self, split: str | None = None) -> SongDataset:
        """The pipeline's data (``data.path``), read by :meth:`data_adapter`, in ``split``
        (default: ``data.split``)."""
        data = self.pipeline.header.data
        if data is None:
            raise UserError(f"stage {self.name!r} needs the pipeline's data section")
        return self.data_adapter().open_dataset(data.path, split or data.split)

    def progress(self, iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
        """A tqdm progress bar labelled with the stage name."""
        from tqdm.auto import tqdm

        kwargs.setdefault("desc", self.name)
        kwargs.setdefault("dynamic_ncols", True)
        kwargs.setdefault("disable", None if self.dist.main else True)  # None: off when not a terminal
        return tqdm(iterable, **kwargs)
