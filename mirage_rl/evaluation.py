"""``mirage-rl eval``: run a checkpoint on a VSP folder with latent-interleaved greedy decoding.

While it runs, every batch of samples is appended to ``output_dir/samples.partial.jsonl`` (the journal); a
killed evaluation run again with the same settings continues from it. At the end it writes, each atomically
(temp file + rename), into ``output_dir``:
``report.json`` (``benchmark``, ``n``, ``accuracy``, ``accuracy_strict``, ``invalid_rate``, ``by_level``),
``samples.jsonl`` (one line per map: ``prompt_id``, ``level``, ``completion``, ``plan``, ``verdict``,
``success``, ``success_strict``) and ``accuracy_by_level.png``.

``--task describe`` evaluates the perception task instead (image -> the map as a table, ``vsp.DESCRIBE_PROMPT``, no
latent block): each sample holds ``table_exact``, ``cells_right``, ``n_cells``, ``player_found``, ``goal_found``
(:func:`score_table`) and the report ``table_exact``, ``cell_accuracy``, ``player_found``, ``goal_found`` per level.
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
from .data import vsp
from .data.images import open_image
from .generation import generate
from .latent import parse_latent_mode, resolve_latent_mode
from .modeling import LatentTokens, load_model, load_processor
from .outputs import output_dir_guard
from .scoring import score_plan

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
        "help": "'plan' (the VSP task: score the boxed plan) or 'describe' (perception: score the map table written "
                "for the describe prompt; what a base model pretrained with build-data task: describe sees)."})
    prompt: str = field(default="test", metadata={
        "help": "'test' (VSP/Mirage test prompt), 'train' (Mirage train prompt) or 'short' (the map and the answer "
                "instruction only); use the prompt the model was trained on."})
    resume: bool = field(default=True, metadata={
        "help": "Continue a killed run from its per-sample journal (samples.partial.jsonl) when its settings match."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Write into an output_dir holding entries no mirage-rl run wrote (they are kept, never deleted)."})

    def __post_init__(self):
        if self.task not in vsp.TASKS:
            raise ValueError(f"task must be one of {vsp.TASKS}, got {self.task!r}")
        if self.latent_mode is not None:
            self.latent_mode = parse_latent_mode(self.latent_mode).value
        if self.task == "describe" and self.latent_mode not in (None, "none"):
            raise ValueError(f"task describe has no latent block; latent_mode={self.latent_mode!r} would not be used: "
                             "leave it unset")
        if self.prompt not in vsp.PROMPTS:
            raise ValueError(f"prompt must be one of {sorted(vsp.PROMPTS)}, got {self.prompt!r}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {self.batch_size}, {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (the first N maps) or unset (all maps), got {self.limit}")
        if self.levels is not None and (not self.levels or any(lv < 1 for lv in self.levels)):
            raise ValueError(f"levels must be map levels >= 1 (3..8 in VSP), got {self.levels}")


def score_table(map_desc: list[list[int]], text: str) -> dict:
    """Score a describe-task answer against the map: the answer's lines are the map's rows, its whitespace-separated
    symbols the cells (``@`` player, ``*`` goal, ``#`` hole, ``_`` safe, as :func:`vsp.map_to_text` writes them).

    Returns ``table_exact`` (the whole table, nothing more or less), ``cells_right`` of ``n_cells`` (a missing
    cell counts wrong), ``player_found`` and ``goal_found`` (``@`` / ``*`` at the true cell).
    """
    want = [row.split() for row in vsp.map_to_text(map_desc).split("\n")]
    got = [line.split() for line in text.strip().split("\n")]

    def at(r: int, c: int) -> str | None:
        return got[r][c] if r < len(got) and c < len(got[r]) else None

    cells = [(r, c) for r in range(len(want)) for c in range(len(want[r]))]
    right = sum(at(r, c) == want[r][c] for r, c in cells)
    found = {sym: any(want[r][c] == sym and at(r, c) == sym for r, c in cells) for sym in "@*"}
    return {"table_exact": got == want, "cells_right": right, "n_cells": len(cells),
            "player_found": found["@"], "goal_found": found["*"]}


def summarize(samples: list[dict], benchmark: str, task: str = "plan") -> dict:
    """Per level and overall: accuracy (official and strict) and invalid rate (``task`` plan), or the rates of
    exact tables, right cells, found player and found goal (``task`` describe)."""
    def stats(rows):
        n = len(rows)
        if task == "describe":
            return {"n": n, "table_exact": sum(r["table_exact"] for r in rows) / n,
                    "cell_accuracy": sum(r["cells_right"] for r in rows) / sum(r["n_cells"] for r in rows),
                    "player_found": sum(r["player_found"] for r in rows) / n,
                    "goal_found": sum(r["goal_found"] for r in rows) / n}
        return {"n": n, "accuracy": sum(r["success"] for r in rows) / n,
                "accuracy_strict": sum(r["success_strict"] for r in rows) / n,
                "invalid_rate": sum(r["verdict"] == "invalid" for r in rows) / n}

    by_level = defaultdict(list)
    for r in samples:
        by_level[str(r["level"])].append(r)
    return {"benchmark": benchmark, "task": task, **stats(samples),
            "by_level": {lvl: stats(rows) for lvl, rows in sorted(by_level.items(), key=lambda x: int(x[0]))}}


#: task -> the two (report key, label) pairs plotted per level
BARS = {"plan": (("accuracy", "official (VSP)"), ("accuracy_strict", "strict (Mirage)")),
        "describe": (("table_exact", "exact table"), ("cell_accuracy", "cells right"))}


def plot_by_level(report: dict, path: str | os.PathLike, title: str) -> None:
    """Bar chart per level, saved atomically as PNG: official and strict accuracy (task plan) or exact tables and
    right cells (task describe)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(report["by_level"])
    (k1, l1), (k2, l2) = BARS[report.get("task", "plan")]
    x = range(len(levels))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([i - 0.2 for i in x], [report["by_level"][lv][k1] for lv in levels], 0.4, label=l1)
    ax.bar([i + 0.2 for i in x], [report["by_level"][lv][k2] for lv in levels], 0.4, label=l2)
    ax.set_xticks(list(x), [f"level {lv}\n({report['by_level'][lv]['n']} maps)" for lv in levels])
    ax.set_ylim(0, 1)
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
    with output_dir_guard(args.output_dir, "eval", args.overwrite_output_dir):
        return _evaluate(args, model, processor)


def _evaluate(args: EvalArguments, model=None, processor=None) -> dict:
    processor = processor if processor is not None else load_processor(args.model)
    model = model if model is not None else load_model(args.model)
    model.eval()
    describe = args.task == "describe"
    mode = "none" if describe else resolve_latent_mode(args.latent_mode, model.config, where=str(args.model)).value
    tokens = LatentTokens.for_model(model, processor, where=str(args.model)) if mode != "none" else None
    maps = vsp.load_benchmark(args.benchmark_dir, args.levels)
    if args.limit is not None:
        maps = maps[: args.limit]
    prompt_text = vsp.DESCRIBE_PROMPT if describe else vsp.PROMPTS[args.prompt]
    messages = vsp.to_messages(prompt_text)
    collator = LatentCollator(processor, tokens, latent_mode=mode, with_answer=False)
    out_dir = Path(args.output_dir)
    journal = Journal(out_dir / JOURNAL, run_identity(args, mode), resume=args.resume)
    samples = journal.resume(maps, args.batch_size)
    bar = tqdm(total=len(maps), initial=len(samples), desc=f"eval {Path(args.model).name} ({mode})", unit="map")
    for i in range(len(samples), len(maps), args.batch_size):
        chunk = maps[i : i + args.batch_size]
        batch = collator([{"prompt": messages, "map_id": m.prompt_id,
                           "image": open_image(m.image_path, where=f"{args.benchmark_dir} map {m.prompt_id}")}
                          for m in chunk])
        out = generate(model, processor, batch, max_new_tokens=args.max_new_tokens, latent_mode=mode)
        rows = []
        for m, text in zip(chunk, out.texts):
            row = {"prompt_id": m.prompt_id, "level": m.level, "completion": text}
            if describe:
                row.update(score_table(m.map_desc, text))
            else:
                s = score_plan(m.map_desc, text)
                row.update({"plan": s.plan, "verdict": s.verdict, "success": s.success,
                            "success_strict": s.success_strict})
            rows.append(row)
        journal.append(rows)
        samples += rows
        bar.update(len(chunk))
    bar.close()
    report = summarize(samples, benchmark=str(args.benchmark_dir), task=args.task)
    report.update({"model": str(args.model), "latent_mode": mode, "max_new_tokens": args.max_new_tokens,
                   "resumed_at": journal.resumed_at})
    atomic_write_text(out_dir / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    plot_by_level(report, out_dir / "accuracy_by_level.png", f"{Path(args.model).name} ({mode}) on {Path(args.benchmark_dir).name}")
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    journal.close()
    return report


JOURNAL = "samples.partial.jsonl"


def run_identity(args: EvalArguments, mode: str) -> dict:
    """What must match for a journal to be continued: the settings that change any sample, and the weights
    (names, sizes and modification times of the ``*.safetensors`` files). ``limit`` is not one of them (the
    journal's samples are checked to be the benchmark's first maps in order)."""
    weights = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in Path(args.model).glob("*.safetensors"))
    return {"model": str(args.model), "weights": [list(w) for w in weights], "benchmark_dir": str(args.benchmark_dir),
            "latent_mode": mode, "levels": args.levels, "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens, "prompt": args.prompt, "task": args.task}


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
                logger.warning("eval: resuming from %s: %d of %d maps already done", self.path, len(done), len(maps))
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
    """A short text table of the report (printed by the CLI)."""
    if report.get("task") == "describe":
        keys = ("table_exact", "cell_accuracy", "player_found", "goal_found")
        lines = [f"{'level':>6} {'n':>5} " + " ".join(f"{k:>13}" for k in keys)]
        for lv, s in [*report["by_level"].items(), ("all", report)]:
            lines.append(f"{lv:>6} {s['n']:>5} " + " ".join(f"{s[k]:>13.3f}" for k in keys))
        return "\n".join(lines)
    lines = [f"{'level':>6} {'n':>5} {'acc':>7} {'strict':>7} {'invalid':>8}"]
    for lv, s in report["by_level"].items():
        lines.append(f"{lv:>6} {s['n']:>5} {s['accuracy']:>7.3f} {s['accuracy_strict']:>7.3f} {s['invalid_rate']:>8.3f}")
    lines.append(f"{'all':>6} {report['n']:>5} {report['accuracy']:>7.3f} {report['accuracy_strict']:>7.3f} {report['invalid_rate']:>8.3f}")
    return "\n".join(lines)
