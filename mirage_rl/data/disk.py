"""Opening a ``datasets`` folder that ``mirage-rl build-data`` wrote: one function every command uses, so that a
missing or damaged folder gets one line naming it, never a pyarrow traceback."""

from __future__ import annotations

import os
from pathlib import Path


def _damaged_file(root: Path) -> tuple[Path, str] | None:
    """The first ``*.arrow`` file under ``root`` that pyarrow cannot read whole, with pyarrow's reason."""
    import pyarrow as pa

    for f in sorted(root.rglob("*.arrow")):
        try:
            with pa.memory_map(str(f)) as source:
                pa.ipc.open_stream(source).read_all()
        except (OSError, pa.ArrowException) as e:
            return f, str(e).splitlines()[0]
    return None


def load_dataset_folder(path: str | os.PathLike, what: str = "dataset_path"):
    """``datasets.load_from_disk(path)`` after :func:`mirage_rl.atomic.recover_directory`.

    Raises:
        FileNotFoundError: no dataset at ``path`` (says to run ``mirage-rl build-data``).
        ValueError: a damaged folder (a truncated or corrupted shard, unreadable metadata), naming the file and how
            to rebuild it.
    """
    import pyarrow as pa
    from datasets import load_from_disk

    from ..atomic import recover_directory

    recover_directory(path)
    root = Path(path)
    try:
        return load_from_disk(str(path))
    except FileNotFoundError as e:
        if not root.exists():
            raise FileNotFoundError(f"{what} {path}: no dataset there; run `mirage-rl build-data` first") from e
        raise FileNotFoundError(f"{what} {path}: not a dataset folder written by `mirage-rl build-data` ({e}); "
                                "point it at one, or build one there") from e
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        bad = _damaged_file(root) if root.is_dir() else None
        where = f"{bad[0]} cannot be read ({bad[1]})" if bad else f"it cannot be read ({type(e).__name__}: {e})"
        raise ValueError(f"{what} {path} is damaged: {where}; build it again with `mirage-rl build-data` "
                         "(--replace_output_dir true replaces it in place)") from e
