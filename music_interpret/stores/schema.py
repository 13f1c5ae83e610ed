"""What a store's shards hold: token coordinates with their CF attributes, and the
stored precision of the activations.

Activations are computed in float32 and stored as

* ``float32``: the variable ``activations`` (NC_FLOAT);
* ``float16`` / ``bfloat16``: the variable ``activation_bits`` (NC_USHORT) holding the
  16-bit patterns, with the attribute ``music_interpret_dtype`` naming the format.
  netCDF has no 16-bit float type (netCDF-C even crashes on HDF5 half floats), so the
  bit patterns are the portable form; every reader of the package decodes them to
  float32 (:func:`decode`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

FORMAT = "music-interpret-activations"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "store.json"
SONGS_FILE = "songs.nc"
COORD_CHUNK_FACTOR = 4  # coordinates (and dask chunks) span this many activation chunks
DTYPES = ("float32", "float16", "bfloat16")
FLOAT16_MAX = 65504.0
ACTIVATIONS = "activations"
BITS = "activation_bits"
#: what every per-token coordinate is relative to: the token index over the whole store
TOKEN = "token"

#: coordinates on every token: name -> (netCDF type, description)
TOKEN_COORDS: dict[str, tuple[str, str]] = {
    "song": ("i4", "song index: row of the song table (song_name, song_source in songs.nc)"),
    "seq_pos": ("i4", "position of the token in the model input window"),
    "song_token": ("i4", "position of the token in the whole song's token sequence"),
    "window": ("i4", "index of the model window (of this song) the activation comes from"),
    "event_type": ("i1", "event type (flag_meanings: the model adapter's event vocabulary)"),
    "beat": ("i4", "beat of the note onset in the song, in beats from the song's start"),
    "position": ("i2", "onset inside the beat, in twelfths of a beat"),
    "pitch": ("i2", "MIDI pitch of the note"),
    "duration": ("i4", "duration of the note, in twelfths of a beat"),
    "instrument": ("i2", "instrument code of the model adapter (flag_meanings: its names)"),
    "program": ("i2", "General MIDI program"),
}
#: coordinates holding -1 where they do not apply
NOT_APPLICABLE = {"beat": "not a note", "position": "not a note", "pitch": "not a note",
                  "duration": "not a note", "instrument": "no instrument", "program": "no program"}
#: dimensionless quantities (CF units "1"); indices and categories carry no units
DIMENSIONLESS = ("beat", "position", "pitch", "duration")
VALID_MAX = {"pitch": 127, "program": 127, "position": 11}


def coord_attrs(name: str, instrument_names: Sequence[str] | None = None,
                events: Sequence[str] = ()) -> dict[str, Any]:
    """CF attributes of token coordinate ``name`` (long_name, units, valid range, flags);
    ``events``: the event type names (flags of ``event_type``)."""
    kind, doc = TOKEN_COORDS[name]
    cast = np.dtype(kind).type
    attrs: dict[str, Any] = {"long_name": doc}
    if name in DIMENSIONLESS:
        attrs["units"] = "1"
    if name == "event_type":
        if events:
            attrs["flag_values"] = np.arange(len(events), dtype=np.int8)
            attrs["flag_meanings"] = " ".join(e.replace("-", "_").replace(" ", "_") for e in events)
    else:
        attrs["valid_min"] = cast(0)
    if name in VALID_MAX:
        attrs["valid_max"] = cast(VALID_MAX[name])
    if name == "instrument" and instrument_names:
        codes = [i for i, n in enumerate(instrument_names) if i and n]
        attrs["flag_values"] = np.asarray(codes, dtype=np.int16)
        attrs["flag_meanings"] = " ".join(instrument_names[i].replace(" ", "_") for i in codes)
    if name in NOT_APPLICABLE:
        attrs["comment"] = (f"-1 where it does not apply ({NOT_APPLICABLE[name]}); -1 lies "
                            "outside [valid_min, valid_max] and is kept as an integer, "
                            "not a fill value")
    return attrs


def token_attrs() -> dict[str, Any]:
    """Attributes of the ``token`` index coordinate."""
    return {"long_name": "token index in the whole store (0 = first token of shard 0)",
            "valid_min": np.int64(0)}


def activation_attrs(dtype: str) -> dict[str, Any]:
    """Attributes of the stored activation variable (before ``coordinates``)."""
    attrs: dict[str, Any] = {"long_name": "residual stream activation", "units": "1"}
    if dtype != "float32":
        attrs["long_name"] = f"residual stream activation as {dtype} bit patterns"
        attrs["music_interpret_dtype"] = dtype
        attrs["comment"] = (
            "16-bit patterns of the activations: float16 is IEEE 754 binary16, bfloat16 is "
            "the upper half of a float32 (float32 bits = uint32(x) << 16). "
            "music_interpret.open_activations and every reader of the package decode them "
            "to float32 as the variable 'activations'.")
    return attrs


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def variable(dtype: str) -> str:
    """Name of the stored activation variable for ``dtype``."""
    return ACTIVATIONS if dtype == "float32" else BITS


def itemsize(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def encode(acts: np.ndarray, dtype: str) -> np.ndarray:
    """float32 activations in their stored form (float32, or uint16 bit patterns; rounded
    to nearest even)."""
    acts = np.ascontiguousarray(acts, dtype=np.float32)
    if dtype == "float32":
        return acts
    if dtype == "float16":
        return acts.astype(np.float16).view(np.uint16)
    import torch

    return torch.from_numpy(acts).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def decode(stored: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Stored activations as float32 (into ``out`` when given)."""
    if dtype == "float32":
        if out is None:
            return np.asarray(stored, dtype=np.float32)
        out[...] = stored
        return out
    bits = np.asarray(stored).view(np.uint16)
    if out is None:
        out = np.empty(bits.shape, np.float32)
    if dtype == "float16":
        out[...] = bits.view(np.float16)
    else:
        np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


def torch_dtype(dtype: str) -> Any:
    """The torch dtype whose bit layout the stored rows have."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
