"""Committed test items (``data/*_test.jsonl``): where a task's default file is found, and reading it with errors
that name the file and line."""

from __future__ import annotations

from pathlib import Path

#: the repository root (the committed test files live under its ``data/``)
REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_items_file(path: str | Path) -> Path:
    """``path`` as given when it exists, else relative to the repository root (``data/..._test.jsonl`` works from any
    working directory). Raises ``FileNotFoundError`` naming both places."""
    p = Path(path)
    if p.is_file():
        return p
    q = REPO_ROOT / p
    if not p.is_absolute() and q.is_file():
        return q
    raise FileNotFoundError(f"test items file {p} not found (nor {q}); it is committed under data/, or regenerate it "
                            "(docs/TASKS.md says how)")
