"""A small process pool with a time limit per task (for the corpus build).

``concurrent.futures`` cannot stop one running task, so a hung parse would hold its worker
forever. Here each worker is a ``spawn`` process fed over its own pipe. Before each task
the worker caps its own CPU time at what it has used plus ``time_limit`` seconds
(``RLIMIT_CPU``): the kernel ends a task that computes too long, however busy the machine
is, so which tasks time out does not depend on the load. A task that blocks without
computing is stopped by the main process after ``wall_limit`` seconds. Either way the
worker is replaced, and a worker that dies takes only its current task with it. Results
come back in task order, whatever the worker count. Workers are replaced after
``max_tasks`` tasks to bound the memory music21 keeps.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import resource
import signal
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
    """Peak resident memory (MiB) of any worker, worker starts, timeouts and crashes."""

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


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _worker(conn: Connection, fn: Callable[[Any], Any], classify: Callable, limit: float) -> None:
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - music21 chatter
    warnings.simplefilter("ignore")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGXCPU would dump core
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        index, task = message
        soft = math.ceil(_cpu_seconds() + limit)
        capped = soft if hard == resource.RLIM_INFINITY else min(soft, hard)
        resource.setrlimit(resource.RLIMIT_CPU, (capped, hard))
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
    wall_limit: float | None = None,
    max_tasks: int = 500,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Outcome], PoolStats]:
    """Run ``fn(task)`` for every task on ``workers`` processes; outcomes in task order.

    ``time_limit``: CPU seconds per task; ``wall_limit``: wall-clock seconds per task
    (default ``5 * time_limit``). ``fn`` and ``classify`` must be importable top-level
    functions; ``classify`` turns an exception raised by ``fn`` into ``(category,
    detail)``. ``progress(n)`` is called as tasks finish.
    """
    wall = wall_limit if wall_limit is not None else 5 * time_limit
    ctx = mp.get_context("spawn")
    stats = PoolStats()
    outcomes: list[Outcome | None] = [None] * len(tasks)
    pending = deque(range(len(tasks)))
    slots: list[_Slot] = []

    def start() -> _Slot:
        parent, child = ctx.Pipe()
        args = (child, fn, classify, time_limit)
        process = ctx.Process(target=_worker, args=args, daemon=True)
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

    def died(slot: _Slot) -> Outcome:
        slot.process.join(5)
        code = slot.process.exitcode
        if code == -signal.SIGXCPU:
            stats.timeouts += 1
            return Outcome(False, error=("timeout", f"more than {time_limit:g} s of CPU time"))
        stats.crashes += 1
        return Outcome(False, error=("crash", f"worker died (exit code {code})"))

    try:
        slots.extend(start() for _ in range(max(1, min(workers, len(tasks)))))
        while pending or any(slot.task is not None for slot in slots):
            for slot in slots:
                if slot.task is None and pending:
                    slot.task, slot.started = pending.popleft(), time.monotonic()
                    slot.conn.send((slot.task, tasks[slot.task]))
            busy = {slot.conn: slot for slot in slots if slot.task is not None}
            deadline = min(slot.started for slot in busy.values()) + wall
            for conn in wait(list(busy), timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                slot = busy[conn]
                try:
                    index, ok, value, error, rss = conn.recv()
                except (EOFError, OSError):
                    finish(slot, died(slot), kill=True)
                    continue
                stats.worker_peak_rss_mib = max(stats.worker_peak_rss_mib, rss)
                slot.done += 1
                outcome = Outcome(True, value) if ok else Outcome(False, error=tuple(error))
                finish(slot, outcome, replace=slot.done >= max_tasks)
            now = time.monotonic()
            for slot in list(slots):
                if slot.task is not None and now - slot.started > wall:
                    stats.timeouts += 1
                    detail = f"no result within {wall:g} s (wall clock)"
                    finish(slot, Outcome(False, error=("timeout", detail)), kill=True)
    finally:
        for slot in slots:
            stop(slot, kill=slot.task is not None)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    stats.worker_peak_rss_mib = max(stats.worker_peak_rss_mib, children)
    missing = Outcome(False, error=("error", "not run"))
    return [o if o is not None else missing for o in outcomes], stats
