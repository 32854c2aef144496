"""Atomic writes: a file or a folder appears complete or not at all (write to a temp sibling, then rename).

A process killed mid-write leaves the previous version in place and, at worst, a hidden temp sibling.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(path: str | os.PathLike, keep: tuple[str, ...] = ()):
    """Yield a temp folder beside ``path``; on success it replaces ``path`` (:func:`commit_directory`).

    Children of the old ``path`` matching a glob in ``keep`` (e.g. ``checkpoint-*``) are moved into the new one
    (each move is a rename); the rest of the old folder is removed. A kill between the renames leaves the old
    folder as a hidden ``.NAME.old-PID`` sibling, which :func:`recover_directory` (run first here, and by the
    loaders) puts back.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(out, keep)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_directory(tmp, out, keep)


def temp_sibling(path: str | os.PathLike, tag: str) -> Path:
    """``.NAME.tmp-TAG`` beside ``path``: a temp folder whose name every rank of a distributed job can compute
    (a collective save writes into it from several processes; :func:`recover_directory` removes it if left)."""
    out = Path(path)
    return out.with_name(f".{out.name}.tmp-{tag}")


def commit_directory(tmp: str | os.PathLike, path: str | os.PathLike, keep: tuple[str, ...] = ()) -> None:
    """Replace ``path`` with the finished folder ``tmp`` (two renames), moving the children of the old ``path`` that
    match ``keep`` into it. One process only."""
    out, tmp = Path(path), Path(tmp)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        _move_kept(old, out, keep)
        shutil.rmtree(old, ignore_errors=True)


def _move_kept(src: Path, dst: Path, keep: tuple[str, ...]) -> None:
    for pattern in keep:
        for child in src.glob(pattern):
            if not (dst / child.name).exists():
                try:
                    child.rename(dst / child.name)
                except FileNotFoundError:  # another process (rank) moved it first
                    pass


def recover_directory(path: str | os.PathLike, keep: tuple[str, ...] = ("checkpoint-*",)) -> None:
    """Repair what a kill during :func:`atomic_directory` can leave beside ``path``.

    * ``path`` missing and a ``.NAME.old-*`` sibling present (killed between the two renames): the old version
      is renamed back; it was complete.
    * ``path`` present and a ``.NAME.old-*`` sibling (killed while moving kept children): the kept children are
      moved on and the sibling removed.
    * ``.NAME.tmp-*`` siblings (killed while writing): removed; they were never complete.
    Safe to call from every rank at once: a repair another process already made is skipped.
    """
    out = Path(path)
    if not out.parent.is_dir():
        return
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        if not out.exists():
            try:
                old.rename(out)
            except (FileNotFoundError, OSError):  # another rank repaired it first (rename onto a full folder fails)
                pass
            continue
        _move_kept(old, out, keep)
        shutil.rmtree(old, ignore_errors=True)
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def atomic_save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG via a temp file in the same folder and ``os.replace``; closes ``fig``."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
