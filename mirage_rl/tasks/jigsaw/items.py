"""The items of jigsaw: the generator, the committed test split, its loader and the training rows.

**Generator** (:func:`make_items`): from the photos of one split of a photos folder (:mod:`.pieces`), an item per
draw: a photo (in turn), a lower-right piece of ``frac`` (0.25-0.45) of the frame's width and height (multiples of 8
pixels), a distractor box of the same size (``distractor: other_photo``: anywhere in another photo of the *same*
split; ``same_photo``: elsewhere in the same photo, not overlapping the piece), the answer (A or B, a seeded shuffle of
a balanced list) and the candidate the ``random_candidate`` helper pastes in.

**Test split** (``data/jigsaw_test.jsonl``, 150 items, BLINK's validation size): test photos only, distractors from
test photos only. Regenerate with::

    python -m mirage_rl.tasks.jigsaw.items --photos_dir ../shared/data/photos --out data/jigsaw_test.jsonl

**Training rows** (``build-data`` with ``task: jigsaw``): ``num_generated`` items of the train photos, each row
``images`` = [puzzle, candidate A, candidate B], ``helper_image`` (``helper: random_candidate`` or ``true_piece``),
``answer`` = ``<output_image>\\boxed{X}``, ``solution`` = ``X``.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ...data.images import encode_png
from ...data.messages import LATENT_MARKER, to_messages
from ..items_file import resolve_items_file
from . import pieces
from .prompts import PROMPTS
from ...data.jsonl import read_text

TEST_FILE = "data/jigsaw_test.jsonl"
TEST_ITEMS = 150
SPLIT_SEED = 0
FRAC = (0.25, 0.45)
DISTRACTORS = ("other_photo", "same_photo")


@dataclass
class JigsawItem:
    """One item (module docstring); boxes ``[x0, y0, x1, y1]`` in frame pixels."""

    item_id: str
    split: str
    photo: str
    crop: int
    piece_box: list[int]
    distractor_photo: str
    distractor_crop: int
    distractor_box: list[int]
    answer: str
    helper_pick: str
    level: int = 1
    photos_dir: str = ""

    @property
    def prompt_id(self) -> str:
        return self.item_id

    def record(self) -> dict:
        """The JSONL row (no ``photos_dir``: the loader is told where the photos are)."""
        d = asdict(self)
        d.pop("photos_dir")
        return d


def _snap(x: float) -> int:
    return max(4 * pieces.BLOCK, int(x) // pieces.BLOCK * pieces.BLOCK)


def make_items(photos_dir: str, split: str, n: int, seed: int = SPLIT_SEED, distractor: str = "other_photo",
               frac=FRAC) -> list[JigsawItem]:
    """``n`` items of the ``split`` photos of ``photos_dir`` (module docstring), deterministic for ``seed``.

    Raises:
        ValueError: an unknown ``distractor``, or a split with too few photos (``other_photo`` needs two).
    """
    if distractor not in DISTRACTORS:
        raise ValueError(f"distractor must be one of {DISTRACTORS}, got {distractor!r}")
    photos = [p for p in pieces.read_manifest(photos_dir) if p.split == split]
    if len(photos) < (2 if distractor == "other_photo" else 1):
        raise ValueError(f"{photos_dir}: {len(photos)} {split} photo(s); distractor {distractor} needs more")
    rng = random.Random(f"jigsaw-{split}-{seed}")
    answers = ["A", "B"] * (n // 2) + ["A"] * (n % 2)
    rng.shuffle(answers)
    items = []
    for i in range(n):
        p = photos[i % len(photos)]
        f = pieces.frame(str(photos_dir), p.file, p.crop)
        w, h = f.size
        pw, ph = _snap(rng.uniform(*frac) * w), _snap(rng.uniform(*frac) * h)
        box = [w - pw, h - ph, w, h]
        for _ in range(100):
            d = rng.choice([q for q in photos if q.file != p.file]) if distractor == "other_photo" else p
            dw, dh = pieces.frame(str(photos_dir), d.file, d.crop).size
            if dw < pw or dh < ph:
                continue
            x = rng.randrange(0, (dw - pw) // pieces.BLOCK + 1) * pieces.BLOCK
            y = rng.randrange(0, (dh - ph) // pieces.BLOCK + 1) * pieces.BLOCK
            dbox = [x, y, x + pw, y + ph]
            if d.file == p.file and dbox[2] > box[0] and dbox[3] > box[1]:
                continue  # same photo: the distractor must not overlap the missing piece
            break
        else:
            raise ValueError(f"{photos_dir}: no room for a {pw}x{ph} distractor for {p.file} (its piece is cut at "
                             f"{frac[0]:g}-{frac[1]:g} of its size, and 100 tries found no other {split} photo "
                             f"{'' if distractor == 'other_photo' else 'region '}that large); add {split} photos of "
                             f"at least {pw}x{ph} px, resize {p.file} to the size of the others, or use distractor: "
                             f"{'same_photo' if distractor == 'other_photo' else 'other_photo'}")
        items.append(JigsawItem(f"{split}-{i}-{Path(p.file).stem}", split, p.file, p.crop, box, d.file, d.crop, dbox,
                                answers[i], rng.choice("AB"), photos_dir=str(photos_dir)))
    return items


def split_text(items: list[JigsawItem]) -> str:
    return "".join(json.dumps(it.record()) + "\n" for it in items)


def load_benchmark(photos_dir: str, levels=None, items_file: str | None = None) -> list[JigsawItem]:
    """The items of ``items_file`` (default: the committed test split) on the photos of ``photos_dir``.

    Raises:
        ValueError: naming the file and line: a malformed row, a photo missing from the folder's manifest, a
            test item whose photo or distractor is not a test photo, a box that is not on the 8-pixel grid or
            leaves its frame, or an answer other than A/B.
    """
    path = resolve_items_file(items_file or TEST_FILE)
    split_of = {p.file: p.split for p in pieces.read_manifest(photos_dir)}
    items = []
    for i, line in enumerate(read_text(path, "one JSON item a line").splitlines(), 1):
        where = f"{path}:{i}"
        try:
            it = JigsawItem(**json.loads(line), photos_dir=str(photos_dir))
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{where}: not a jigsaw item ({e})") from None
        for file in (it.photo, it.distractor_photo):
            if split_of.get(file) != it.split:
                raise ValueError(f"{where}: {file} is a {split_of.get(file, 'missing')} photo in {photos_dir}, the item "
                                 f"is {it.split}: splits never share a photo")
        if it.answer not in ("A", "B"):
            raise ValueError(f"{where}: answer must be A or B, got {it.answer!r}")
        for file, crop, box in ((it.photo, it.crop, it.piece_box), (it.distractor_photo, it.distractor_crop, it.distractor_box)):
            w, h = pieces.frame(str(photos_dir), file, crop).size
            if any(v % pieces.BLOCK for v in box) or not (0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h):
                raise ValueError(f"{where}: box {box} is off the 8-pixel grid or outside {file}'s {w}x{h} frame")
        if levels is None or it.level in levels:
            items.append(it)
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def build_rows(args, bad):
    """Training rows (module docstring) for ``mirage_rl.data.build`` from ``args.photos_dir``'s train photos."""
    from datasets import Value

    helper = args.helper or "random_candidate"
    if helper not in pieces.HELPERS:
        raise ValueError(f"helper must be one of {pieces.HELPERS} for task jigsaw, got {helper!r}")
    if args.num_generated < 1:
        raise ValueError("task jigsaw builds generated items only: set num_generated >= 1")
    items = make_items(args.photos_dir, "train", args.num_generated, args.seed, args.distractor)
    prompt = to_messages(PROMPTS[args.prompt], 3)
    rows = []
    for it in tqdm(items, desc="cut jigsaw items"):
        ims = pieces.item_images(args.photos_dir, it, args.max_side)
        rows.append({"prompt": prompt, "images": [encode_png(ims[k]) for k in ("puzzle", "A", "B")],
                     "helper_image": encode_png(pieces.helper_image(args.photos_dir, it, helper, args.max_side)),
                     "answer": LATENT_MARKER + "\\boxed{" + it.answer + "}", "solution": it.answer, "level": it.level,
                     "photo": it.photo, "source": "generated", "map_id": it.item_id})
    extra = {"level": Value("int32"), "photo": Value("string")}
    return rows, extra, {"generated": len(rows), "helper": helper, "distractor": args.distractor}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Write the jigsaw test split (module docstring).")
    ap.add_argument("--photos_dir", default="../shared/data/photos")
    ap.add_argument("--seed", type=int, default=SPLIT_SEED)
    ap.add_argument("--n", type=int, default=TEST_ITEMS)
    ap.add_argument("--out", default=TEST_FILE)
    a = ap.parse_args(argv)
    items = make_items(a.photos_dir, "test", a.n, a.seed)
    Path(a.out).write_text(split_text(items))
    print(json.dumps({"out": a.out, "items": len(items)}))


if __name__ == "__main__":
    main()
