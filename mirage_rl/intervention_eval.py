"""``mirage-rl eval --latent_intervention ...``: one decoding pass per intervention (:mod:`mirage_rl.interventions`),
paired against the model's own latents, plus the latent geometry.

Each pass writes ``output_dir/interventions/<name>/samples.jsonl`` and ``pass.json`` (its settings) atomically when it
ends; the ``none`` pass also ``latents.safetensors`` (the model's own latents per item). A rerun with the same settings
reuses every finished pass (a killed run resumes at the pass it was in). ``report.json`` is the ``none`` pass's report
(as plain ``eval``) plus:

* ``interventions``: per name ``n``, the task's headline metric (e.g. ``accuracy``) overall and ``by_level``, and
  ``paired`` against ``none`` on the same items: ``diff``, ``mcnemar_p`` (exact), ``ci95`` (bootstrap), ``b``/``c``
  (discordant counts); ``swap_fixed_points`` (items alone in their level, swapped with themselves);
* ``latent_geometry`` (when the task can draw the items' helper images): ``cos_to_oracle`` per slot,
  ``retrieval_top1`` beside ``retrieval_chance``, ``collapse`` (mean pairwise cosine of different items' latents)
  beside ``oracle_collapse`` (the same for their stage-1 targets: how map-specific the targets are),
  ``oracle_specific_share``, ``nn_same_answer`` / ``oracle_nn_same_answer`` beside ``same_answer_chance`` (does an
  item's nearest neighbour by latents / by targets share its answer, ``Task.item_answer``), ``items``.

``interventions.png``: the headline metric per intervention with its bootstrap interval.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import latent
from .atomic import atomic_save_figure, atomic_write_text
from .collator import LatentCollator
from .engines import DecodeSettings, HFEngine, RolloutBatch
from .interventions import LatentIntervention, derangement, geometry, paired
from .data.jsonl import read_json

logger = logging.getLogger(__name__)


def oracle_targets(model, processor, task, items, helper: str | None, k: int, compress: str,
                   target: str = "helper") -> list[torch.Tensor] | None:
    """Per item the stage-1 targets ``(k, H)`` float32 of its helper image (``Task.oracle_image``), made exactly as
    stage 1 makes them (the processor's image processor, then ``latent.helper_targets``; ``target: residual`` minus
    the same of the item's first input image, as ``latent_target: residual`` trains); ``None`` when the task draws no
    helper image for an item."""
    dev = model.get_input_embeddings().weight.device

    def pooled(img):
        px = processor.image_processor(images=[img.convert("RGB")], return_tensors="pt")
        return latent.helper_targets(model, px["pixel_values"].to(dev), px["image_grid_thw"].to(dev), k,
                                     compress)[0].float().cpu()

    out = []
    for it in items:
        img = task.oracle_image(it, helper)
        if img is None:
            return None
        t = pooled(img)
        if target == "residual":
            t = t - pooled(task.item_images(it, where=str(it.prompt_id))[0])
        out.append(t)
    return out


def _run_pass(args, engine, processor, task, tokens, items, name: str, fn) -> tuple[list[dict], list[torch.Tensor]]:
    from .evaluation import prompt_rows

    collator = LatentCollator(processor, tokens, latent_mode="hidden", with_answer=False)
    samples, own = [], []
    for i in tqdm(range(0, len(items), args.batch_size), desc=f"eval {Path(args.model).name} [{name}]"):
        chunk = items[i : i + args.batch_size]
        settings = DecodeSettings(max_new_tokens=args.max_new_tokens, latent_mode="hidden",
                                  latent_fn=fn.for_items(range(i, i + len(chunk))) if fn is not None else None,
                                  record_latents=name == "none",
                                  suppress_token_ids=[tokens.start] if name == "skip" else [])
        out = engine.rollout(RolloutBatch(collator(prompt_rows(task, chunk, args))), settings)
        for m, text in zip(chunk, out.texts):
            samples.append({"prompt_id": m.prompt_id, "level": m.level, "intervention": name, "completion": text,
                            **task.score(m, text)})
        if out.own_latents is not None:
            own += out.own_latents
    return samples, own


def _load_pass(folder: Path, identity: dict):
    meta = folder / "pass.json"
    if not meta.is_file() or read_json(meta).get("run") != identity:
        return None
    samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    own = None
    if (folder / "latents.safetensors").is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(folder / "latents.safetensors"))
        own = [tensors[str(i)] for i in range(len(samples))]
    return samples, own


def _save_pass(folder: Path, identity: dict, samples: list[dict], own: list[torch.Tensor] | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if own is not None:
        from safetensors.torch import save_file

        tmp = folder / "latents.safetensors.tmp"
        save_file({str(i): t.contiguous() for i, t in enumerate(own)}, str(tmp))
        tmp.replace(folder / "latents.safetensors")
    atomic_write_text(folder / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    atomic_write_text(folder / "pass.json", json.dumps({"run": identity}, indent=1) + "\n")  # last: the pass is done


def evaluate_interventions(args, model, processor, task, tokens, items, out_dir: Path, engine=None) -> dict:
    """Every pass of ``args.latent_intervention`` (``none`` first), the paired statistics, the geometry; writes the
    outputs of the module docstring and returns the report. ``engine``: the rollout engine that decodes (default: the
    HF engine on ``model``).

    Raises:
        ValueError: ``oracle`` on a task (or items) without helper images; ``mean`` when the ``none`` pass opened no
            latent block.
    """
    from .evaluation import plot_by_level, run_identity, summarize

    k = tokens.latent_size
    identity = {**run_identity(args, "hidden"), "limit": args.limit, "oracle_helper": args.oracle_helper,
                "oracle_compress": args.oracle_compress, "oracle_target": args.oracle_target,
                "intervention_seed": args.intervention_seed}
    oracle = oracle_targets(model, processor, task, items, args.oracle_helper, k, args.oracle_compress,
                            args.oracle_target)
    if "oracle" in args.latent_intervention and oracle is None:
        raise ValueError(f"latent_intervention oracle: task {task.name} draws no helper image for these items "
                         "(Task.oracle_image); leave oracle out")
    pad = model.get_input_embeddings().weight[tokens.pad].detach().float().cpu()
    levels = [m.level for m in items]
    passes, own = {}, None
    for name in args.latent_intervention:
        folder = out_dir / "interventions" / name
        cached = _load_pass(folder, {**identity, "intervention": name}) if args.resume else None
        if cached is not None:
            samples, latents = cached
            logger.info("eval: intervention %s reused from %s", name, folder)
        else:
            fn = None if name in ("none", "skip") else LatentIntervention(
                name, k, own=own, levels=levels, oracle=oracle, pad=pad, seed=args.intervention_seed)
            samples, latents = _run_pass(args, engine or HFEngine(model, processor), processor, task, tokens, items,
                                         name, fn)
            _save_pass(folder, {**identity, "intervention": name}, samples, latents if name == "none" else None)
        if name == "none":
            own = latents
        passes[name] = samples
    head = task.metrics[0][0]
    ref = [bool(s[task.correct_key]) for s in passes["none"]]
    table, reports = {}, {}
    for name, samples in passes.items():
        rep = reports[name] = summarize(samples, benchmark=str(args.benchmark_dir), task=args.task)
        entry = {"n": rep["n"], head: rep[head], "by_level": {lv: st[head] for lv, st in rep["by_level"].items()}}
        if "invalid_rate" in rep:
            entry["invalid_rate"] = rep["invalid_rate"]
        if name != "none":
            entry["paired"] = paired(ref, [bool(s[task.correct_key]) for s in samples], args.intervention_seed)
        table[name] = entry
    partner = derangement(levels, args.intervention_seed)
    fixed = sum(p == i for i, p in enumerate(partner))
    opened = sum(1 for o in own if len(o) > 0)
    for name, entry in table.items():
        reason = unmeasured_reason(name, len(items), opened, fixed)
        entry["measured"] = reason is None
        if reason is not None:
            entry["not_measured"] = reason
            entry["paired"] = None  # a paired statistic over degenerate items would read as a result
            logger.warning("eval: intervention %s NOT MEASURED: %s", name, reason)
    geo = geometry(own, oracle, k, [task.item_answer(it) for it in items]) if oracle is not None else None
    if geo is not None and "retrieval_top1" not in geo:
        geo.update({"measured": False, "not_measured": f"{geo['items']} item(s) with a whole latent block; the "
                                                       "geometry compares items with each other and needs at least 2"})
        logger.warning("eval: latent geometry NOT MEASURED: %s", geo["not_measured"])
    report = reports["none"]
    report.update({"model": str(args.model), "latent_mode": "hidden", "max_new_tokens": args.max_new_tokens,
                   "resumed_at": 0, "interventions": table, "swap_fixed_points": fixed, "latent_geometry": geo})
    atomic_write_text(out_dir / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in passes["none"]))
    plot_by_level(report, out_dir / "accuracy_by_level.png", f"{Path(args.model).name} (hidden) on "
                                                                f"{Path(args.benchmark_dir).name}")
    plot_interventions(table, head, out_dir / "interventions.png", f"{Path(args.model).name}: latent interventions")
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def unmeasured_reason(name: str, items: int, opened: int, fixed: int) -> str | None:
    """Why the intervention ``name`` measured nothing on these items (None when it measured): fewer than 2 items
    (no paired comparison), no item that opened a latent block in the ``none`` pass (nothing to replace; ``skip``
    aside), or ``swap`` where every item is alone in its level (each swapped with itself)."""
    if name == "none":
        return None
    if items < 2:
        return f"{items} item(s); a paired comparison against the model's own latents needs at least 2 (raise --limit)"
    if opened == 0 and name != "skip":
        return "no item opened a latent block in the none pass, so there were no latent slots to replace"
    if name == "swap" and fixed >= items:
        return ("every item is alone in its level, so swap fed each item its own latents (swap_fixed_points); "
                "evaluate at least 2 items per level")
    return None


def plot_interventions(table: dict, head: str, path: Path, title: str) -> None:
    """The headline metric per intervention; bars other than ``none`` carry the bootstrap 95 % interval of their
    paired difference, placed around their own value. An intervention that measured nothing (``measured`` false) gets
    no bar, only the words "not measured"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    ok = [n == "none" or table[n].get("paired") is not None for n in names]
    vals = [table[n][head] if good else 0.0 for n, good in zip(names, ok)]
    # the interval of the paired difference, moved onto the bar: [value - (diff - low), value + (high - diff)]
    lo = [table[n]["paired"]["diff"] - table[n]["paired"]["ci95"][0] if n != "none" and good else 0
          for n, good in zip(names, ok)]
    hi = [table[n]["paired"]["ci95"][1] - table[n]["paired"]["diff"] if n != "none" and good else 0
          for n, good in zip(names, ok)]
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(names), 3.5))
    ax.bar(names, vals, yerr=[[max(0.0, x) for x in lo], [max(0.0, x) for x in hi]], capsize=3,
           color=["tab:blue" if n == "none" else "tab:gray" for n in names])
    for i, (n, good) in enumerate(zip(names, ok)):
        if good:
            ax.text(i, vals[i] + 0.02, f"{vals[i]:.2f}", ha="center", va="bottom", fontsize=7)
        else:
            ax.text(i, 0.05, "not\nmeasured", ha="center", va="bottom", fontsize=7, color="tab:red")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(head)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_save_figure(fig, path)
