"""Which MMT output field a musical label concerns, and which codes make up its value.

Labels are ``attribute=value`` as :mod:`music_interpret.analyzers.attributes` names them
(``next.pitch_class=C``, ``position=6``, ``next.duration=1/2``). MMT predicts token t+1's
six fields at t, so a ``next.X`` label whose attribute is one field's value (or a union of
them: a pitch class, an octave) has a predicted probability: the summed probability of
its codes. Every other label (at t, or derived like ``next.key``) is tied only to a field.
"""

from __future__ import annotations

from fractions import Fraction

from .representation import INSTRUMENT_CODE_MAP, KNOWN_DURATIONS, TYPE_NAMES

NEXT = "next."
PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")

#: base attribute -> the output field whose prediction it concerns
FIELD_OF = {
    "event_type": "type",
    "beat_step": "beat", "beat_mod4": "beat",
    "position": "position", "metric_strength": "position",
    "duration": "duration",
    "instrument": "instrument",
    **{a: "pitch" for a in (
        "pitch", "pitch_class", "octave", "voice_interval_from_prev", "voice_interval_to_next",
        "voice_prev_pitch_class", "voice_next_pitch_class", "key", "local_key", "scale_degree",
        "chord_root", "chord_quality", "roman_numeral", "voice_role")},
}  # fmt: skip

#: attributes whose value t predicts directly (as ``next.X``)
DIRECT = ("event_type", "pitch", "pitch_class", "octave", "position", "duration", "instrument")


def _pitch(value: str) -> int:
    name, octave = value.rstrip("-0123456789"), value[len(value.rstrip("-0123456789")):]
    return PITCH_CLASSES.index(name) + 12 * (int(octave) + 1)


def value_codes(attribute: str, value: str) -> list[int]:
    """Codes (of the attribute's field) whose token has ``attribute == value``; raises
    ``ValueError`` for a value the attribute does not take."""
    if attribute == "event_type":
        return [TYPE_NAMES.index(value)]
    if attribute == "pitch":
        p = _pitch(value)
        if not 0 <= p <= 127:
            raise ValueError(f"pitch {value!r} out of range")
        return [p + 1]
    if attribute == "pitch_class":
        pc = PITCH_CLASSES.index(value)
        return [p + 1 for p in range(128) if p % 12 == pc]
    if attribute == "octave":
        o = int(value)
        return [p + 1 for p in range(128) if p // 12 == o + 1]
    if attribute == "position":
        pos = int(value)
        if not 0 <= pos < 12:
            raise ValueError(f"position {value!r} out of range")
        return [pos + 1]
    if attribute == "duration":
        ticks = Fraction(value) * 12
        return [KNOWN_DURATIONS.index(int(ticks)) + 1]
    if attribute == "instrument":
        return [0] if value == "none" else [INSTRUMENT_CODE_MAP[value]]
    raise ValueError(f"{attribute} is not one field's value")


def label_target(attribute: str, value: str) -> tuple[str, list[int] | None]:
    """(field, codes or None): see :meth:`MMTAdapter.label_target`."""
    base = attribute[len(NEXT):] if attribute.startswith(NEXT) else attribute
    field = FIELD_OF[base]
    if not attribute.startswith(NEXT) or base not in DIRECT:
        return field, None
    try:
        codes = value_codes(base, value)
    except (ValueError, KeyError) as exc:
        raise KeyError(f"{attribute}={value}: {exc}") from None
    return field, codes
