"""A small process pool with a wall-clock limit per task (for the corpus build).

``concurrent.futures`` cannot stop one running task, so a hung parse would hold its worker
forever. Here each worker is a ``spawn`` process fed over its own pipe; a task that runs
past ``time_limit`` has its worker killed and replaced, and a worker that dies takes only
its current task with it. Results come back in task order, whatever the worker count.
Workers are replaced after ``max_tasks`` tasks to bound the memory music21 keeps.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import resource
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any


@dataclass(frozen=True)
class Outcome:
    """What one task gave: ``value`` when ``ok``, else ``error`` = (category, detail)."""

    ok: bool
    value: Any = None
    error: tuple[str, str] = ("", "")


@dataclass
class PoolStats:
    """Peak resident memory (MiB) of any worker, and worker (re)starts."""

    worker_peak_rss_mib: float = 0.0
    starts: int = 0
    timeouts: int = 0
    crashes: int = 0


@dataclass
class _Slot:
    process: Any
    conn: Connection
    task: int | None = None
    started: float = 0.0
    done: int = 0


def _worker(conn: Connection, fn: Callable[[Any], Any], classify: Callable) -> None:
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - music21 chatter
    warnings.simplefilter("ignore")
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        index, task = message
        try:
            result = (index, True, fn(task), None)
        except Exception as exc:  # reported, never raised
            result = (index, False, None, classify(exc))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        conn.send((*result, rss))


def run_tasks(
    fn: Callable[[Any], Any],
    tasks: Sequence[Any],
    classify: Callable[[BaseException], tuple[str, str]],
    workers: int = 2,
    time_limit: float = 600.0,
    max_tasks: int = 500,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Outcome], PoolStats]:
    """Run ``fn(task)`` for every task on ``workers`` processes; outcomes in task order.

    ``fn`` and ``classify`` must be importable top-level functions; ``classify`` turns an
    exception raised by ``fn`` into ``(category, detail)``. ``progress(n)`` is called as
    tasks finish.
    """
    ctx = mp.get_context("spawn")
    stats = PoolStats()
    outcomes: list[Outcome | None] = [None] * len(tasks)
    pending = deque(range(len(tasks)))
    slots: list[_Slot] = []

    def start() -> _Slot:
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_worker, args=(child, fn, classify), daemon=True)
        process.start()
        child.close()
        stats.starts += 1
        return _Slot(process, parent)

    def stop(slot: _Slot, kill: bool) -> None:
        if kill:
            slot.process.kill()
        else:
            with contextlib.suppress(OSError):
                slot.conn.send(None)
        slot.process.join(5)
        if slot.process.is_alive():
            slot.process.kill()
            slot.process.join()
        slot.conn.close()

    def finish(slot: _Slot, outcome: Outcome, replace: bool = False, kill: bool = False) -> None:
        assert slot.task is not None
        outcomes[slot.task] = outcome
        slot.task = None
        if progress:
            progress(1)
        if replace or kill:
            stop(slot, kill=kill)
            slots[slots.index(slot)] = start()

    try:
        slots.extend(start() for _ in range(max(1, min(workers, len(tasks)))))
        while pending or any(slot.task is not None for slot in slots):
            for slot in slots:
                if slot.task is None and pending:
                    slot.task, slot.started = pending.popleft(), time.monotonic()
                    slot.conn.send((slot.task, tasks[slot.task]))
            busy = {slot.conn: slot for slot in slots if slot.task is not None}
            deadline = min(slot.started for slot in busy.values()) + time_limit
            for conn in wait(list(busy), timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                slot = busy[conn]
                try:
                    index, ok, value, error, rss = conn.recv()
                except (EOFError, OSError):
                    stats.crashes += 1
                    code = slot.process.exitcode
                    finish(slot, Outcome(False, error=("crash", f"worker died (exit {code})")),
                           kill=True)
                    continue
                stats.worker_peak_rss_mib = max(stats.worker_peak_rss_mib, rss)
                slot.done += 1
                outcome = Outcome(True, value) if ok else Outcome(False, error=tuple(error))
                finish(slot, outcome, replace=slot.done >= max_tasks)
            now = time.monotonic()
            for slot in list(slots):
                if slot.task is not None and now - slot.started > time_limit:
                    stats.timeouts += 1
                    detail = f"no result within the time limit of {time_limit:g} s"
                    finish(slot, Outcome(False, error=("timeout", detail)), kill=True)
    finally:
        for slot in slots:
            stop(slot, kill=slot.task is not None)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    stats.worker_peak_rss_mib = max(stats.worker_peak_rss_mib, children)
    return [o if o is not None else Outcome(False, error=("error", "not run")) for o in outcomes], stats
