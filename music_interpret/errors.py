"""Errors caused by user input: the CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (file, key or value); the message is one line naming it."""

    exit_code = 2


class ConfigError(UserError):
    """One or more problems in a pipeline configuration (one line each)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class StageUnavailable(UserError):
    """A stage named in the pipeline has no installed implementation."""

    exit_code = 3
