"""The one error guard of every command-line entry point.

:func:`guarded_main` runs a command's body: a :class:`~music_interpret.errors.UserError`
becomes ``error: <line>`` on stderr per problem and its exit status (2, or the error's
own), Ctrl-C and SIGTERM end it like an interruption (130, 143) with a hint, a reader that
went away (``... | head``) ends it quietly (141). ``MUSIC_INTERPRET_DEBUG=1`` adds the
traceback of a user error.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import TypeVar

from .errors import Interrupted, UserError

EXIT_OK, EXIT_USER, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 2, 130, 141
RESUME_HINT = "rerun the same command to resume"
T = TypeVar("T")


def print_error(message: str) -> None:
    """``error: <line>`` on stderr for each line of ``message``."""
    for line in str(message).splitlines() or [""]:
        sys.stderr.write(f"error: {line}\n")  # one write: lines of several ranks do not interleave
    sys.stderr.flush()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Interrupted` (a KeyboardInterrupt) in the main thread, so that a
    terminated run ends exactly like one stopped with Ctrl-C."""

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def report(exc: BaseException, resume_hint: str = RESUME_HINT) -> int:
    """Print a user error or an interruption as one line per problem; the exit status."""
    if isinstance(exc, UserError):
        if os.environ.get("MUSIC_INTERPRET_DEBUG"):
            traceback.print_exception(exc)
        print_error(str(exc))
        return exc.exit_code
    print(f"interrupted: {resume_hint}", file=sys.stderr)
    return 128 + exc.signal if isinstance(exc, Interrupted) else EXIT_INTERRUPTED


def guarded_main(func: Callable[[T], int | None], arg: T, resume_hint: str = RESUME_HINT) -> int:
    """``func(arg)`` under the guard (see the module doc); the process exit status."""
    try:
        with sigterm_as_interrupt():
            code = func(arg)
        sys.stdout.flush()
    except (UserError, KeyboardInterrupt) as exc:
        return report(exc, resume_hint)
    except BrokenPipeError:  # the reader went away (``... | head``): no traceback
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return int(code or 0)


def guarded(func: Callable[[T], int | None], resume_hint: str = RESUME_HINT) -> Callable[[T], int]:
    """``func`` wrapped by :func:`guarded_main` (a decorator for command functions)."""

    def wrapper(arg: T) -> int:
        return guarded_main(func, arg, resume_hint)

    wrapper.__name__ = getattr(func, "__name__", "command")
    wrapper.__doc__ = func.__doc__
    return wrapper
