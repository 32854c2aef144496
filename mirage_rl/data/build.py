"""Build training sets: ``source: task`` (or its older name ``vsp``: the rows of ``task``, built by the task's
``build_rows``: for ``plan`` / ``describe`` the VSP spatial-planning set of Mirage's 1000 train maps + generated maps,
:mod:`mirage_rl.tasks.vsp_planning.rows`, whose docstring lists the columns; for ``vsp_spatial_reasoning`` and
``jigsaw`` their generators, :mod:`mirage_rl.tasks.vsp_reasoning.items`, :mod:`mirage_rl.tasks.jigsaw.items`) or ``source: mirage_jsonl`` (any JSONL in Mirage's own data format, with image files).

Mirage-format rows (``text_input`` with one ``<image>`` per input image, ``image_input`` = a path or a list of paths
in the order of those markers (jigsaw, SAT, COMT), ``image_output`` = the helper image, ``text_output`` with the
``<output_image>`` marker): ``prompt``, ``image`` (or ``images``, a list, when some row's ``image_input`` is a list),
``helper_image``, ``answer``, ``solution`` (the last ``\\boxed{}`` content), ``source`` and ``map_id``. Every image is
opened and decoded.

A bad row raises an error naming the file and line. With ``skip_bad_rows: true`` it is skipped instead, and
the count and the first reasons are logged, returned and written to ``build_report.json`` in the dataset.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..atomic import atomic_directory
from ..outputs import output_dir_guard
from ..tasks import get_task, task_names
from ..tasks.answers import extract_boxed
from .images import encode_png, open_image
from .jsonl import jsonl_rows, read_json, text_field
from .messages import LATENT_MARKER, to_messages

logger = logging.getLogger(__name__)


@dataclass
class BuildDataArguments:
    """Arguments of ``mirage-rl build-data`` (read from ``data/*.yaml`` by ``TrlParser``)."""

    source: str = field(default="vsp", metadata={
        "help": "task (the rows of `task`, from its own generator; `vsp` is the older name of the same) or "
                "mirage_jsonl (Mirage's data format)."})
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
        "help": "plan (answer: the shortest plan, after the latent marker), describe (answer: the map as a table; "
                "a perception task that pretrains a from-scratch model's vision tower), vsp_spatial_reasoning or "
                "jigsaw (docs/TASKS.md)."})
    helper: str | None = field(default=None, metadata={
        "help": "The helper image of a task that offers several: plan arrows (the paper's, default) or filled; "
                "vsp_spatial_reasoning partial (the paper's, default) "
                "or outcome; jigsaw random_candidate (the paper's, default) or true_piece."})
    photos_dir: str = field(default="../shared/data/photos", metadata={
        "help": "jigsaw: the photos folder (manifest.jsonl with file, split, crop_margin_px); train photos only."})
    distractor: str = field(default="other_photo", metadata={
        "help": "jigsaw: where the distractor piece comes from: other_photo (another train photo) or same_photo."})
    max_side: int = field(default=512, metadata={
        "help": "jigsaw: longest side of the puzzle image in pixels (the pieces are scaled by the same factor)."})
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
    replace_output_dir: bool = field(default=False, metadata={
        "help": "Replace the finished output another run left in output_dir (only that output's files are replaced; "
                "everything else in the folder is kept). Without it such a folder is refused, unless this is the same "
                "command with the same settings (a resume)."})

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.task not in task_names():
            raise ValueError(f"task must be one of {task_names()}, got {self.task!r}")
        get_task(self.task).prompt(self.prompt)  # ValueError naming the task's prompts
        if self.source == "mirage_jsonl" and not self.jsonl:
            raise ValueError("source: mirage_jsonl needs jsonl: the path of the JSONL file")
        if self.max_text_chars < 1:
            raise ValueError(f"max_text_chars must be >= 1, got {self.max_text_chars}")
        if self.num_generated < 0:
            raise ValueError(f"num_generated must be >= 0, got {self.num_generated}")
        if self.max_side < 32:
            raise ValueError(f"max_side must be >= 32 pixels, got {self.max_side}")


SOURCES = ("task", "vsp", "mirage_jsonl")
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


#: the modules whose source decides the rows a build writes (their bytes enter :func:`build_settings`)
BUILDER_PACKAGES = ("data", "tasks")


def build_settings(args: BuildDataArguments) -> dict:
    """What decides the rows of a build: its arguments (where it writes aside), the bytes of the inputs it reads
    (``train_jsonl``, ``test_dir``, ``photos_dir``, ``jsonl`` and ``image_root``, those that exist) and of the builder
    code (``mirage_rl/data``, ``mirage_rl/tasks``). Two builds of equal settings write the same rows, so a second
    one reuses the first (:func:`build_dataset`)."""
    import hashlib
    from dataclasses import asdict

    import mirage_rl

    from ..base_model import file_digest, tree_digest

    inputs = hashlib.sha256()
    for key in ("train_jsonl", "test_dir", "photos_dir", "jsonl", "image_root"):
        value = getattr(args, key)
        path = Path(value) if value else None
        if path is None or not path.exists() or (key == "photos_dir" and args.task != "jigsaw"):
            continue
        inputs.update(key.encode())
        tree_digest(path, inputs) if path.is_dir() else file_digest(path, inputs)
    code = hashlib.sha256(mirage_rl.__version__.encode())
    pkg = Path(mirage_rl.__file__).parent
    for sub in BUILDER_PACKAGES:
        for f in sorted((pkg / sub).rglob("*.py")):
            file_digest(f, code)
    settings = {k: v for k, v in asdict(args).items() if k not in ("output_dir", "overwrite_output_dir",
                                                                     "replace_output_dir")}
    return {**settings, "inputs_digest": inputs.hexdigest()[:16], "code_digest": code.hexdigest()[:16]}


def build_dataset(args: BuildDataArguments):
    """``mirage-rl build-data``: :func:`build_task_dataset` or :func:`build_mirage_jsonl_dataset` by ``args.source``,
    after the output folder is checked and locked (:func:`mirage_rl.outputs.output_dir_guard`: an existing file, a
    folder of foreign entries, a running build, or a finished dataset of other settings there fail before any
    rendering). A folder that already holds the dataset of these settings (:func:`build_settings`: arguments, input
    bytes, builder code) is reused, not rendered again; returns ``(DatasetDict or None when reused, counts)``."""
    from ..limits import check_memory

    # every row (map and helper image as PNG, prompt, answer: about 8 KB) is held in memory until the save
    check_memory(8192 * (args.num_generated + 1000), f"build-data with num_generated={args.num_generated}",
                 "generate fewer maps (the demo uses 10,000)")
    settings = build_settings(args)
    with output_dir_guard(args.output_dir, "dataset", args.overwrite_output_dir, producer="build-data",
                          settings=settings, replace=args.replace_output_dir) as rec:
        # the guard let a finished dataset through without replace_output_dir only for these very settings
        report = Path(args.output_dir) / "build_report.json"
        if rec is not None and not args.replace_output_dir and report.is_file():
            counts = read_json(report)
            counts.pop("skip_reasons", None)
            logger.info("build-data: %s already holds the dataset of these settings, inputs and builder code "
                        "(built %s); reusing it (pass --replace_output_dir true to build it again)", args.output_dir,
                        rec.get("finished"))
            return None, {**counts, "reused": True}
        return build_mirage_jsonl_dataset(args) if args.source == "mirage_jsonl" else build_task_dataset(args)


def build_task_dataset(args: BuildDataArguments):
    """``source: task`` (``vsp``): the rows of the task ``args.task`` (``Task.build_rows``, e.g.
    :func:`mirage_rl.tasks.vsp_planning.rows.build_rows`), saved to ``args.output_dir``; returns ``(DatasetDict,
    counts)``.

    Raises:
        ValueError: naming the file and line of a bad source row (unless ``skip_bad_rows``), or no row left.
    """
    bad = BadRows(args.skip_bad_rows)
    rows, extra_features, counts = get_task(args.task).build_rows(args, bad)
    return _save_rows(rows, args, bad, extra_features, **counts)


def _save_rows(rows: list[dict], args: BuildDataArguments, bad: BadRows, extra_features: dict, **counts):
    """Turn rows into split ``train`` (the columns every builder writes plus ``extra_features``), save it with its
    ``build_report.json`` atomically, log the counts; returns ``(DatasetDict, counts)``."""
    from datasets import Dataset, DatasetDict, Features, Image, Sequence, Value

    # one image per row: column `image`; any row of several: every row's images in the list column `images`
    image_key = "images" if any("images" in r for r in rows) else "image"
    if image_key == "images":
        rows = [r if "images" in r else {**{k: v for k, v in r.items() if k != "image"}, "images": [r["image"]]}
                for r in rows]
    features = Features({
        "prompt": [{"role": Value("string"), "content": [{"type": Value("string"), "text": Value("string")}]}],
        image_key: Sequence(Image()) if image_key == "images" else Image(),
        "helper_image": Image(), "answer": Value("string"), "solution": Value("string"),
        "source": Value("string"), "map_id": Value("string"), **extra_features,
    })
    ds = DatasetDict({"train": Dataset.from_list(rows, features=features)})
    counts = {"train": len(rows), **counts, **bad.report()}
    save_dataset_atomic(ds, args.output_dir, report={**counts, "skip_reasons": bad.reasons})
    logger.info("built %s: %s", args.output_dir, counts)
    return ds, counts


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
    for i, r in tqdm(jsonl_rows(path, on_error=bad), desc=f"read {path.name}"):
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
    for key in ("text_input", "text_output", "image_output"):
        text_field(r, key, where, args.max_text_chars)
    inputs = r["image_input"] if isinstance(r["image_input"], list) else [r["image_input"]]
    if not inputs or not all(isinstance(v, str) and v for v in inputs):
        raise ValueError(f"{where}: image_input must be a path or a non-empty list of paths, got {r['image_input']!r}")
    n_markers = r["text_output"].count(LATENT_MARKER)
    if n_markers != args.latent_blocks:
        raise ValueError(f"{where}: text_output has {n_markers} {LATENT_MARKER} marker(s), expected "
                         f"{args.latent_blocks} (latent_blocks): put one marker where the latent block goes")
    def load(value: str, key: str):
        if args.strip_image_prefix and value.startswith(args.strip_image_prefix):
            value = value[len(args.strip_image_prefix):]
        return encode_png(open_image(root / value, where=f"{where} {key}"))

    try:
        prompt = to_messages(r["text_input"], len(inputs))
    except ValueError as e:
        raise ValueError(f"{where}: text_input: {e}") from None
    images = [load(v, "image_input" if len(inputs) == 1 else f"image_input[{j}]") for j, v in enumerate(inputs)]
    boxes = extract_boxed(r["text_output"])
    out = {"prompt": prompt, "helper_image": load(str(r["image_output"]), "image_output"), "answer": r["text_output"],
           "solution": (boxes[-1] or "") if boxes else "", "source": "mirage_jsonl", "map_id": str(r.get("map_id", line))}
    # a list image_input is kept a list (column `images`) even with one path: the row says it is multi-image
    return {**out, "images": images} if isinstance(r["image_input"], list) else {**out, "image": images[0]}


def save_dataset_atomic(ds, output_dir: str | os.PathLike, report: dict | None = None) -> None:
    """Save a dataset (and ``build_report.json`` when ``report`` is given) to ``output_dir`` atomically: a crash
    mid-save leaves any previous one intact."""
    with atomic_directory(output_dir, "dataset", command="build-data") as tmp:
        ds.save_to_disk(str(tmp))
        if report is not None:
            (tmp / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
