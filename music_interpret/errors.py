"""Errors the command line prints as one line (no traceback) with a non-zero exit status.

Exit statuses: 2 a mistake in the input (file, key or value), 3 a stage that no
installed plugin provides, 1 a stage that failed in a way the user can act on
(no space left on device, a stage that called ``sys.exit``).
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (file, key or value); the message is one line naming it."""

    exit_code = 2


class ConfigError(UserError):
    """One or more problems in a pipeline configuration (one line each)."""

    def __init__(self, problems: list[str], exit_code: int = 2) -> None:
        self.problems = list(problems)
        self.exit_code = exit_code
        super().__init__("\n".join(self.problems))


class StageUnavailable(UserError):
    """A stage named in the pipeline has no installed implementation."""

    exit_code = 3


class StageFailed(UserError):
    """A stage failed for a reason stated in one line (not a bug with a traceback)."""

    exit_code = 1


class DiskFull(StageFailed):
    """No space left on the device while writing a file (the message names it)."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (``signal`` is the signal number)."""

    def __init__(self, signal: int) -> None:
        super().__init__(signal)
        self.signal = signal
