"""The ``note_stats`` stage: what is in the note dataset, in numbers.

The songs are read, tokenized and rendered back to notes by the pipeline's model adapter
(``model.adapter``, the default adapter without a model section), through the door of
:mod:`music_interpret.plugin`: the counts are those of the notes and tokens the model
sees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from music_interpret.plugin import RESOLUTION, Stage, StageContext, window_ranges


@dataclass
class NoteStatsConfig:
    """Options of ``note_stats``."""

    context: int = 1024
    top_programs: int = 8

    def __post_init__(self) -> None:
        if self.context < 2:
            raise ValueError(f"context must be at least 2, got {self.context}")


class NoteStats(Stage):
    """Profile the pipeline's note dataset."""

    name = "note_stats"
    description = "Profile the note dataset: songs, tokens, instruments, pitch/onset/duration histograms."
    Config = NoteStatsConfig
    requires: ClassVar[tuple[str, ...]] = ("data",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        import xarray as xr

        data = ctx.pipeline.header.data
        assert data is not None
        adapter = ctx.data_adapter()
        dataset = adapter.open_dataset(data.path, data.split)
        pitch = np.zeros(128, np.int64)
        position = np.zeros(RESOLUTION, np.int64)
        program = np.zeros(128, np.int64)
        duration = np.zeros(8 * RESOLUTION + 1, np.int64)  # last bin: 8 beats or longer
        songs: dict[str, list[float]] = {k: [] for k in ("notes", "beats", "instruments", "tokens",
                                                         "windows", "polyphony")}
        for name in ctx.progress(dataset.names, total=len(dataset), unit="song"):
            song = adapter.tokenize(dataset.read(name))
            notes = adapter.render_notes(song)
            beat, pos, pit, dur, prog = (notes.beat, notes.position, notes.pitch, notes.duration,
                                         notes.program)
            np.add.at(pitch, np.clip(pit, 0, 127), 1)
            np.add.at(position, np.clip(pos, 0, RESOLUTION - 1), 1)
            np.add.at(program, np.clip(prog, 0, 127), 1)
            np.add.at(duration, np.clip(dur, 0, len(duration) - 1), 1)
            n_instruments = len(np.unique(prog))
            tokens = len(song)  # every token of the song, as the model reads it
            onsets = beat * RESOLUTION + pos
            songs["notes"].append(len(notes))
            songs["beats"].append(int(beat.max()) + 1 if len(notes) else 0)
            songs["instruments"].append(n_instruments)
            songs["tokens"].append(tokens)
            songs["windows"].append(len(window_ranges(tokens, ctx.config.context)))
            songs["polyphony"].append(len(notes) / max(1, len(np.unique(onsets))))
        per_song = {k: np.asarray(v) for k, v in songs.items()}
        ds = xr.Dataset(
            {
                "pitch_count": (("pitch",), pitch),
                "position_count": (("position",), position),
                "program_count": (("program",), program),
                "duration_count": (("duration",), duration),
                **{f"song_{k}": (("song",), v) for k, v in per_song.items()},
            },
            coords={
                "pitch": np.arange(128),
                "position": np.arange(RESOLUTION),
                "program": np.arange(128),
                "duration": np.arange(len(duration)),
                "song": list(dataset.names),
            },
            attrs={
                "title": "note dataset profile",
                "source": str(dataset.location),
                "split": data.split,
                "resolution": RESOLUTION,
                "duration_note": "in 1/12 beats; the last bin counts 8 beats or longer",
            },
        )
        ds.to_netcdf(ctx.work_dir / "note_stats.nc")
        total_notes = int(per_song["notes"].sum())
        used = np.nonzero(program)[0]
        order = used[np.argsort(-program[used], kind="stable")][: ctx.config.top_programs]
        nz = np.nonzero(pitch)[0]
        summary = {
            "dataset": str(dataset.location),
            "split": data.split,
            "songs": len(dataset),
            "notes": total_notes,
            "beats": int(per_song["beats"].sum()),
            "tokens": int(per_song["tokens"].sum()),
            "windows": int(per_song["windows"].sum()),
            "context": ctx.config.context,
            "pitch_range": [int(nz.min()), int(nz.max())] if len(nz) else None,
            "mean_pitch": float((pitch * np.arange(128)).sum() / max(1, total_notes)),
            "on_beat_fraction": float(position[0] / max(1, total_notes)),
            "mean_polyphony": float(per_song["polyphony"].mean()),
            "notes_per_program": {int(p): int(program[p]) for p in order},
        }
        (ctx.work_dir / "note_stats.json").write_text(json.dumps(summary, indent=2) + "\n")
        (ctx.work_dir / "summary.txt").write_text(_readable(summary))
        return {k: summary[k] for k in ("songs", "notes", "tokens", "windows")}


def _readable(s: dict[str, Any]) -> str:
    lines = [
        f"dataset      {s['dataset']} (split {s['split']})",
        f"songs        {s['songs']}",
        f"notes        {s['notes']}  ({s['beats']} beats)",
        f"tokens       {s['tokens']}  -> {s['windows']} model windows of {s['context']} tokens",
        f"pitch range  {s['pitch_range']}  (mean {s['mean_pitch']:.1f})",
        f"on the beat  {100 * s['on_beat_fraction']:.1f}% of notes",
        f"polyphony    {s['mean_polyphony']:.2f} notes per onset",
        "notes per GM program: " + ", ".join(f"{p}: {n}" for p, n in s["notes_per_program"].items()),
    ]
    return "\n".join(lines) + "\n"
