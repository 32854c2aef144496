"""Photos, pieces and the three images of a jigsaw item (BLINK's Jigsaw format, Fu et al. 2024, arXiv 2404.12390).

A photo is read from a folder laid out as ``../shared/data/photos`` (``manifest.jsonl``: ``file``, ``split``,
``crop_margin_px``, ``sha256``): its ``crop_margin_px`` border is cropped first (the Kodak film-scan frame would
give the true piece away), giving the photo's *frame*. Boxes are ``[x0, y0, x1, y1]`` in frame pixels, all multiples
of 8 (the JPEG block grid stays aligned, so block artefacts cannot tell the true piece from a distractor).

An item: the *puzzle* (the frame with its lower-right box masked black), candidate A and candidate B (one the true
piece, the other a same-sized distractor box, from another photo of the same split or from elsewhere in the same
photo). The helper image (Mirage: "inserting one randomly chosen candidate patch into the masked region") is the
puzzle with a candidate pasted in. All three images of an item are scaled by one factor so that the longer side of
the puzzle is at most ``max_side`` pixels (the pieces keep the size of the hole).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image

from ...data.images import open_image
from ...data.jsonl import read_text

BLOCK = 8
MASK_RGB = (0, 0, 0)
#: longer side of an item's puzzle image (pixels) unless a caller asks otherwise
MAX_SIDE = 512


@dataclass(frozen=True)
class Photo:
    """One manifest row: ``file`` (relative to the photos folder), ``split``, ``crop`` (pixels cut from every side)."""

    file: str
    split: str
    crop: int


def read_manifest(photos_dir: str | Path) -> list[Photo]:
    """The photos of ``photos_dir/manifest.jsonl``, in file order.

    Raises:
        FileNotFoundError: no manifest. ValueError: naming the line: a row without ``file``/``split`` or a split
            other than train/test, or a listed file that does not exist.
    """
    path = Path(photos_dir) / "manifest.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: a photos folder needs manifest.jsonl (file, split, "
                                "crop_margin_px per photo), as ../shared/data/photos has")
    photos = []
    for i, line in enumerate(read_text(path, "the photos manifest: one JSON object a line").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            photo = Photo(str(r["file"]), str(r["split"]), int(r.get("crop_margin_px", 0)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{i}: not a manifest row with file, split, crop_margin_px ({e})") from None
        if photo.split not in ("train", "test"):
            raise ValueError(f"{path}:{i}: split must be train or test, got {photo.split!r}")
        if not (Path(photos_dir) / photo.file).is_file():
            raise ValueError(f"{path}:{i}: {photo.file} does not exist in {photos_dir}")
        photos.append(photo)
    return photos


@lru_cache(maxsize=64)
def frame(photos_dir: str, file: str, crop: int) -> Image.Image:
    """The photo with ``crop`` pixels cut from every side (RGB), then trimmed on the right and bottom to a multiple of
    8 pixels (so a box ending at the lower-right corner starts on the block grid too)."""
    im = open_image(Path(photos_dir) / file, where=f"photo {file}")
    w, h = im.width - 2 * crop, im.height - 2 * crop
    return im.crop((crop, crop, crop + w - w % BLOCK, crop + h - h % BLOCK))


def paste(puzzle: Image.Image, piece: Image.Image, box) -> Image.Image:
    out = puzzle.copy()
    out.paste(piece, (box[0], box[1]))
    return out


def item_images(photos_dir: str, item, max_side: int = MAX_SIDE) -> dict:
    """``{"puzzle", "A", "B", "true_piece"}`` (PIL images) of an item with ``photo``, ``crop``, ``piece_box``,
    ``distractor_photo``, ``distractor_crop``, ``distractor_box`` and ``answer``, scaled by one factor (module
    docstring)."""
    f = frame(str(photos_dir), item.photo, item.crop)
    piece = f.crop(tuple(item.piece_box))
    distractor = frame(str(photos_dir), item.distractor_photo, item.distractor_crop).crop(tuple(item.distractor_box))
    puzzle = f.copy()
    puzzle.paste(MASK_RGB, tuple(item.piece_box))
    a, b = (piece, distractor) if item.answer == "A" else (distractor, piece)
    out = {"puzzle": puzzle, "A": a, "B": b, "true_piece": piece}
    scale = min(1.0, max_side / max(puzzle.size))
    if scale < 1.0:
        size = (round(puzzle.width * scale), round(puzzle.height * scale))
        # the pieces take exactly the size of the scaled hole (its corner rounded like the puzzle's)
        hole = (size[0] - round(item.piece_box[0] * scale), size[1] - round(item.piece_box[1] * scale))
        out = {k: v.resize(size if k == "puzzle" else hole, Image.BICUBIC) for k, v in out.items()}
    return out


def helper_image(photos_dir: str, item, helper: str, max_side: int = MAX_SIDE) -> Image.Image:
    """The puzzle with a candidate pasted into the hole: ``random_candidate`` (the paper's: the candidate
    ``item.helper_pick``, drawn at random when the item was made) or ``true_piece``."""
    ims = item_images(photos_dir, item, max_side)
    if helper not in HELPERS:
        raise ValueError(f"helper must be one of {HELPERS} for task jigsaw, got {helper!r}")
    piece = ims["true_piece"] if helper == "true_piece" else ims[item.helper_pick]
    puzzle = ims["puzzle"]
    # the hole's corner in the (scaled) puzzle: the piece sits at the lower-right
    return paste(puzzle, piece, (puzzle.width - piece.width, puzzle.height - piece.height))


HELPERS = ("random_candidate", "true_piece")
