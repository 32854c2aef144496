"""Answer extraction shared by the tasks: the content of ``\\boxed{...}``, Mirage's answer format (its prompts ask for
it; every task of the benchmark suite answers in a box). Model output is only ever parsed as text."""

from __future__ import annotations

import re

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


_CHOICE = re.compile(r"\(?\s*([A-Za-z])\s*\)?\s*(?:[.:](?:\s.*)?)?", re.S)
#: BLINK's and COMT's answer form outside a box: a letter in parentheses, ``(A)``
_PAREN_CHOICE = re.compile(r"\(([A-Za-z])\)")


def normalize_choice(answer: str | None) -> str | None:
    """``"B"``, ``"(b)"``, ``"B."``, ``"B: text"`` -> ``"B"``; anything else -> None.

    Only a single letter, optionally in parentheses and followed by ``.``/``:`` and an option text, counts.
    """
    if answer is None:
        return None
    m = _CHOICE.fullmatch(answer.strip()[:MAX_BOX_CHARS])
    return m.group(1).upper() if m else None


def parse_choice(text: str, letters: str, paren_fallback: bool = False) -> str | None:
    """The choice letter a completion gives: the last ``\\boxed{...}`` read by :func:`normalize_choice`; with
    ``paren_fallback`` and no box at all, the last ``(X)`` of the text (BLINK's and COMT's form). ``None`` when
    there is none, or the letter is not one of ``letters`` (e.g. ``"ABC"``)."""
    box = last_box(text)
    if box is not None:
        letter = normalize_choice(box)
    elif paren_fallback and "\\boxed{" not in text:
        found = _PAREN_CHOICE.findall(text[-MAX_BOX_CHARS:])
        letter = found[-1].upper() if found else None
    else:
        letter = None
    return letter if letter is not None and letter in letters else None
