"""The base class of every error a user can fix in what they hand raymerge (files, settings, cluster requests).

Jobs and the console script catch :class:`InputError` and print its message on one line with exit code 2, never
a traceback: the message, not the stack, tells the user what to change. Subclass it (not ``ValueError``) for a
new error of that kind, and name the file, key or value in the message.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input; the message names the file, key or value and says what would fix it."""


def input_errors() -> tuple[type[Exception], ...]:
    """The exception classes whose message is meant for the user, for ``except input_errors():`` in entry points."""
    return (InputError,)
