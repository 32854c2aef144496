"""The items of VSP spatial reasoning: the committed test split, its generator, its loader and the training rows.

**Test split** (``data/vsp_spatial_reasoning_test.jsonl``): one item per published VSP test map of levels 3-6
(``../shared/data/vsp/maze_planning``, the same 400 images), each row ``map_id``, ``level``, ``plan`` (a list of
``LEFT``/``RIGHT``/``UP``/``DOWN``) and ``answer``. Per level, a candidate plan of each class is drawn for every map
(:func:`~.outcomes.draw_plan`, 1 to 2n moves, seeded); then the maps with the fewest possible classes (a map whose
holes are out of reach cannot give B) choose first, each taking its possible class with the most quota left of a
balanced 34/33/33 (``_balanced``). Regenerate with::

    python -m mirage_rl.tasks.vsp_reasoning.items --benchmark_dir ../shared/data/vsp/maze_planning \\
        --out data/vsp_spatial_reasoning_test.jsonl          # seed 0: the committed file, byte for byte

**Training rows** (``build-data`` with ``task: vsp_spatial_reasoning``): generated maps of the sizes of
``generated_sizes`` (never a test map, by content), answers cycling A, B, C (balanced), plans drawn the same way
and labelled by the simulator; the helper image is ``helper: partial`` or ``outcome`` (:mod:`.outcomes`).
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ...data.images import encode_png
from ...data.messages import LATENT_MARKER, to_messages
from ..items_file import resolve_items_file
from ..vsp_planning.maps import generate_maps, load_benchmark as load_maps, map_key, render_map
from .outcomes import HELPERS, LETTERS, WORDS, draw_plan, plan_text, render_helper, walk
from .prompts import PROMPTS, fill
from ...data.jsonl import read_text

TEST_FILE = "data/vsp_spatial_reasoning_test.jsonl"
SPLIT_SEED = 0
#: each answer class holds at least this many of a level's 100 items (the split's promise; checked when generated)
MIN_PER_CLASS = 30


@dataclass
class ReasoningItem:
    """One test item: a VSP map (``image_path``, ``map_desc``), a plan (letters) and the answer letter."""

    map_id: str
    level: int
    image_path: str
    map_desc: list[list[int]]
    plan: list[str]
    answer: str

    @property
    def prompt_id(self) -> str:
        return f"level{self.level}/{self.map_id}"


def make_test_split(benchmark_dir: str, seed: int = SPLIT_SEED) -> list[dict]:
    """The test items of every map of ``benchmark_dir`` (module docstring), in map order.

    Raises:
        ValueError: a level where some class got fewer than ``MIN_PER_CLASS`` items.
    """
    rows = []
    maps = load_maps(benchmark_dir)
    for level in sorted({m.level for m in maps}):
        level_maps = [m for m in maps if m.level == level]
        rng = random.Random(f"vsp_spatial_reasoning-{seed}-{level}")
        # one candidate plan per map and class (None: the map cannot give that class, e.g. no reachable hole)
        plans = [{c: draw_plan(m.map_desc, c, rng) for c in "ABC"} for m in level_maps]
        quota = dict(zip("ABC", _balanced(len(level_maps), level)))
        answers: dict[int, str] = {}
        # the maps with the fewest possible classes choose first; each takes its possible class with most quota left
        order = sorted(range(len(level_maps)), key=lambda i: (sum(p is not None for p in plans[i].values()), rng.random()))
        for i in order:
            possible = [c for c in "ABC" if plans[i][c] is not None]
            if not possible:
                raise ValueError(f"{level_maps[i].image_path}: no plan of any outcome found")
            answers[i] = max(possible, key=lambda c: (quota[c], -"ABC".index(c)))
            quota[answers[i]] -= 1
        counts = {c: sum(a == c for a in answers.values()) for c in "ABC"}
        if min(counts.values()) < MIN_PER_CLASS:
            raise ValueError(f"level {level}: answer counts {counts}; each class needs >= {MIN_PER_CLASS}")
        for i, m in enumerate(level_maps):
            rows.append({"map_id": m.map_id, "level": level, "plan": [WORDS[x] for x in plans[i][answers[i]]],
                         "answer": answers[i]})
    return rows


def _balanced(n: int, level: int) -> list[int]:
    """Class sizes for A, B, C summing to ``n`` as evenly as possible (the extra items go to a class that turns with the
    level: 34/33/33 at level 3, 33/34/33 at level 4, ...)."""
    sizes = [n // 3] * 3
    for k in range(n % 3):
        sizes[(level + k) % 3] += 1
    return sizes


def split_text(rows: list[dict]) -> str:
    """The JSONL text of a split (one row per line, keys in the order written)."""
    return "".join(json.dumps(r) + "\n" for r in rows)


def load_benchmark(root: str, levels=None, items_file: str | None = None) -> list[ReasoningItem]:
    """The test items of ``items_file`` (default: the committed split) on the maps of ``root`` (the VSP folder), in
    file order, only ``levels`` when given.

    Raises:
        ValueError: naming the file and line: a row without ``map_id``/``level``/``plan``/``answer``, a move that is
            not a word, an answer that is not A/B/C, a map the folder lacks, or an answer the simulator contradicts.
    """
    path = resolve_items_file(items_file or TEST_FILE)
    maps = {(m.level, m.map_id): m for m in load_maps(root)}
    items = []
    for i, line in enumerate(read_text(path, "one JSON item a line").splitlines(), 1):
        where = f"{path}:{i}"
        try:
            r = json.loads(line)
            map_id, level, words, answer = str(r["map_id"]), int(r["level"]), r["plan"], r["answer"]
            plan = [LETTERS[w] for w in words]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: not an item with map_id, level, plan (LEFT/RIGHT/UP/DOWN words) and answer "
                             f"({type(e).__name__}: {e})") from None
        if levels is not None and level not in levels:
            continue
        m = maps.get((level, map_id))
        if m is None:
            raise ValueError(f"{where}: map level{level}/{map_id} is not in {root}")
        if answer not in "ABC" or walk(m.map_desc, plan).outcome != answer:
            raise ValueError(f"{where}: answer {answer!r} but the simulator says {walk(m.map_desc, plan).outcome}")
        items.append(ReasoningItem(map_id, level, m.image_path, m.map_desc, plan, answer))
    if not items:
        raise ValueError(f"{path}: no items for levels {levels}")
    return items


def reasoning_row(map_desc, plan, level, map_id, prompt, helper: str) -> dict:
    """One training row: the map, the plan in the prompt, the helper image, ``<output_image>\\boxed{X}``."""
    answer = walk(map_desc, plan).outcome
    return {"prompt": to_messages(fill(prompt, plan_text(plan))), "image": encode_png(render_map(map_desc)),
            "helper_image": encode_png(render_helper(map_desc, plan, helper)),
            "answer": LATENT_MARKER + "\\boxed{" + answer + "}", "solution": answer, "map_desc": map_desc,
            "level": level, "plan": [WORDS[m] for m in plan], "source": "generated", "map_id": map_id}


def build_rows(args, bad):
    """Training rows (module docstring) for ``mirage_rl.data.build``: ``args.num_generated`` rows from maps of
    ``args.generated_sizes`` (seed ``args.seed``), none equal to a test map of ``args.test_dir``.

    Raises:
        ValueError: ``num_generated`` is 0, or ``helper`` is not one of ``HELPERS``.
    """
    from datasets import Sequence, Value

    helper = args.helper or "partial"
    if helper not in HELPERS:
        raise ValueError(f"helper must be one of {HELPERS} for task vsp_spatial_reasoning, got {helper!r}")
    if args.num_generated < 1:
        raise ValueError("task vsp_spatial_reasoning builds generated maps only: set num_generated >= 1")
    test_keys = {map_key(m.map_desc) for m in load_maps(args.test_dir)}
    rng = random.Random(f"vsp_spatial_reasoning-train-{args.seed}")
    pool = iter(generate_maps(3 * args.num_generated, sizes=args.generated_sizes, seed=args.seed,
                              hole_prob=args.hole_prob, exclude=test_keys))
    rows, skipped = [], 0
    for i in tqdm(range(args.num_generated), desc="draw reasoning items"):
        target = "ABC"[i % 3]
        for m in pool:
            plan = draw_plan(m, target, rng)
            if plan is not None:
                break
            skipped += 1  # a map that cannot give this class (no reachable hole): the next map takes it
        else:
            raise ValueError(f"ran out of generated maps after {len(rows)} rows; lower num_generated or raise hole_prob")
        rows.append(reasoning_row(m, plan, len(m), f"gen-{args.seed}-{i}", PROMPTS[args.prompt], helper))
    extra = {"map_desc": Sequence(Sequence(Value("int32"))), "level": Value("int32"), "plan": Sequence(Value("string"))}
    return rows, extra, {"generated": len(rows), "maps_without_the_class": skipped, "helper": helper}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Write the test split of VSP spatial reasoning (module docstring).")
    ap.add_argument("--benchmark_dir", default="../shared/data/vsp/maze_planning")
    ap.add_argument("--seed", type=int, default=SPLIT_SEED)
    ap.add_argument("--out", default=TEST_FILE)
    a = ap.parse_args(argv)
    rows = make_test_split(a.benchmark_dir, a.seed)
    Path(a.out).write_text(split_text(rows))
    print(json.dumps({"out": a.out, "items": len(rows)}))


if __name__ == "__main__":
    main()
