"""Atomic writes: a file or a folder appears complete or not at all (write to a temp sibling, then rename).

A process killed mid-write leaves the previous version in place and, at worst, a hidden temp sibling. Written
files and folders get the modes the user's umask gives (``0644`` / ``0755`` under umask 022), not the private
modes of ``tempfile``. A folder save replaces only what the same group of commands wrote there before
(:mod:`mirage_rl.outputs`); everything else in the folder is kept.
"""

from __future__ import annotations

import fnmatch
import json
import os
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

#: the manifest of an output folder: which entries mirage-rl wrote there and which group wrote each
#: (:mod:`mirage_rl.outputs` states the rules; saves here keep it up to date)
MANIFEST = "mirage_output.json"


def umask() -> int:
    """The process umask, read without changing it where Linux tells it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the modes the umask gives new files (``0666 & ~umask``, executables and
    folders ``0777 & ~umask``): some writers (safetensors, ``tempfile``) create private ``0600`` files, and results
    on a shared machine must be readable by the collaborators the umask admits."""
    mask = umask()
    root = Path(root)
    paths = [root] + (list(root.rglob("*")) if root.is_dir() else [])
    for p in paths:
        if p.is_symlink():
            continue
        full = 0o777 if (p.is_dir() or os.access(p, os.X_OK)) else 0o666
        try:
            os.chmod(p, full & ~mask)
        except OSError:
            pass


def _tmp_name(path: Path, tag: str | None = None) -> Path:
    return path.with_name(f".{path.name}.tmp-{tag or f'{os.getpid()}-{secrets.token_hex(4)}'}")


def make_temp_dir(path: str | os.PathLike, tag: str | None = None) -> Path:
    """Create the hidden temp folder ``.NAME.tmp-TAG`` beside ``path`` with the umask's mode (``tempfile.mkdtemp``
    would make it 0700, and it becomes the output)."""
    tmp = _tmp_name(Path(path), tag)
    tmp.mkdir(parents=True, mode=0o777)
    return tmp


@contextmanager
def atomic_directory(path: str | os.PathLike, group: str, run: dict | None = None, command: str | None = None):
    """Yield a temp folder beside ``path``; on success it replaces ``path`` (:func:`commit_directory`): the entries
    ``group`` wrote there before are replaced by the new ones, every other entry is kept.

    A kill between the renames leaves the old folder as a hidden ``.NAME.old-PID`` sibling, which
    :func:`recover_directory` (run first here, and by the loaders) puts back.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(out)
    tmp = make_temp_dir(out)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_directory(tmp, out, group, run=run, command=command)


def temp_sibling(path: str | os.PathLike, tag: str) -> Path:
    """``.NAME.tmp-TAG`` beside ``path``: a temp folder whose name every rank of a distributed job can compute
    (a collective save writes into it from several processes; :func:`recover_directory` removes it if left)."""
    return _tmp_name(Path(path), tag)


def commit_directory(tmp: str | os.PathLike, path: str | os.PathLike, group: str, run: dict | None = None,
                     command: str | None = None) -> None:
    """Replace ``path`` with the finished folder ``tmp`` (two renames). One process only.

    ``tmp`` holds what a save of ``group`` wrote. The manifest written into it lists those entries under ``group``
    and keeps the old manifest's other entries; after the swap every child of the old folder is moved into the new
    one unless the new save wrote the same name or it is a stale entry of ``group`` (listed by the old manifest,
    not rewritten). Children the old manifest does not list (a user's files, nested outputs) are always kept.
    """
    out, tmp = Path(path), Path(tmp)
    old_manifest = read_manifest(out) if out.is_dir() else {"entries": {}}
    names = [c.name for c in tmp.iterdir()]
    write_manifest(tmp, merged_manifest(old_manifest, group, names, run=run, command=command))
    apply_umask(tmp)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        _move_kept(old, out)
        shutil.rmtree(old, ignore_errors=True)


def _move_kept(src: Path, dst: Path) -> None:
    """Move the children of the old folder ``src`` that the new folder ``dst`` keeps (see :func:`commit_directory`)."""
    old_manifest, new_manifest = read_manifest(src), read_manifest(dst)
    for child in src.iterdir():
        name = child.name
        if name == MANIFEST or (dst / name).exists():
            continue
        if group_of(name, old_manifest) is not None and group_of(name, new_manifest) is None:
            continue  # a stale entry the same group wrote before: replaced by this save
        try:
            child.rename(dst / name)
        except FileNotFoundError:  # another process (rank) moved it first
            pass


def recover_directory(path: str | os.PathLike) -> None:
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
        _move_kept(old, out)
        shutil.rmtree(old, ignore_errors=True)
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def atomic_save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG via a temp file in the same folder and ``os.replace``; closes ``fig``."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a temp file in the same folder and ``os.replace``; the file gets the
    umask's mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------ manifest
def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of ``folder`` (``{"entries": {name_or_glob: group}, ...}``); empty when there is none or it is
    unreadable (then nothing in the folder counts as mirage-rl's)."""
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"entries": {}}
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        return {"entries": {}}
    return data


def group_of(name: str, manifest: dict) -> str | None:
    """The group that wrote ``name`` according to ``manifest`` (exact names first, then globs), or None."""
    entries = manifest.get("entries", {})
    if name in entries:
        return entries[name]
    for pattern, group in entries.items():
        if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(name, pattern):
            return group
    return None


def write_manifest(folder: str | os.PathLike, manifest: dict) -> None:
    """Write ``manifest`` into ``folder`` atomically."""
    atomic_write_text(Path(folder) / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def merged_manifest(old: dict, group: str, names, run: dict | None = None, command: str | None = None) -> dict:
    """``old`` with the entries of ``group`` replaced by ``names`` (a save of that group wrote exactly these), the
    other groups' entries kept; ``run`` (the settings of the run that saved) replaces the old one when given."""
    entries = {n: g for n, g in old.get("entries", {}).items() if g != group}
    entries.update({n: group for n in names if n != MANIFEST})
    out = {**old, "entries": entries}
    if run is not None:
        out["run"] = run
    elif group == "model":
        out.pop("run", None)  # the settings of an earlier model must never describe the weights of this save
    if command is not None:
        out["history"] = (old.get("history") or [])[-19:] + [
            {"command": command, "group": group, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}]
    return out
