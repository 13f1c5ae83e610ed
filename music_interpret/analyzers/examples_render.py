"""Musical context of a top-activating token, drawn three ways: piano roll, MIDI, text.

A :class:`Context` holds the notes of a song that sound within ``context_beats`` of
the activating token (all instruments), with the activating note marked. The notes are
the model adapter's rendering of the song's tokens
(:class:`~music_interpret.doors.NoteTable`: beat, position, pitch, duration, program,
instrument name; position and duration in 1/12 beats, ``RESOLUTION``).

:func:`render_latent` draws one latent from a :class:`LatentJob` (plain, picklable
data); :func:`render_all` runs it in process or on ``spawn`` worker processes.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from concurrent.futures import Future

import numpy as np

from ..doors import RESOLUTION, EventVocabulary, NoteTable

PITCH_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
TICKS_PER_BEAT = 480


def pitch_name(pitch: int) -> str:
    """MIDI pitch as a note name with octave (60 -> C4)."""
    return f"{PITCH_NAMES[pitch % 12]}{pitch // 12 - 1}" if pitch >= 0 else "-"


@dataclass
class Example:
    """One top-activating token of a latent."""

    latent: int
    rank: int
    song: str
    song_token: int
    activation: float
    event_type: int
    beat: int
    position: int
    pitch: int
    instrument: int
    vocabulary: EventVocabulary

    def token_label(self) -> str:
        """What the token is, in words (in the store's event vocabulary)."""
        events, names = self.vocabulary.events, self.vocabulary.instruments
        kind = events[self.event_type] if 0 <= self.event_type < len(events) else "?"
        inst = names[self.instrument] if 0 < self.instrument < len(names) else ""
        if self.event_type == self.vocabulary.note:
            return f"{kind} {pitch_name(self.pitch)} ({self.pitch}) {inst} at beat {self.beat}+{self.position}"
        if inst:
            return f"{kind} row: {inst}"
        return kind


@dataclass
class Context:
    """Notes around an activating token; ``target`` is the activating note's row (or None)."""

    notes: NoteTable
    target: int | None
    start: float
    stop: float
    onset: float


def context_for(song: NoteTable, song_token: int, context_beats: float) -> Context:
    """Notes sounding within ``context_beats`` before/after the token (tokens before the
    first note: the song's start; after the last: its end)."""
    on = song.onsets().astype(np.float64)
    end = on + np.maximum(song.duration, 1) / RESOLUTION
    hits = np.flatnonzero(song.token == song_token)
    row = int(hits[0]) if len(hits) else -1
    if row >= 0:
        onset = float(on[row])
    elif not len(on) or song_token < int(song.token.min()):
        onset = float(on.min()) if len(on) else 0.0
    else:  # after the notes: the last bars
        onset = float(end.max())
    start, stop = max(0.0, onset - context_beats), onset + context_beats
    keep = np.flatnonzero((end > start) & (on < stop))
    target = int(np.searchsorted(keep, row)) if row >= 0 else None
    return Context(song.take(keep), target, start, stop, onset)


# -- text ---------------------------------------------------------------------------------


def note_line(notes: NoteTable, i: int, mark: bool = False) -> str:
    """``beat+position instrument pitch(name) duration`` for note ``i``."""
    beat, pos, pitch, dur = (int(notes.beat[i]), int(notes.position[i]), int(notes.pitch[i]),
                             int(notes.duration[i]))
    return (f"{'>>' if mark else '  '} {beat:5d}+{pos:02d}  {str(notes.instrument[i]):<14s} "
            f"{pitch:3d} {pitch_name(pitch):<4s} dur {dur:3d} ({dur / RESOLUTION:g} beats)")


def text_dump(latent: int, hook: str, examples: Sequence[Example],
              contexts: Sequence[Context | None]) -> str:
    """Readable listing of a latent's examples and their context notes."""
    lines = [f"latent {latent} of {hook}: {len(examples)} top-activating tokens",
             f"columns: beat+position(1/{RESOLUTION} beat) instrument pitch name duration; "
             ">> marks the activating note", ""]
    for ex, ctx in zip(examples, contexts, strict=True):
        lines.append(f"#{ex.rank + 1}  song {ex.song}  token {ex.song_token}  "
                     f"activation {ex.activation:.4g}")
        lines.append(f"    token: {ex.token_label()}")
        if ctx is None:
            lines.append("    (no note context: song not found in the note dataset)")
        else:
            lines.append(f"    context: beats {ctx.start:g} to {ctx.stop:g} ({len(ctx.notes)} notes)")
            lines.extend(note_line(ctx.notes, i, i == ctx.target) for i in range(len(ctx.notes)))
        lines.append("")
    return "\n".join(lines)


# -- MIDI ---------------------------------------------------------------------------------


def write_midi(path: Path, ctx: Context, label: str, tempo_bpm: float = 90.0) -> Path:
    """A MIDI file of the context: one track per program, a marker at the activating token."""
    import mido

    origin = float(np.floor(ctx.start))
    mid = mido.MidiFile(ticks_per_beat=TICKS_PER_BEAT)
    meta = mido.MidiTrack()
    meta.append(mido.MetaMessage("track_name", name="music-interpret example", time=0))
    meta.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(tempo_bpm), time=0))
    meta.append(mido.MetaMessage("time_signature", numerator=4, denominator=4, time=0))
    meta.append(mido.MetaMessage("marker", text=_ascii(label),
                                 time=_tick(max(ctx.onset - origin, 0.0))))
    mid.tracks.append(meta)
    notes = ctx.notes
    names = notes.program_names()
    programs = sorted(names)
    channels = [c for c in range(16) if c != 9]
    for n, program in enumerate(programs):
        channel = channels[n % len(channels)]
        events: list[tuple[int, int, mido.Message | mido.MetaMessage]] = []
        for i in range(len(notes)):
            if int(notes.program[i]) != program:
                continue
            beat, pos, dur = notes.beat[i], notes.position[i], notes.duration[i]
            on = max(beat + pos / RESOLUTION - origin, 0.0)
            off = max(beat + (pos + max(dur, 1)) / RESOLUTION - origin, on + 1 / RESOLUTION)
            pitch = int(np.clip(notes.pitch[i], 0, 127))
            if i == ctx.target:
                events.append((_tick(on), 0, mido.MetaMessage("lyrics", text="*activating*")))
            events.append((_tick(on), 2, mido.Message("note_on", note=pitch, velocity=80,
                                                      channel=channel)))
            events.append((_tick(off), 1, mido.Message("note_off", note=pitch, velocity=0,
                                                       channel=channel)))
        track = mido.MidiTrack()
        track.append(mido.MetaMessage("track_name", name=names[program], time=0))
        track.append(mido.Message("program_change", program=program, channel=channel, time=0))
        now = 0
        for tick, _, msg in sorted(events, key=lambda e: (e[0], e[1])):
            track.append(msg.copy(time=tick - now))
            now = tick
        mid.tracks.append(track)
    mid.save(str(path))
    return path


def _tick(beats: float) -> int:
    return int(round(beats * TICKS_PER_BEAT))


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode()


# -- piano roll ---------------------------------------------------------------------------


def piano_roll(path: Path, title: str, examples: Sequence[Example],
               contexts: Sequence[Context | None], dpi: int = 80) -> Path:
    """Examples stacked as piano rolls: time in beats, pitch, colour by instrument."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Patch

    rows = max(1, len(examples))
    height = 0.7 + 2.0 * rows
    fig, axes = plt.subplots(rows, 1, figsize=(10, height), squeeze=False)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.45 / height, top=1 - 0.6 / height,
                        hspace=0.45)
    cmap = plt.get_cmap("tab10")
    colours: dict[int, tuple[float, ...]] = {}
    names: dict[int, str] = {}
    for ax, ex, ctx in zip(axes[:, 0], examples, contexts, strict=False):
        ax.set_title(f"#{ex.rank + 1}  {ex.song}  act {ex.activation:.3g}  - {ex.token_label()}",
                     fontsize=8, loc="left")
        ax.tick_params(labelsize=7)
        if ctx is None or not len(ctx.notes):
            ax.text(0.5, 0.5, "no note context", ha="center", va="center", transform=ax.transAxes)
            continue
        on = ctx.notes.onsets()
        end = on + np.maximum(ctx.notes.duration, 1) / RESOLUTION
        pitch = ctx.notes.pitch.astype(float)
        boxes = np.stack([np.stack([on, pitch - 0.4], 1), np.stack([end, pitch - 0.4], 1),
                          np.stack([end, pitch + 0.4], 1), np.stack([on, pitch + 0.4], 1)], 1)
        for program, name in sorted(ctx.notes.program_names().items()):
            colours.setdefault(program, cmap(len(colours) % 10))
            names.setdefault(program, name)
        faces = [colours[int(p)] for p in ctx.notes.program]
        ax.add_collection(PolyCollection(boxes, facecolors=faces, edgecolors="none", alpha=0.85))
        if ctx.target is not None:
            t = ctx.target
            ax.add_collection(PolyCollection(boxes[t : t + 1] + [[0, -0.3], [0, -0.3], [0, 0.3],
                                                                  [0, 0.3]],
                                             facecolors="none", edgecolors="red", linewidths=2.0))
            ax.plot([on[t]], [pitch[t] + 2.5], marker="v", color="red", markersize=7)
        ax.axvline(ctx.onset, color="red", linewidth=0.6, linestyle=":")
        ax.set_xlim(ctx.start, ctx.stop)
        ax.set_ylim(pitch.min() - 2, pitch.max() + 4)
        ax.set_ylabel("pitch", fontsize=7)
        ax.grid(axis="x", linewidth=0.3, alpha=0.5)
    axes[-1, 0].set_xlabel("beat", fontsize=8)
    handles = [Patch(color=c, label=names[p]) for p, c in colours.items()]
    handles.append(Patch(facecolor="none", edgecolor="red", label="activating note"))
    fig.legend(handles=handles, loc="upper right", fontsize=7, ncol=min(len(handles), 6),
               frameon=False)
    fig.suptitle(title, fontsize=10, x=0.01, y=1 - 0.12 / height, ha="left", va="top")
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# -- one latent, in process or on a worker ------------------------------------------------


@dataclass
class LatentJob:
    """What drawing one latent needs: its examples with their contexts, the ranks of those
    shown (piano roll, MIDI), where to write and the ``index.json`` fields known before."""

    hook: str
    out: Path
    examples: list[Example]
    contexts: list[Context | None]
    shown: list[int]
    tempo_bpm: float
    entry: dict[str, Any]


def render_latent(job: LatentJob) -> dict[str, Any]:
    """Write ``latent_<i>.txt``, ``.png`` (if any example is shown) and one ``.mid`` per
    shown example with notes; returns the latent's ``index.json`` entry."""
    latent = int(job.entry["latent"])
    entry = dict(job.entry)
    shown = [job.examples[r] for r in job.shown]
    contexts = [job.contexts[r] for r in job.shown]
    txt = job.out / f"latent_{latent}.txt"
    txt.write_text(text_dump(latent, job.hook, job.examples, job.contexts) + "\n")
    entry["txt"] = txt.name
    if shown:
        entry["png"] = piano_roll(job.out / f"latent_{latent}.png", f"{job.hook}  latent {latent}",
                                  shown, contexts).name
    entry["midi"] = []
    for ex, cx in zip(shown, contexts, strict=True):
        if cx is not None and len(cx.notes):
            mid = write_midi(job.out / f"latent_{latent}_ex{ex.rank}.mid", cx,
                             f"latent {latent} #{ex.rank + 1}: {ex.token_label()}", job.tempo_bpm)
            entry["midi"].append(mid.name)
    return entry


def default_workers() -> int:
    """Render workers when the config leaves it open: the usable CPUs, at most 4."""
    from ..resources import usable_cpus

    return min(4, usable_cpus())


def _init_worker() -> None:
    """A render worker: Agg backend; Ctrl-C is the main process's to handle."""
    import signal

    os.environ["MPLBACKEND"] = "Agg"
    import matplotlib

    matplotlib.use("Agg")
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def render_all(jobs: Iterable[LatentJob], workers: int = 1) -> list[dict[str, Any]]:
    """:func:`render_latent` of every job, entries in job order.

    ``workers`` > 1: on that many ``spawn`` processes (not fork: torch's threads are live
    here), with at most ``4 * workers`` jobs queued while the next ones are gathered. A
    worker's exception is raised here, as its own type, in job order; on it, or on an
    interrupt, the queued jobs are cancelled and the pool is shut down.
    """
    if workers <= 1:
        return [render_latent(job) for job in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker)
    entries: list[dict[str, Any]] = []
    queued: deque[Future[dict[str, Any]]] = deque()
    try:
        for job in jobs:
            if len(queued) >= 4 * workers:
                entries.append(queued.popleft().result())
            queued.append(pool.submit(render_latent, job))
        entries.extend(future.result() for future in queued)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return entries
