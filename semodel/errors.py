"""The exceptions the CLI turns into a short message instead of a traceback, and the one-line reason."""

from __future__ import annotations

from itertools import islice


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


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters, without building the whole repr first.

    A config or checkpoint can hold a value that is small in memory but huge when printed (a YAML
    alias bomb: nested lists that share their elements expand to gigabytes of text), so error
    messages show only a prefix, found by walking the value until the budget is spent.
    """
    parts: list[str] = []
    budget = [limit]

    def emit(text: str) -> bool:
        parts.append(text[: budget[0]])
        budget[0] -= len(text)
        return budget[0] > 0

    def walk(v: object, depth: int) -> bool:
        if isinstance(v, (list, tuple, dict)):
            if depth > 20:
                return emit("...")
            items = list(islice(v.items() if isinstance(v, dict) else v, limit + 1))
            brackets = "{}" if isinstance(v, dict) else "[]" if isinstance(v, list) else "()"
            if not emit(brackets[0]):
                return False
            for i, item in enumerate(items):
                if i and not emit(", "):
                    return False
                if isinstance(v, dict):
                    if not (walk(item[0], depth + 1) and emit(": ") and walk(item[1], depth + 1)):
                        return False
                elif not walk(item, depth + 1):
                    return False
            return emit(brackets[1])
        return emit(repr(v) if not isinstance(v, str) else repr(v[: limit + 2]))

    complete = walk(value, 0)
    text = "".join(parts)
    return text if complete and len(text) <= limit else text[:limit] + "..."
