"""Shared text helpers of the reward plugins (model output is only ever parsed as text, never run)."""

from __future__ import annotations

from mirage_rl.tasks.answers import extract_boxed

# Completions longer than this are not answers; a reward reads at most this many characters, so a
# runaway or hostile output costs O(limit) and scores as a malformed answer.
MAX_COMPLETION_CHARS = 20_000


def completion_text(completion) -> str:
    """The text of one completion: a string, or TRL's conversational form ``[{"role": ..., "content": ...}]``
    (the last message's content; a list of typed parts is joined from its text parts).

    Raises:
        TypeError: any other type, naming it.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, list):
            return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else ""
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")


def boxed_answers(text: str) -> list[str | None]:
    """Contents of every ``\\boxed{...}`` (``None`` for one whose braces never close), reading at most
    ``MAX_COMPLETION_CHARS`` characters."""
    return extract_boxed(text[:MAX_COMPLETION_CHARS])


def per_row(values, n: int, name: str) -> list:
    """A dataset column as a list of ``n`` values; a missing column is ``n`` Nones.

    Raises:
        ValueError: the column has a different length (naming it).
    """
    if values is None:
        return [None] * n
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} values for {n} completions")
    return list(values)
