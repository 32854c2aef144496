"""Answer extraction shared by the tasks: the content of ``\\boxed{...}``, Mirage's answer format (its prompts ask for
it; every task of the benchmark suite answers in a box). Model output is only ever parsed as text."""

from __future__ import annotations

_BOXED = "\\boxed{"
#: At most this many characters of one box are read: no task's answer is longer (a plan of an 8x8 maze, a jigsaw
#: order, a choice), and hostile or runaway outputs then cost O(limit), not O(len(text)).
MAX_BOX_CHARS = 4096


def extract_boxed(text: str) -> list[str | None]:
    """Return the contents of every ``\\boxed{...}`` in ``text``, in order.

    Braces nest; a box whose braces never close yields ``None`` at its position.
    """
    out: list[str | None] = []
    start = text.find(_BOXED)
    while start != -1:
        i = start + len(_BOXED)
        depth = 1
        j = i
        limit = min(len(text), i + MAX_BOX_CHARS)
        while j < limit and depth:
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
            j += 1
        if depth:
            out.append(None)
            break
        out.append(text[i : j - 1])
        start = text.find(_BOXED, j)
    return out


def last_box(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` of ``text`` (``None``: no box, or its braces never close)."""
    boxes = extract_boxed(text)
    return boxes[-1] if boxes else None
