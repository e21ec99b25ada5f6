"""The errors a user can fix (data, config) and how they are shown: one line, without Ray's wrapping.

Imported by Ray's own processes (the Train controller reads the failure policy, which names these classes),
so this module imports nothing heavy.
"""
from __future__ import annotations


class DataError(ValueError):
    """A data set or source is missing, incomplete or malformed; the message names the file."""


class ConfigError(ValueError):
    """Invalid configuration; `problems` holds one line per problem. (`metacorrect.config` exports it too; it
    lives here so that Ray Train's controller, which reads the failure policy, does not import torch with the
    config classes.)"""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name if it has none), for one-line reports."""
    text = str(unwrapped(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def unwrapped(error: BaseException) -> BaseException:
    """The error raised in a Ray task or actor, without Ray's wrapper (whose text is a traceback, and to which
    Ray Data appends its retry advice)."""
    cause = getattr(error, "cause", None)
    if type(error).__name__.startswith("RayTaskError") and isinstance(cause, BaseException):
        return cause
    return error
