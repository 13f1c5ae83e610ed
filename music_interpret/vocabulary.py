"""Which event vocabulary applies: the one a store records, else its adapter's.

A store written by the ``extract`` stage records the model adapter's
:class:`~music_interpret.doors.EventVocabulary` (``event_vocabulary`` in its attrs).
Stores written before that, and stores written without one (tests, other tools), get the
vocabulary of the adapter they name (``model_adapter``; the default adapter when they name
none), asked through the plugin registry; their ``instrument_names`` replace the
adapter's instrument names when recorded.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

from .config import DEFAULT_ADAPTER
from .doors import EventVocabulary
from .errors import UserError

ATTR = "event_vocabulary"


@functools.lru_cache(maxsize=16)
def adapter_vocabulary(name: str = DEFAULT_ADAPTER) -> EventVocabulary:
    """The event vocabulary of the installed model adapter ``name`` (no model is loaded)."""
    from .plugins import get_registry, unknown_plugin_message

    registry = get_registry()
    cls = registry.find("model_adapter", name)
    if cls is None:
        raise UserError(unknown_plugin_message(registry, "model_adapter", name))
    return cls(cls.Config()).event_vocabulary()


def default_vocabulary() -> EventVocabulary:
    """The vocabulary of the default model adapter (for coordinates that name no store)."""
    return adapter_vocabulary(DEFAULT_ADAPTER)


def store_vocabulary(attrs: Mapping[str, Any]) -> EventVocabulary:
    """The vocabulary of a store from its attrs (see the module doc)."""
    import dataclasses

    recorded = attrs.get(ATTR)
    if isinstance(recorded, str):
        try:
            recorded = json.loads(recorded)
        except ValueError:
            recorded = None
    if isinstance(recorded, Mapping):
        try:
            return EventVocabulary.from_json(recorded)
        except ValueError as exc:
            raise UserError(f"the store's {ATTR} is malformed ({exc})") from None
    vocabulary = adapter_vocabulary(str(attrs.get("model_adapter") or DEFAULT_ADAPTER))
    names = attrs.get("instrument_names")
    if isinstance(names, str):
        names = json.loads(names)
    if names:
        vocabulary = dataclasses.replace(vocabulary, instruments=tuple(str(n) for n in names))
    return vocabulary
