"""The exceptions the CLI turns into a short message instead of a traceback, and the one-line reason."""

from __future__ import annotations


class SemodelError(Exception):
    """A problem with the user's input (config, data, checkpoint, image) that needs no traceback."""


class Interrupted(Exception):
    """The user pressed Ctrl-C and the command stopped cleanly (what it had written is kept).

    The message says what was kept and how to continue; the CLI prints it and exits with 130,
    the shell's code for an interrupted program.
    """


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first non-empty line of ``error``'s message (at most ``limit`` characters), or its type name.

    Library errors often carry a paragraph or a dump of the offending value; a one-line error
    message needs only the sentence that names the problem.
    """
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(error).__name__
