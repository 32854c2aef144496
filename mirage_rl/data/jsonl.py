"""JSONL files of rows (Mirage's data format): every error names the file and the 1-based line."""

from __future__ import annotations

import json
from pathlib import Path


def jsonl_rows(path: str | Path, on_error=None) -> list[tuple[int, dict]]:
    """``(1-based line, row)`` for every non-empty line of a JSONL file.

    A line that is not valid UTF-8 or not a JSON object raises ``ValueError`` naming the file and line, or is handed to
    ``on_error(error, line)`` (which may raise it or record it, see ``mirage_rl.data.build.BadRows``).
    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such JSONL file")
    rows = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                err = ValueError(f"{path}:{i}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the "
                                 "line); re-encode the file as UTF-8 or remove that line")
                if on_error is None:
                    raise err from None
                on_error(err, i)
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{i}: expected a JSON object per line, got {type(row).__name__}")
            except json.JSONDecodeError as e:
                err = ValueError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno}); fix or remove that line")
            except ValueError as e:
                err = e
            else:
                rows.append((i, row))
                continue
            if on_error is None:
                raise err
            on_error(err, i)
    return rows


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file of JSON objects; errors name the file and the 1-based line."""
    return [row for _, row in jsonl_rows(path)]


def text_field(r: dict, key: str, where: str, max_chars: int) -> str:
    """``r[key]`` as a string of at most ``max_chars`` characters.

    Raises:
        ValueError: naming ``where`` and ``key``: not a string (e.g. ``123``), or longer than ``max_chars``.
    """
    value = r[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__} {str(value)[:40]!r}; "
                         "fix the row")
    if len(value) > max_chars:
        raise ValueError(f"{where}: field {key!r} has {len(value)} characters, more than max_text_chars={max_chars}; "
                         "shorten the row or raise max_text_chars")
    return value


def read_text(path: str | Path, expected: str = "text") -> str:
    """The UTF-8 text of an input file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not UTF-8 text (random bytes, a binary file), naming the file, the byte and what was
            ``expected`` there.
    """
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); expected {expected}: restore the "
                         "file from its source") from None


def read_json(path: str | Path):
    """The JSON value of a file mirage-rl or a user wrote (a manifest, a report, a log, a config).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not UTF-8 or not valid JSON (a truncated or hand-edited file), naming the file, the
            line and column, and what to do.
    """
    import json

    path = Path(path)
    text = read_text(path, "JSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): the file is damaged "
                         "or was cut short; restore it, or write it again with the command that made it") from None
