"""The model and note data a store was extracted from, as its attrs record them (any store).

Stores written since format 2 record ``model_adapter``, ``model_path`` and ``data_path``;
older ones only the extract stage's ``source`` line (``<adapter> adapter; checkpoint
<path> sha256 <hash>``) and the notes folder (``dataset``), which are parsed instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SOURCE = re.compile(r"^(?P<adapter>\S+) adapter; checkpoint (?P<path>.+) sha256 (?P<sha>[0-9a-f]+)$")


@dataclass(frozen=True)
class Recorded:
    """Where a store's activations came from."""

    adapter: str
    model_path: Path
    data_path: Path
    sha256: str | None


def source_checkpoint(source: str | None) -> str | None:
    """The checkpoint path of an extract ``source`` line, if it is one."""
    match = _SOURCE.match(str(source or ""))
    return match["path"] if match else None


def recorded_inputs(attrs: dict[str, Any]) -> Recorded | str:
    """The recorded model and data when both still exist, else why not (one phrase)."""
    adapter, model, data = attrs.get("model_adapter"), attrs.get("model_path"), attrs.get("data_path")
    match = _SOURCE.match(str(attrs.get("source") or ""))
    if model is None and match:
        adapter, model = match["adapter"], match["path"]
    adapter = adapter or "mmt"
    data = data or attrs.get("dataset")
    if not model or not data:
        return "the store records no model and data"
    model_path, data_path = Path(model), Path(data)
    for what, path in (("model", model_path), ("data", data_path)):
        if not path.is_dir():
            return f"the {what} the store was extracted from is gone ({path})"
    return Recorded(str(adapter), model_path, data_path, attrs.get("model_sha256"))
