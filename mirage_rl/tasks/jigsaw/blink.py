"""BLINK's Jigsaw split as jigsaw items, for users with hub access.

Schema (the BLINK dataset card, ``BLINK-Benchmark/BLINK`` on the Hugging Face hub, configuration ``Jigsaw``, splits
``val`` (150 rows, answers given) and ``test`` (answers withheld); the fields as the BLINK repository's
``eval/test_benchmark.py`` reads them): ``idx`` (string), ``question``, ``sub_task``, ``image_1`` .. ``image_4``
(``Image``; Jigsaw fills 1-3: the puzzle, then the two candidates), ``choices`` (list of strings), ``answer``
(``"(A)"`` or ``"(B)"``), ``prompt`` (the question with the choices), ``explanation``.

``load_blink(path)``: ``path`` is a folder written by ``Dataset.save_to_disk`` (a copy of the split) or a hub id
(``datasets.load_dataset(path, "Jigsaw", split=...)``). This path was tested on a local dataset built with exactly
that schema; it could not be run against the real hub data here (no hub access).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..answers import normalize_choice

BLINK_ID = "BLINK-Benchmark/BLINK"
COLUMNS = ("idx", "image_1", "image_2", "image_3", "answer")


@dataclass
class BlinkItem:
    """One BLINK Jigsaw row: its three images in memory, the answer letter."""

    prompt_id: str
    images: list
    answer: str
    level: int = 1


def is_blink(path: str) -> bool:
    """Whether a jigsaw ``benchmark_dir`` names BLINK (the hub id, or a saved copy of its split)."""
    p = Path(path)
    return path.startswith(BLINK_ID) or (p.is_dir() and any((p / f).is_file() for f in ("dataset_info.json",
                                                                                       "dataset_dict.json")))


def load_blink(path: str, split: str = "val"):
    """The BLINK Jigsaw split at ``path`` (module docstring) as a ``datasets.Dataset``.

    Raises:
        ValueError: a dataset without BLINK's columns (naming the missing ones).
    """
    import datasets

    from ...data.disk import load_dataset_folder

    if Path(path).is_dir():
        ds = load_dataset_folder(path, what="BLINK folder")
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    else:  # pragma: no cover - needs the hub
        ds = datasets.load_dataset(path.split(":")[0], "Jigsaw", split=split)
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; BLINK's Jigsaw rows have {list(COLUMNS)} (and question, "
                         "choices, prompt)")
    return ds


def blink_items(ds, where: str) -> list[BlinkItem]:
    """The rows of a BLINK Jigsaw split as items. Raises ``ValueError`` naming the row: an answer that is not
    ``(A)``/``(B)``, or a missing image."""
    items = []
    for i, r in enumerate(ds):
        letter = normalize_choice(str(r["answer"]))
        if letter not in ("A", "B"):
            raise ValueError(f"{where} row {i} (idx={r['idx']}): answer {r['answer']!r} is not (A) or (B)")
        images = [r[f"image_{k}"] for k in (1, 2, 3)]
        if any(im is None for im in images):
            raise ValueError(f"{where} row {i} (idx={r['idx']}): Jigsaw needs image_1, image_2 and image_3")
        items.append(BlinkItem(str(r["idx"]), [im.convert("RGB") for im in images], letter))
    return items
