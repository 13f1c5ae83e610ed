"""``data.format``: a folder of the user's music files as the pipeline's data.

With ``format: notes`` (the default) ``data.path`` is read as it is. With ``midi``,
``musicxml`` or ``auto`` the model adapter that reads the data (:meth:`ModelAdapter.data_format`,
:meth:`ModelAdapter.import_data`) converts the folder once, at the start of a run, into a
dataset inside the run folder (``<run>/imported/``), reused while the files and the
conversion are unchanged; the stages then read that dataset (``data.path`` points to it
for the rest of the run and ``data.converted_from`` keeps the folder the user named).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .config import DEFAULT_ADAPTER, Pipeline
from .errors import UserError

if TYPE_CHECKING:
    from .interfaces import ModelAdapter
    from .plugins import PluginRegistry

IMPORT_FOLDER = "imported"


def data_adapter(pipeline: Pipeline, registry: PluginRegistry) -> ModelAdapter:
    """The adapter that reads the pipeline's data (``model.adapter``, else the default), unloaded."""
    model = pipeline.header.model
    if model is not None:
        return model.adapter.build(registry)
    cls = registry.get("model_adapter", DEFAULT_ADAPTER)
    return cls(cls.Config())


def resolved_format(pipeline: Pipeline, registry: PluginRegistry) -> str:
    """``notes`` or the format the data folder is converted from; ``UserError`` naming the key."""
    data = pipeline.header.data
    if data is None or data.format == "notes":
        return "notes"
    adapter = data_adapter(pipeline, registry)
    try:
        return adapter.data_format(data.path, data.format)
    except NotImplementedError as exc:
        raise UserError(f"data.format: {exc}") from None
    except UserError as exc:
        raise UserError(f"data.path: {exc}") from None


def data_problems(pipeline: Pipeline, registry: PluginRegistry) -> list[str]:
    """What ``validate`` reports about ``data.format`` (one line each)."""
    try:
        resolved_format(pipeline, registry)
    except UserError as exc:
        return [str(exc)]
    return []


def import_data(pipeline: Pipeline, registry: PluginRegistry) -> None:
    """Convert the data folder when ``data.format`` asks for it and point ``data.path`` to
    the dataset (call with the run folder locked)."""
    data = pipeline.header.data
    if data is None or data.converted_from is not None:
        return
    format = resolved_format(pipeline, registry)
    if format == "notes":
        return
    adapter = data_adapter(pipeline, registry)
    folder = adapter.import_data(data.path, format, pipeline.run_dir / IMPORT_FOLDER)
    data.converted_from, data.path, data.format = data.path, Path(folder), "notes"
