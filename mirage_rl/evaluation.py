"""``mirage-rl eval``: run a checkpoint on a VSP folder with latent-interleaved greedy decoding.

Writes, each atomically (temp file + rename), into ``output_dir``:
``report.json`` (``benchmark``, ``n``, ``accuracy``, ``accuracy_strict``, ``invalid_rate``, ``by_level``),
``samples.jsonl`` (one line per map: ``prompt_id``, ``level``, ``completion``, ``plan``, ``verdict``,
``success``, ``success_strict``) and ``accuracy_by_level.png``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from .atomic import atomic_save_figure, atomic_write_text
from .collator import LatentCollator
from .data import vsp
from .generation import generate
from .modeling import LatentTokens, load_model, load_processor
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
    prompt: str = field(default="test", metadata={"help": "'test' (VSP/Mirage test prompt) or 'train' (Mirage train prompt)."})


def summarize(samples: list[dict], benchmark: str) -> dict:
    """Accuracy (official and strict) and invalid rate, overall and per level."""
    def stats(rows):
        n = len(rows)
        return {"n": n, "accuracy": sum(r["success"] for r in rows) / n,
                "accuracy_strict": sum(r["success_strict"] for r in rows) / n,
                "invalid_rate": sum(r["verdict"] == "invalid" for r in rows) / n}

    by_level = defaultdict(list)
    for r in samples:
        by_level[str(r["level"])].append(r)
    return {"benchmark": benchmark, **stats(samples),
            "by_level": {lvl: stats(rows) for lvl, rows in sorted(by_level.items(), key=lambda x: int(x[0]))}}


def plot_by_level(report: dict, path: str | os.PathLike, title: str) -> None:
    """Bar chart of official and strict accuracy per level, saved atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(report["by_level"])
    acc = [report["by_level"][lv]["accuracy"] for lv in levels]
    strict = [report["by_level"][lv]["accuracy_strict"] for lv in levels]
    x = range(len(levels))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([i - 0.2 for i in x], acc, 0.4, label="official (VSP)")
    ax.bar([i + 0.2 for i in x], strict, 0.4, label="strict (Mirage)")
    ax.set_xticks(list(x), [f"level {lv}\n({report['by_level'][lv]['n']} maps)" for lv in levels])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, path)


def evaluate(args: EvalArguments, model=None, processor=None) -> dict:
    """Evaluate and write the three outputs (module docstring); returns the report dict.

    Raises:
        ValueError: ``latent_mode`` needs latent tokens the checkpoint lacks; FileNotFoundError: bad folder.
    """
    model = model if model is not None else load_model(args.model)
    processor = processor if processor is not None else load_processor(args.model)
    model.eval()
    has_latent = getattr(model.config, "latent_token_ids", None) is not None
    mode = args.latent_mode or getattr(model.config, "latent_mode", None) or ("hidden" if has_latent else "none")
    tokens = LatentTokens.from_config(model.config, where=args.model) if mode != "none" else None
    maps = vsp.load_benchmark(args.benchmark_dir, args.levels)
    if args.limit is not None:
        maps = maps[: args.limit]
    prompt_text = vsp.TEST_PROMPT if args.prompt == "test" else vsp.TRAIN_PROMPT
    messages = vsp.to_messages(prompt_text)
    collator = LatentCollator(processor, tokens, latent_mode=mode, with_answer=False)
    samples = []
    bar = tqdm(total=len(maps), desc=f"eval {Path(args.model).name} ({mode})", unit="map")
    for i in range(0, len(maps), args.batch_size):
        chunk = maps[i : i + args.batch_size]
        batch = collator([{"prompt": messages, "image": Image.open(m.image_path)} for m in chunk])
        out = generate(model, processor, batch, max_new_tokens=args.max_new_tokens, latent_mode=mode)
        for m, text in zip(chunk, out.texts):
            s = score_plan(m.map_desc, text)
            samples.append({"prompt_id": f"level{m.level}/{m.map_id}", "level": m.level, "completion": text,
                            "plan": s.plan, "verdict": s.verdict, "success": s.success,
                            "success_strict": s.success_strict})
        bar.update(len(chunk))
    bar.close()
    report = summarize(samples, benchmark=str(args.benchmark_dir))
    report.update({"model": str(args.model), "latent_mode": mode, "max_new_tokens": args.max_new_tokens})
    out_dir = Path(args.output_dir)
    atomic_write_text(out_dir / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    plot_by_level(report, out_dir / "accuracy_by_level.png", f"{Path(args.model).name} ({mode}) on {Path(args.benchmark_dir).name}")
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def format_table(report: dict) -> str:
    """A short text table of the report (printed by the CLI)."""
    lines = [f"{'level':>6} {'n':>5} {'acc':>7} {'strict':>7} {'invalid':>8}"]
    for lv, s in report["by_level"].items():
        lines.append(f"{lv:>6} {s['n']:>5} {s['accuracy']:>7.3f} {s['accuracy_strict']:>7.3f} {s['invalid_rate']:>8.3f}")
    lines.append(f"{'all':>6} {report['n']:>5} {report['accuracy']:>7.3f} {report['accuracy_strict']:>7.3f} {report['invalid_rate']:>8.3f}")
    return "\n".join(lines)
