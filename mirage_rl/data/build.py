"""Build the VSP spatial-planning training set (Mirage's 1000 train maps + generated maps).

Each row: ``prompt`` (conversational, one image), ``image`` (the map, VSP style), ``helper_image``
(the map with the shortest path drawn as red arrows), ``answer`` (``<output_image>`` marker where the
latent block goes, then ``\\boxed{...}``: Mirage's "direct" variant), ``solution`` (the boxed plan
alone), ``map_desc``, ``level``, ``source`` and ``map_id``.

Every training map equal to a test map is removed (Mirage's published split leaks 7).
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from ..atomic import atomic_directory
from ..scoring import parse_plan, replay
from . import vsp

logger = logging.getLogger(__name__)


@dataclass
class BuildDataArguments:
    """Arguments of ``mirage-rl build-data`` (read from ``data/*.yaml`` by ``TrlParser``)."""

    output_dir: str = field(default="outputs/data/vsp_spatial_planning",
                            metadata={"help": "Where the `datasets.DatasetDict` is saved (atomically)."})
    train_jsonl: str = field(default="../shared/data/vsp/mirage_train_maps.jsonl",
                             metadata={"help": "Mirage's VSP train split (rows with `map_desc` and `text_output`)."})
    test_dir: str = field(default="../shared/data/vsp/maze_planning",
                          metadata={"help": "VSP test folder (levelN/img + levelN/table); its maps are removed from training."})
    num_generated: int = field(default=0, metadata={"help": "Extra maps from the seeded generator."})
    generated_sizes: list[int] = field(default_factory=lambda: [3, 4, 5, 6],
                                       metadata={"help": "Map sizes (3..8) the generator draws from."})
    hole_prob: float = field(default=0.25, metadata={"help": "Probability that a generated cell is a hole."})
    seed: int = field(default=0, metadata={"help": "Seed of the map generator."})
    max_train_maps: int | None = field(default=None, metadata={"help": "Keep only the first N Mirage maps (debugging)."})


def _png(img) -> dict:
    # encoded once here: `datasets` stores the bytes as they are, and thousands of maps never sit in
    # memory as decoded images
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _row(map_desc, plan, level, source, map_id, prompt_text) -> dict:
    solution = vsp.plan_to_answer(plan)
    return {
        "prompt": vsp.to_messages(prompt_text),
        "image": _png(vsp.render_map(map_desc)),
        "helper_image": _png(vsp.render_helper(map_desc, plan)),
        "answer": vsp.LATENT_MARKER + solution,
        "solution": solution,
        "map_desc": map_desc,
        "level": level,
        "source": source,
        "map_id": str(map_id),
    }


def build_vsp_dataset(args: BuildDataArguments):
    """Build the training set described in the module docstring and save it to ``args.output_dir``.

    Returns the ``datasets.DatasetDict`` (split ``train``) and a dict of counts.

    Raises:
        ValueError: naming the file and line of a Mirage row that is malformed or whose plan fails.
    """
    from datasets import Dataset, DatasetDict, Features, Image, Sequence, Value

    test_keys = {vsp.map_key(m.map_desc) for m in vsp.load_benchmark(args.test_dir)}
    train = vsp.read_jsonl(args.train_jsonl)
    if args.max_train_maps is not None:
        train = train[: args.max_train_maps]
    rows, leaked, seen = [], 0, set(test_keys)
    for i, r in enumerate(tqdm(train, desc="render Mirage train maps"), 1):
        where = f"{args.train_jsonl}:{i}"
        for key in ("map_desc", "text_output", "level"):
            if key not in r:
                raise ValueError(f"{where}: missing field {key!r}")
        map_desc = vsp.validate_map(r["map_desc"], where=where)
        key = vsp.map_key(map_desc)
        if key in test_keys:
            leaked += 1
            continue
        seen.add(key)
        plan = vsp.shortest_plan(map_desc)
        given = parse_plan(r["text_output"])
        if given is None or not replay(map_desc, given)[1]:
            raise ValueError(f"{where}: text_output {r['text_output']!r} is not a successful plan for map_desc")
        if plan is None or len(given) != len(plan):
            raise ValueError(f"{where}: text_output is not a shortest plan (BFS finds {plan})")
        rows.append(_row(map_desc, given, int(r["level"]), "mirage", r.get("map_id", i), vsp.TRAIN_PROMPT))
    generated = vsp.generate_maps(args.num_generated, sizes=args.generated_sizes, seed=args.seed,
                                  hole_prob=args.hole_prob, exclude=seen)
    for j, m in enumerate(tqdm(generated, desc="render generated maps", disable=not generated)):
        rows.append(_row(m, vsp.shortest_plan(m), len(m), "generated", f"gen-{args.seed}-{j}", vsp.TRAIN_PROMPT))
    if not rows:
        raise ValueError(f"{args.train_jsonl}: no training maps left after removing test maps and generating {args.num_generated}")
    features = Features({
        "prompt": [{"role": Value("string"), "content": [{"type": Value("string"), "text": Value("string")}]}],
        "image": Image(), "helper_image": Image(), "answer": Value("string"), "solution": Value("string"),
        "map_desc": Sequence(Sequence(Value("int32"))), "level": Value("int32"), "source": Value("string"),
        "map_id": Value("string"),
    })
    ds = DatasetDict({"train": Dataset.from_list(rows, features=features)})
    save_dataset_atomic(ds, args.output_dir)
    counts = {"train": len(rows), "mirage": len(rows) - len(generated), "generated": len(generated),
              "removed_test_overlap": leaked}
    logger.info("built %s: %s", args.output_dir, counts)
    return ds, counts


def save_dataset_atomic(ds, output_dir: str | os.PathLike) -> None:
    """Save a dataset to ``output_dir`` atomically: a crash mid-save leaves any previous one intact."""
    with atomic_directory(output_dir) as tmp:
        ds.save_to_disk(str(tmp))
