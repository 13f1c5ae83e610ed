"""The options of the ``extract`` stage (:class:`ExtractConfig`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import DEFAULT_STORE, PluginRef
from ..errors import UserError

HOOK_RE = re.compile(r"^(resid_pre|resid_mid|resid_post)\.\d+$|^final_norm$")


@dataclass
class ExtractConfig:
    """Options of ``extract``.

    ``hooks`` and ``layers`` (shorthand for ``resid_post.L``) together name the hook
    points; with neither, every ``resid_post.L`` of the model is extracted.
    ``batch_size`` windows of a shard's longest length make one batch; shorter
    windows share a batch of the same token budget, as long as they are within
    ``length_slack`` (a fraction) of the batch's longest window. ``length_slack:
    null`` gives fixed batches of ``batch_size`` windows. ``forward_workers``: threads
    running forward batches side by side (``null``: 2 on a CPU with two or more torch
    threads, which share the torch threads between them, else 1). A small model's
    operations are too short to keep two cores busy each, so on CPU two batches at once
    deliver more tokens/s than one batch on two threads; on a GPU one worker suffices.
    ``plan_workers``: processes that read, tokenize and window the songs ahead of the
    forward passes (:mod:`~music_interpret.stages.extract_plan`; 0: this process; ``null``:
    none on CPU, half the CPUs, at most 8, beside a GPU). Each loads the model adapter
    once on CPU.
    ``shuffle_songs``: store the songs in a seeded random order (the run's seed) instead of
    the dataset's, so that ``max_songs`` and the analyzers' ``max_tokens`` (the first
    tokens of the store) take a random sample of a dataset sorted by collection.
    ``dtype``: the stored precision of the activations (computed in float32; float16
    and bfloat16 halve the store and are read back as float32 by every reader).
    """

    hooks: list[str] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    events: Literal["all", "notes"] = "all"
    batch_size: int = 8
    length_slack: float | None = 0.1
    stride: int | None = None
    max_songs: int | None = None
    shuffle_songs: bool = False
    forward_workers: int | None = None
    plan_workers: int | None = None
    output: Path | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    store: PluginRef = field(default=DEFAULT_STORE, metadata={"plugin": "activation_store"})  # type: ignore[assignment]

    def __post_init__(self) -> None:
        bad = [h for h in self.hooks if not HOOK_RE.match(h)]
        if bad:
            raise ValueError(f"hooks: {', '.join(map(repr, bad))} is not a hook point name "
                             "(resid_pre.L, resid_mid.L, resid_post.L, final_norm)")
        if any(layer < 0 for layer in self.layers):
            raise ValueError("layers: layer numbers start at 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.length_slack is not None and not 0 <= self.length_slack < 1:
            raise ValueError(f"length_slack must be in [0, 1) or null, got {self.length_slack}")
        if self.forward_workers is not None and self.forward_workers < 1:
            raise ValueError(f"forward_workers must be positive or null, got {self.forward_workers}")
        if self.plan_workers is not None and self.plan_workers < 0:
            raise ValueError(f"plan_workers must be 0 or more, or null, got {self.plan_workers}")
        if self.max_songs is not None and self.max_songs < 1:
            raise ValueError(f"max_songs must be positive, got {self.max_songs}")

    def hook_points(self, available: list[str]) -> list[str]:
        """Requested hook points in model order, checked against ``available``."""
        wanted = list(self.hooks) + [f"resid_post.{layer}" for layer in self.layers]
        if not wanted:
            wanted = [h for h in available if h.startswith("resid_post.")]
        missing = [h for h in wanted if h not in available]
        if missing:
            raise UserError(f"extract: hook point(s) {', '.join(missing)} do not exist in this model "
                            f"(available: {', '.join(available)})")
        return [h for h in available if h in set(wanted)]
