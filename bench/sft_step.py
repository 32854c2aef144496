"""Per-step time of plain SFT (no latent block), stage 1 and stage 2 on the same rows, side by side.

    python bench/sft_step.py                      # tiny model, CPU: batch 1, 8, 32; k = 4, 8
    python bench/sft_step.py --batch_sizes 8 --ks 4 --repeats 20

One step = the trainer's ``training_step`` (forward + backward through the installed latent forward, the path
``Trainer.train`` runs) + optimizer step + ``zero_grad``, on one fixed collated batch per variant. Variants are
interleaved (plain, stage 1, stage 2, plain, ...) so that machine noise hits them alike; medians and the
interquartile spread are reported. ``--stage2_variants multipass fused_compile ...`` adds stage 2 with another
``latent_fill`` / ``latent_fused_steps`` (``STAGE2_VARIANTS``; ``stage2`` itself runs the defaults, ``auto`` /
``off``). Prints one JSON object; the headline keys at batch 8, k = 4 are ``stage1_over_plain`` and
``stage2_over_plain`` (median step time ratios).

Memory: a step's peak memory above weights, gradients and optimizer state is measured in a fresh process per case
(CPU: live malloc'd memory sampled during the step, ``common.PeakMemory``; CUDA: ``max_memory_allocated``) for plain
SFT and stage 2, each with and without gradient checkpointing (``memory``); ``stage2_gc_over_plain_step_memory`` is stage 2 with checkpointing over plain SFT without,
per batch size (<= 1: stage 2 fits wherever the plain step fits).

Plain SFT is ``Stage2Trainer`` with ``latent_mode: none``: the same answers with the latent block removed, so it
trains on k + 2 fewer tokens per row; the ratios therefore include the latent tokens' own cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    SIZES,
    PeakMemory,
    bench_model_dir,
    build_rows,
    header,
    load_bench_model,
    peak_memory_mb,
    prepare_for_steps,
    run,
    summary,
    sync,
)

VARIANTS = {"plain": (2, "none"), "stage1": (1, "hidden"), "stage2": (2, "hidden")}
#: extra stage-2 variants (``--stage2_variants``): (latent_fill, latent_fused_steps); ``stage2`` itself is auto / off
STAGE2_VARIANTS = {"multipass": ("multipass", "off"), "keystore": ("keystore", "off"), "cached": ("cached", "off"),
                   "fused_compile": ("auto", "compile"),
                   "fused_cudagraphs": ("auto", "cudagraphs")}


def make_trainer(variant: str, size: str, model_dir: Path, rows, batch: int, device: str, gradient_checkpointing: bool,
                 share=None, model=None):
    """A prepared trainer, its collated batch and its token count. ``share``: another trainer of this function whose
    model and optimizer this one reuses (one copy of a 7B model and its AdamW state instead of three). ``model``: an
    already built model to train (``bench/gpu_check.py``), instead of building one of ``size``."""
    from mirage_rl.modeling import load_processor
    from mirage_rl.trainers import MirageSFTConfig, Stage1Trainer, Stage2Trainer

    if share is None and model is not None:
        processor = load_processor(model_dir)
    elif share is None:
        model, processor = load_bench_model(size, model_dir, device)
    else:
        model, processor = share.accelerator.unwrap_model(share.model), load_processor(model_dir)
    stage, mode = VARIANTS.get(variant, (2, "hidden"))
    fill, fused = STAGE2_VARIANTS.get(variant.removeprefix("stage2_"), ("auto", "off"))
    args = MirageSFTConfig(output_dir=tempfile.mkdtemp(), stage=stage, latent_mode=mode, latent_fill=fill,
                           latent_fused_steps=fused,
                           latent_size=model.config.latent_size, per_device_train_batch_size=batch,
                           use_cpu=device == "cpu", bf16=device.startswith("cuda"), report_to="none",
                           save_strategy="no", gradient_checkpointing=gradient_checkpointing,
                           gradient_checkpointing_kwargs={"use_reentrant": False}, learning_rate=1e-5)
    cls = Stage1Trainer if stage == 1 else Stage2Trainer
    trainer = cls(model=model, args=args, train_dataset=rows, processing_class=processor)
    if gradient_checkpointing and share is None:  # what Trainer.train does before its loop
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
    if share is None:
        prepare_for_steps(trainer)
    else:
        trainer.current_gradient_accumulation_steps = 1  # as prepare_for_steps, on the shared model and optimizer
        trainer.model_wrapped, trainer.model, trainer.optimizer = share.model_wrapped, share.model, share.optimizer
    trainer._bench_forward = model.forward  # each trainer installs its own latent forward; step() puts it back
    batch_inputs = trainer.data_collator([rows[i % len(rows)] for i in range(batch)])
    n_tokens = int(batch_inputs["attention_mask"].sum())
    return trainer, batch_inputs, n_tokens


def step(trainer, inputs, device: str) -> float:
    trainer.accelerator.unwrap_model(trainer.model).forward = trainer._bench_forward  # a shared model: this variant's
    sync(device)
    t0 = time.perf_counter()
    trainer.training_step(trainer.model, dict(inputs))
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t0


def memory_probe(args) -> dict:
    """In a fresh process: set up one variant, run one step (the optimizer allocates its state), then measure the
    peak live memory of three more steps above the level before them (:class:`common.PeakMemory`; the median of the
    three). That is the memory a step needs on top of weights, gradients and optimizer state, which are the same
    for every variant."""
    from datasets import load_from_disk

    rows = load_from_disk(args.probe_data)["train"]
    trainer, inputs, n_tokens = make_trainer(args.probe, args.size, Path(args.probe_model), rows, args.probe_batch,
                                             args.device, args.gradient_checkpointing)
    step(trainer, inputs, args.device)
    peaks = []
    for _ in range(3):
        with PeakMemory(args.device) as peak:
            step(trainer, inputs, args.device)
        peaks.append(peak.mb)
    return {"variant": args.probe, "batch": args.probe_batch, "gradient_checkpointing": args.gradient_checkpointing,
            "step_peak_mb": statistics.median(peaks), "step_peaks_mb": peaks, "tokens": n_tokens}


def memory_table(args, work: Path, data: Path, batches: list[int]) -> list[dict]:
    """Step peak memory of plain SFT and stage 2, each with and without gradient checkpointing, at k = 4, one fresh
    process per measurement."""
    model_dir = bench_model_dir(args.size, 4, work)
    out = []
    for batch in batches:
        for variant, gc in (("plain", False), ("plain", True), ("stage2", False), ("stage2", True)):
            cmd = [sys.executable, __file__, "--size", args.size, "--device", args.device, "--probe", variant,
                   "--probe_batch", str(batch), "--probe_model", str(model_dir), "--probe_data", str(data)]
            done = subprocess.run(cmd + (["--gradient_checkpointing"] if gc else []), capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"memory probe {variant} batch {batch} failed:\n{done.stderr[-3000:]}")
            out.append(json.loads(done.stdout))
            print(f"memory batch={batch} {variant}{' +GC' if gc else ''}: {out[-1]['step_peak_mb']:.1f} MB",
                  file=sys.stderr)
    return out


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=SIZES, help="model shape (3b/7b need a GPU)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--stage2_variants", nargs="*", default=[], choices=sorted(STAGE2_VARIANTS),
                        help="stage 2 also with these fills (reported as stage2_<name>_over_plain)")
    parser.add_argument("--memory_batch_sizes", type=int, nargs="*", default=[8],
                        help="batch sizes of the step-memory table (none: skip it)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--share_model", type=lambda x: x.lower() in ("1", "true", "yes"), default=None,
                        help="one model and optimizer for all variants (default: yes for 3b/7b, no for tiny)")
    for name in ("probe", "probe_batch", "probe_model", "probe_data"):  # internal: one memory measurement
        parser.add_argument(f"--{name}", type=int if name == "probe_batch" else str, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.share_model is None:
        args.share_model = args.size != "tiny"
    if args.probe:
        return memory_probe(args)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    rows = build_rows(max(args.batch_sizes + args.memory_batch_sizes), work / "data", "bench/sft_step.py")
    results, t_start = [], time.perf_counter()
    for k in args.ks:
        model_dir = bench_model_dir(args.size, k, work)
        for batch in args.batch_sizes:
            setups = {}
            for v in [*VARIANTS, *(f"stage2_{name}" for name in args.stage2_variants)]:
                first = next(iter(setups.values()))[0] if setups and args.share_model else None
                setups[v] = make_trainer(v, args.size, model_dir, rows, batch, args.device, args.gradient_checkpointing,
                                         share=first)
            times = {v: [] for v in setups}
            for i in range(args.warmup + args.repeats):
                for v, (trainer, inputs, _) in setups.items():
                    t = step(trainer, inputs, args.device)
                    if i >= args.warmup:
                        times[v].append(t)
            row = {"k": k, "batch": batch}
            for v, (_, _, n_tokens) in setups.items():
                s = summary(times[v])
                row[v] = {**s, "tokens": n_tokens, "tokens_per_s": n_tokens / s["median_s"]}
            for v in setups:
                if v != "plain":
                    row[f"{v}_over_plain"] = row[v]["median_s"] / row["plain"]["median_s"]
            results.append(row)
            print(f"k={k} batch={batch}: plain {row['plain']['median_s']:.4f}s  "
                  + "  ".join(f"{v} x{row[f'{v}_over_plain']:.3f}" for v in setups if v != "plain"), file=sys.stderr)
            del setups
    memory = memory_table(args, work, work / "data", args.memory_batch_sizes) if args.memory_batch_sizes else []
    head = next((r for r in results if r["k"] == 4 and r["batch"] == 8), results[0])
    fits = {}
    for batch in args.memory_batch_sizes:
        m = {(r["variant"], r["gradient_checkpointing"]): r["step_peak_mb"] for r in memory if r["batch"] == batch}
        fits[str(batch)] = m[("stage2", True)] / m[("plain", False)]
    return {**header("sft_step", args.size, args.device), "headline_at": {"k": head["k"], "batch": head["batch"]},
            "stage1_over_plain": head["stage1_over_plain"], "stage2_over_plain": head["stage2_over_plain"],
            **{f"stage2_{n}_over_plain": head[f"stage2_{n}_over_plain"] for n in args.stage2_variants},
            "stage2_gc_over_plain_step_memory": fits, "peak_memory_mb": peak_memory_mb(args.device),
            "gradient_checkpointing": args.gradient_checkpointing, "wall_s": time.perf_counter() - t_start,
            "results": results, "memory": memory}


if __name__ == "__main__":
    run(main)
