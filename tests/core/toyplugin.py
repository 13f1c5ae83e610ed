"""Source of a small third-party plugin used by the core tests (installed into a temp site)."""

TOY_PLUGIN = '''
"""A toy plugin: one dictionary learner and two stages (one trivial, one that can crash)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from music_interpret.config import PluginRef
from music_interpret.hookspecs import hookimpl
from music_interpret.interfaces import DictionaryLearner, Stage


class ToySAE(DictionaryLearner):
    name = "toy_sae"
    description = "A toy dictionary learner for tests."

    @dataclass
    class Config:
        l1_coeff: float = 1e-3
        d_sae: int = 16

        def __post_init__(self):
            if self.d_sae <= 0:
                raise ValueError(f"d_sae must be positive, got {self.d_sae}")


class Count(Stage):
    """Writes n lines; appends to a log outside the run folder each time it really runs."""

    name = "count"
    description = "Count to n (test stage)."

    @dataclass
    class Config:
        n: int = 3
        log: Path = Path("count.log")
        learner: PluginRef = field(default="toy_sae", metadata={"plugin": "dictionary_learner"})
        sleep: float = 0.0
        fail: bool = False
        exit_code: int | None = None
        output: Path | None = None

    @staticmethod
    def output_dir(pipeline, config):
        return config.output if config.output is not None else pipeline.run_dir / "count"

    def run(self, ctx):
        with open(self.config.log, "a") as fh:
            fh.write(f"run {self.config.n}\\n")
        out = ctx.work_dir / "numbers.txt"
        with open(out, "w") as fh:
            for i in range(self.config.n):
                fh.write(f"{i}\\n")
                fh.flush()
                time.sleep(self.config.sleep)
        if self.config.fail:
            raise RuntimeError("count failed on purpose")
        if self.config.exit_code is not None:
            import sys

            sys.exit(self.config.exit_code)
        return {"n": self.config.n, "l1": self.config.learner.config.l1_coeff}


class Total(Stage):
    """Reads the count stage's output and sums it."""

    name = "total"
    description = "Sum what count wrote (test stage)."
    Config = Stage.Config

    def run(self, ctx):
        numbers = (ctx.output_of("count") / "numbers.txt").read_text().split()
        total = sum(int(x) for x in numbers)
        (ctx.work_dir / "total.json").write_text(json.dumps({"total": total}))
        with open(os.environ.get("TOY_TOTAL_LOG", os.devnull), "a") as fh:
            fh.write("total\\n")
        return {"total": total}


@hookimpl
def mi_dictionary_learners():
    return [ToySAE]


@hookimpl
def mi_stages():
    return [Count, Total]


events = []


@hookimpl
def mi_stage_start(stage, run_dir, config):
    log = os.environ.get("TOY_EVENTS")
    if log:
        with open(log, "a") as fh:
            fh.write(f"start {stage}\\n")


@hookimpl
def mi_stage_end(stage, run_dir, status, seconds):
    log = os.environ.get("TOY_EVENTS")
    if log:
        with open(log, "a") as fh:
            fh.write(f"end {stage} {status}\\n")
'''

BROKEN_PLUGIN = '''
import this_module_does_not_exist  # noqa: F401
'''

DUPLICATE_PLUGIN = '''
from dataclasses import dataclass
from music_interpret.hookspecs import hookimpl
from music_interpret.interfaces import DictionaryLearner


class OtherToy(DictionaryLearner):
    name = "toy_sae"
    description = "Same name as the toy learner."


class Fine(DictionaryLearner):
    name = "fine_sae"
    description = "A learner that loads fine."


@hookimpl
def mi_dictionary_learners():
    return [OtherToy, Fine]
'''

RAISING_OBSERVER = '''
"""An observer plugin whose hooks all raise."""
from music_interpret.hookspecs import hookimpl


@hookimpl
def mi_stage_start(stage, run_dir, config):
    raise RuntimeError("observer broke at start")


@hookimpl
def mi_stage_end(stage, run_dir, status, seconds):
    raise ValueError("observer broke at end")


@hookimpl
def mi_stage_error(stage, run_dir, error):
    raise RuntimeError("observer broke on error")
'''
