"""User errors: a mistake in what the user gave (a file, a row, an option), reported as one clean line.

``mirage-rl`` prints a user error as ``mirage-rl CMD: error: MESSAGE`` and exits non-zero without a traceback
(``--debug`` or ``MIRAGE_RL_DEBUG=1`` shows it); any other exception is an internal error and keeps its traceback.
A user error is:

* a :class:`UserError` (``RecipeError``, ``OutputDirError``, ``MissingExtraError``, ... subclass it);
* a ``ValueError`` / ``FileNotFoundError`` / ``NotADirectoryError`` / ``IsADirectoryError`` / ``FileExistsError``
  raised by mirage-rl's own code (``mirage_rl``, ``rewards``): by this project's convention those messages name the
  file, row or key and say how to fix it;
* an ``OSError`` with ``ENOSPC`` (no space left on device), which names the path.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

_OWN = tuple(str(Path(__file__).resolve().parents[1] / d) + os.sep for d in ("mirage_rl", "rewards"))
_USER_TYPES = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError)


class UserError(Exception):
    """A mistake in the user's input; the message says what, where and how to fix it."""


class MissingExtraError(UserError, ImportError):
    """An option needs an optional dependency that is not installed; the message names the option and the extra."""


def raised_in_project(exc: BaseException) -> bool:
    """True when the innermost frame of ``exc``'s traceback is in ``mirage_rl/`` or ``rewards/``."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_OWN)


def is_no_space(exc: BaseException) -> bool:
    """An ``OSError`` (or a safetensors write error) caused by a full disk."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    text = str(exc)
    return "No space left on device" in text or "StorageFull" in text


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a user error (module docstring): printed as one line, without a traceback."""
    if isinstance(exc, UserError) or is_no_space(exc):
        return True
    return isinstance(exc, _USER_TYPES) and raised_in_project(exc)


def no_space_message(exc: BaseException, path: str | os.PathLike | None = None) -> str:
    """``no space left on device writing PATH``: the one line a full disk gets."""
    where = path or getattr(exc, "filename", None)
    return (f"no space left on device{f' writing {where}' if where else ''}: free space on that disk or point "
            "output_dir at another one, then run the same command again")
