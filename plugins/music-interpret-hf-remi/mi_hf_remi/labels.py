"""Which output a musical label concerns for a REMI language model, and which token ids
make up its value.

The model has one output, ``token``: at t it predicts token t+1 of the window. A label
``next.X=value`` is predicted directly when token t+1 itself carries X: the event type
of any token, the pitch (class, octave) of a ``Pitch`` token, the instrument of a
``Program`` token. Its probability is then the summed probability of those token ids.
A note's position and duration are written by *other* tokens than the Pitch token the
note attributes sit on (the Position before it, the Duration after it), so
``next.position`` and ``next.duration`` labels, and every label at t, are tied to
``token`` without a probability.
"""

from __future__ import annotations

from .remi import EVENTS, PITCH_NAMES, Vocabulary, instrument_names

NEXT = "next."
FIELD = "token"
KNOWN = ("event_type", "pitch", "pitch_class", "octave", "position", "beat_step", "beat_mod4",
         "duration", "instrument", "voice_interval_from_prev", "voice_interval_to_next",
         "voice_prev_pitch_class", "voice_next_pitch_class", "key", "local_key", "scale_degree",
         "chord_root", "chord_quality", "roman_numeral", "voice_role", "metric_strength")


def _pitch(value: str) -> int:
    name = value.rstrip("-0123456789")
    return PITCH_NAMES.index(name) + 12 * (int(value[len(name):]) + 1)


def value_ids(vocab: Vocabulary, attribute: str, value: str) -> list[int] | None:
    """Token ids whose token is ``attribute == value``; None when no single token carries the
    attribute (see the module docstring); ``KeyError`` for an unknown value."""
    try:
        if attribute == "event_type":
            return vocab.ids(EVENTS[EVENTS.index(value)])
        if attribute == "pitch":
            return vocab.ids("Pitch", [_pitch(value)])
        if attribute == "pitch_class":
            pc = PITCH_NAMES.index(value)
            return vocab.ids("Pitch", [p for p in range(128) if p % 12 == pc])
        if attribute == "octave":
            return vocab.ids("Pitch", [p for p in range(128) if p // 12 == int(value) + 1])
        if attribute == "instrument":
            names = instrument_names()
            return [] if value == "none" else vocab.ids("Program", [names.index(value) - 1])
    except ValueError as exc:
        raise KeyError(f"{attribute}={value}: {exc}") from None
    return None


def label_target(vocab: Vocabulary, attribute: str, value: str) -> tuple[str, list[int] | None]:
    """(``token``, ids or None) of a label; ``KeyError`` for an attribute REMI has no token for."""
    base = attribute.removeprefix(NEXT)
    if base not in KNOWN:
        raise KeyError(attribute)
    if not attribute.startswith(NEXT):
        return FIELD, None
    return FIELD, value_ids(vocab, base, value)
