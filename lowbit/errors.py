"""Errors a user can cause and fix.

`LowbitError` carries a one-line message that says what is wrong and what to do. The CLI
prints it without a traceback and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class LowbitError(Exception):
    """A problem with the user's input, files or settings (not a bug in lowbit)."""


class SpecError(LowbitError, ValueError):
    """A quantisation setting that cannot apply (bits, group size, granularity...)."""


def one_line(error: BaseException | str) -> str:
    """A message on one line: another library's multi-line error text, whitespace collapsed
    (the CLI prints every error as one line)."""
    return " ".join(str(error).split())
