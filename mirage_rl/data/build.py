"""Build training sets: ``source: vsp`` (the VSP spatial-planning set: Mirage's 1000 train maps + generated
maps) or ``source: mirage_jsonl`` (any JSONL in Mirage's own data format, with image files).

VSP rows: ``prompt`` (conversational, one image), ``image`` (the map, VSP style), ``helper_image`` (the map
with the shortest path drawn as red arrows), ``answer`` (``<output_image>`` marker where the latent block
goes, then ``\\boxed{...}``: Mirage's "direct" variant), ``solution`` (the boxed plan alone), ``map_desc``,
``level``, ``source`` and ``map_id``. Every training map equal to a test map is removed (Mirage's published
split leaks 7).

Mirage-format rows (``text_input`` with one ``<image>``, ``image_input``, ``image_output`` = the helper image,
``text_output`` with the ``<output_image>`` marker): ``prompt``, ``image``, ``helper_image``, ``answer``,
``solution`` (the last ``\\boxed{}`` content), ``source`` and ``map_id``. Every image is opened and decoded.

A bad row raises an error naming the file and line. With ``skip_bad_rows: true`` it is skipped instead, and
the count and the first reasons are logged, returned and written to ``build_report.json`` in the dataset.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..atomic import atomic_directory
from ..outputs import output_dir_guard
from ..scoring import extract_boxed, parse_plan, replay
from . import vsp
from .images import open_image

logger = logging.getLogger(__name__)


@dataclass
class BuildDataArguments:
    """Arguments of ``mirage-rl build-data`` (read from ``data/*.yaml`` by ``TrlParser``)."""

    source: str = field(default="vsp", metadata={"help": "vsp (VSP spatial planning) or mirage_jsonl (Mirage's data format)."})
    output_dir: str = field(default="outputs/data/vsp_spatial_planning",
                            metadata={"help": "Where the `datasets.DatasetDict` is saved (atomically)."})
    train_jsonl: str = field(default="../shared/data/vsp/mirage_train_maps.jsonl",
                             metadata={"help": "Mirage's VSP train split (rows with `map_desc` and `text_output`)."})
    test_dir: str = field(default="../shared/data/vsp/maze_planning",
                          metadata={"help": "VSP test folder (levelN/img + levelN/table); its maps are removed from training."})
    num_generated: int = field(default=0, metadata={"help": "Extra maps from the seeded generator."})
    generated_sizes: list[int] = field(default_factory=lambda: [3, 4, 5, 6],
                                       metadata={"help": "Map sizes (3..8) the generator draws from."})
    task: str = field(default="plan", metadata={
        "help": "plan (answer: the shortest plan, after the latent marker) or describe (answer: the map as a table; "
                "a perception task that pretrains a from-scratch model's vision tower)."})
    prompt: str = field(default="train", metadata={
        "help": "Prompt of every row: 'train' (Mirage's), 'test' (VSP's) or 'short' (the map and the answer instruction "
                "only: for models trained from scratch)."})
    hole_prob: float = field(default=0.25, metadata={"help": "Probability that a generated cell is a hole."})
    seed: int = field(default=0, metadata={"help": "Seed of the map generator."})
    max_train_maps: int | None = field(default=None, metadata={"help": "Keep only the first N Mirage maps (debugging)."})
    train_levels: list[int] | None = field(default=None, metadata={
        "help": "Keep only the Mirage maps of these levels (3..8 = map size; default: all). The generator's sizes "
                "are set by generated_sizes."})
    skip_bad_rows: bool = field(default=False, metadata={
        "help": "Skip malformed rows instead of stopping; their count and first reasons are reported."})
    # source: mirage_jsonl
    jsonl: str | None = field(default=None, metadata={"help": "mirage_jsonl: the JSONL file (text_input, image_input, "
                                                              "image_output, text_output)."})
    image_root: str | None = field(default=None, metadata={
        "help": "mirage_jsonl: folder that relative image paths resolve against (default: the JSONL's folder)."})
    strip_image_prefix: str | None = field(default=None, metadata={
        "help": "mirage_jsonl: prefix removed from image paths first (Mirage's sample uses './data/examples/')."})
    latent_blocks: int = field(default=1, metadata={
        "help": "mirage_jsonl: <output_image> markers each text_output must hold (one helper image each)."})
    max_text_chars: int = field(default=20_000, metadata={
        "help": "Longest text field (text_input, text_output) accepted, in characters; a longer row is bad "
                "(an error, or skipped with skip_bad_rows): training would tokenize it whole."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Write into an output_dir holding entries no mirage-rl run wrote (they are kept, never deleted)."})

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.task not in vsp.TASKS:
            raise ValueError(f"task must be one of {vsp.TASKS}, got {self.task!r}")
        if self.prompt not in vsp.PROMPTS:
            raise ValueError(f"prompt must be one of {sorted(vsp.PROMPTS)}, got {self.prompt!r}")
        if self.source == "mirage_jsonl" and not self.jsonl:
            raise ValueError("source: mirage_jsonl needs jsonl: the path of the JSONL file")
        if self.max_text_chars < 1:
            raise ValueError(f"max_text_chars must be >= 1, got {self.max_text_chars}")
        if self.num_generated < 0:
            raise ValueError(f"num_generated must be >= 0, got {self.num_generated}")


SOURCES = ("vsp", "mirage_jsonl")
MAX_REPORTED_REASONS = 5


class BadRows:
    """Collects bad rows: raises at the first one, or (``skip=True``) keeps every reason, in file order."""

    def __init__(self, skip: bool):
        self.skip, self._reasons = skip, []

    def __call__(self, error: Exception, line: int) -> None:
        if not self.skip:
            raise error
        self._reasons.append((line, str(error)))

    @property
    def reasons(self) -> list[str]:
        return [r for _, r in sorted(self._reasons, key=lambda x: x[0])]

    def report(self) -> dict:
        """``{"skipped_rows": n, "skip_reasons": [first MAX_REPORTED_REASONS reasons]}``, logged as a warning."""
        reasons = self.reasons
        if reasons:
            logger.warning("skipped %d bad row(s); first reasons:\n  %s", len(reasons),
                           "\n  ".join(reasons[:MAX_REPORTED_REASONS]))
        return {"skipped_rows": len(reasons), "skip_reasons": reasons[:MAX_REPORTED_REASONS]}


def _png(img) -> dict:
    # encoded once here: `datasets` stores the bytes as they are, and thousands of maps never sit in
    # memory as decoded images
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _row(map_desc, plan, level, source, map_id, prompt_text, task: str = "plan") -> dict:
    image = _png(vsp.render_map(map_desc))
    if task == "describe":  # the perception task: the map as text, no latent block, the map as its own helper
        prompt_text, solution = vsp.DESCRIBE_PROMPT, vsp.map_to_text(map_desc)
        answer, helper = solution, image
    else:
        solution = vsp.plan_to_answer(plan)
        answer, helper = vsp.LATENT_MARKER + solution, _png(vsp.render_helper(map_desc, plan))
    return {
        "prompt": vsp.to_messages(prompt_text),
        "image": image,
        "helper_image": helper,
        "answer": answer,
        "solution": solution,
        "map_desc": map_desc,
        "level": level,
        "source": source,
        "map_id": str(map_id),
    }


def build_dataset(args: BuildDataArguments):
    """``mirage-rl build-data``: :func:`build_vsp_dataset` or :func:`build_mirage_jsonl_dataset` by ``args.source``,
    after the output folder is checked and locked (:func:`mirage_rl.outputs.output_dir_guard`: an existing file, a
    folder of foreign entries or a running build there fail before any rendering)."""
    with output_dir_guard(args.output_dir, "dataset", args.overwrite_output_dir):
        return build_mirage_jsonl_dataset(args) if args.source == "mirage_jsonl" else build_vsp_dataset(args)


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


def _save_rows(rows: list[dict], args: BuildDataArguments, bad: BadRows, extra_features: dict, **counts):
    """Turn rows into split ``train`` (the columns every builder writes plus ``extra_features``), save it with its
    ``build_report.json`` atomically, log the counts; returns ``(DatasetDict, counts)``."""
    from datasets import Dataset, DatasetDict, Features, Image, Value

    features = Features({
        "prompt": [{"role": Value("string"), "content": [{"type": Value("string"), "text": Value("string")}]}],
        "image": Image(), "helper_image": Image(), "answer": Value("string"), "solution": Value("string"),
        "source": Value("string"), "map_id": Value("string"), **extra_features,
    })
    ds = DatasetDict({"train": Dataset.from_list(rows, features=features)})
    counts = {"train": len(rows), **counts, **bad.report()}
    save_dataset_atomic(ds, args.output_dir, report={**counts, "skip_reasons": bad.reasons})
    logger.info("built %s: %s", args.output_dir, counts)
    return ds, counts


def build_vsp_dataset(args: BuildDataArguments):
    """Build the VSP training set described in the module docstring and save it to ``args.output_dir``.

    Returns the ``datasets.DatasetDict`` (split ``train``) and a dict of counts.

    Raises:
        ValueError: naming the file and line of a Mirage row that is malformed or whose plan fails (unless
            ``skip_bad_rows``: then counted and reported), or no row left.
    """
    from datasets import Sequence, Value

    test_keys = {vsp.map_key(m.map_desc) for m in vsp.load_benchmark(args.test_dir)}
    bad = BadRows(args.skip_bad_rows)
    train = vsp.jsonl_rows(args.train_jsonl, on_error=bad)
    if args.max_train_maps is not None:
        train = train[: args.max_train_maps]
    rows, leaked, other_level, seen = [], 0, 0, set(test_keys)
    for i, r in tqdm(train, desc="render Mirage train maps"):
        where = f"{args.train_jsonl}:{i}"
        try:
            map_desc, given, level = _check_vsp_row(r, where, args.max_text_chars)
        except ValueError as e:
            bad(e, i)
            continue
        if args.train_levels is not None and level not in args.train_levels:
            other_level += 1
            continue
        key = vsp.map_key(map_desc)
        if key in test_keys:
            leaked += 1
            continue
        seen.add(key)
        rows.append(_row(map_desc, given, level, "mirage", r.get("map_id", i), vsp.PROMPTS[args.prompt],
                         args.task))
    generated = vsp.generate_maps(args.num_generated, sizes=args.generated_sizes, seed=args.seed,
                                  hole_prob=args.hole_prob, exclude=seen)
    for j, m in enumerate(tqdm(generated, desc="render generated maps", disable=not generated)):
        rows.append(_row(m, vsp.shortest_plan(m), len(m), "generated", f"gen-{args.seed}-{j}", vsp.PROMPTS[args.prompt],
                         args.task))
    if not rows:
        raise ValueError(f"{args.train_jsonl}: no training maps left after removing test maps and generating {args.num_generated}")
    return _save_rows(rows, args, bad, {"map_desc": Sequence(Sequence(Value("int32"))), "level": Value("int32")},
                      mirage=len(rows) - len(generated), generated=len(generated), removed_test_overlap=leaked,
                      removed_other_levels=other_level)


def _check_vsp_row(r: dict, where: str, max_chars: int = 20_000):
    """``(map_desc, plan, level)`` of a Mirage VSP train row; ``ValueError`` naming ``where`` when it is malformed."""
    for key in ("map_desc", "text_output", "level"):
        if key not in r:
            raise ValueError(f"{where}: missing field {key!r} (a VSP train row needs map_desc, text_output, level)")
    text_output = text_field(r, "text_output", where, max_chars)
    if "text_input" in r:
        text_field(r, "text_input", where, max_chars)
    map_desc = vsp.validate_map(r["map_desc"], where=where)
    plan = vsp.shortest_plan(map_desc)
    given = parse_plan(text_output)
    if given is None or not replay(map_desc, given)[1]:
        raise ValueError(f"{where}: text_output {text_output[:80]!r} is not a successful plan for map_desc")
    if plan is None or len(given) != len(plan):
        raise ValueError(f"{where}: text_output is not a shortest plan (BFS finds {plan})")
    try:
        level = int(r["level"])
    except (TypeError, ValueError):
        raise ValueError(f"{where}: level must be an integer, got {r['level']!r}") from None
    return map_desc, given, level


MIRAGE_FIELDS = ("text_input", "image_input", "image_output", "text_output")


def build_mirage_jsonl_dataset(args: BuildDataArguments):
    """Build a training set from a JSONL in Mirage's data format (module docstring); returns ``(DatasetDict,
    counts)``. Every image is opened and decoded here, so that training never meets a broken file.

    Raises:
        ValueError / FileNotFoundError: naming the file and line of the first bad row (unless ``skip_bad_rows``):
            not JSON, a missing field, an image that does not exist or does not decode, a ``text_input`` without
            exactly one ``<image>``, a ``text_output`` whose ``<output_image>`` count is not ``latent_blocks``;
            or no row left.
    """
    path = Path(args.jsonl)
    root = Path(args.image_root) if args.image_root else path.parent
    bad = BadRows(args.skip_bad_rows)
    rows = []
    for i, r in tqdm(vsp.jsonl_rows(path, on_error=bad), desc=f"read {path.name}"):
        where = f"{path}:{i}"
        try:
            rows.append(_mirage_row(r, i, where, root, args))
        except (ValueError, FileNotFoundError) as e:
            bad(e, i)
    if not rows:
        raise ValueError(f"{path}: no usable rows ({len(bad.reasons)} skipped); first reasons: {bad.reasons[:3]}")
    return _save_rows(rows, args, bad, {})


def _mirage_row(r: dict, line: int, where: str, root: Path, args: BuildDataArguments) -> dict:
    missing = [k for k in MIRAGE_FIELDS if r.get(k) is None or r.get(k) == ""]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; a Mirage-format row needs {list(MIRAGE_FIELDS)} "
                         "(image_output is the helper image)")
    for key in MIRAGE_FIELDS:
        text_field(r, key, where, args.max_text_chars)
    n_markers = r["text_output"].count(vsp.LATENT_MARKER)
    if n_markers != args.latent_blocks:
        raise ValueError(f"{where}: text_output has {n_markers} {vsp.LATENT_MARKER} marker(s), expected "
                         f"{args.latent_blocks} (latent_blocks): put one marker where the latent block goes")
    images = {}
    for key in ("image_input", "image_output"):
        value = str(r[key])
        if args.strip_image_prefix and value.startswith(args.strip_image_prefix):
            value = value[len(args.strip_image_prefix):]
        images[key] = open_image(root / value, where=f"{where} {key}")
    try:
        prompt = vsp.to_messages(r["text_input"])
    except ValueError as e:
        raise ValueError(f"{where}: text_input: {e}") from None
    boxes = extract_boxed(r["text_output"])
    return {"prompt": prompt, "image": _png(images["image_input"]), "helper_image": _png(images["image_output"]),
            "answer": r["text_output"], "solution": (boxes[-1] or "") if boxes else "", "source": "mirage_jsonl",
            "map_id": str(r.get("map_id", line))}


def save_dataset_atomic(ds, output_dir: str | os.PathLike, report: dict | None = None) -> None:
    """Save a dataset (and ``build_report.json`` when ``report`` is given) to ``output_dir`` atomically: a crash
    mid-save leaves any previous one intact."""
    with atomic_directory(output_dir, "dataset", command="build-data") as tmp:
        ds.save_to_disk(str(tmp))
        if report is not None:
            (tmp / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
