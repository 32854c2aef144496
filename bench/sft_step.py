"""Per-step time of plain SFT (no latent block), stage 1 and stage 2 on the same rows, side by side.

    python bench/sft_step.py                      # tiny model, CPU: batch 1, 8, 32; k = 4, 8
    python bench/sft_step.py --batch_sizes 8 --ks 4 --repeats 20

One step = the trainer's ``training_step`` (forward + backward through the installed latent forward, the path
``Trainer.train`` runs) + optimizer step + ``zero_grad``, on one fixed collated batch per variant. Variants are
interleaved (plain, stage 1, stage 2, plain, ...) so that machine noise hits them alike; medians, the
interquartile spread and peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS, which only
grows) are reported. Prints one JSON object; the headline keys at batch 8, k = 4 are ``stage1_over_plain`` and
``stage2_over_plain`` (median step time ratios).

Plain SFT is ``Stage2Trainer`` with ``latent_mode: none``: the same answers with the latent block removed, so it
trains on k + 2 fewer tokens per row; the ratios therefore include the latent tokens' own cost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MIRAGE_SHARED_DATA", REPO.parent / "shared" / "data"))


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build_rows(n: int, out: Path):
    from datasets import load_from_disk

    from mirage_rl.data.build import BuildDataArguments, build_vsp_dataset

    vsp = SHARED_DATA / "vsp"
    if not vsp.exists():
        sys.exit(f"bench/sft_step.py: the VSP data is not at {vsp}; set MIRAGE_SHARED_DATA to the shared/data folder")
    build_vsp_dataset(BuildDataArguments(output_dir=str(out), train_jsonl=str(vsp / "mirage_train_maps.jsonl"),
                                         test_dir=str(vsp / "maze_planning"), max_train_maps=n, num_generated=0,
                                         seed=0))
    return load_from_disk(str(out))["train"]


def make_trainer(variant: str, model_dir: Path, rows, batch: int, device: str, gradient_checkpointing: bool):
    from mirage_rl.modeling import load_model, load_processor
    from mirage_rl.trainers import MirageSFTConfig, Stage1Trainer, Stage2Trainer

    model, processor = load_model(model_dir), load_processor(model_dir)
    stage, mode = {"plain": (2, "none"), "stage1": (1, "hidden"), "stage2": (2, "hidden")}[variant]
    args = MirageSFTConfig(output_dir=tempfile.mkdtemp(), stage=stage, latent_mode=mode,
                           latent_size=model.config.latent_size, per_device_train_batch_size=batch,
                           use_cpu=device == "cpu", bf16=device.startswith("cuda"), report_to="none",
                           save_strategy="no", gradient_checkpointing=gradient_checkpointing,
                           gradient_checkpointing_kwargs={"use_reentrant": False}, learning_rate=1e-5)
    cls = Stage1Trainer if stage == 1 else Stage2Trainer
    trainer = cls(model=model, args=args, train_dataset=rows, processing_class=processor)
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train; training_step reads it
    trainer.model_wrapped = trainer.model = trainer.accelerator.prepare(trainer.model)
    trainer.optimizer = trainer.accelerator.prepare(trainer.optimizer)
    batch_inputs = trainer.data_collator([rows[i % len(rows)] for i in range(batch)])
    n_tokens = int(batch_inputs["attention_mask"].sum())
    return trainer, batch_inputs, n_tokens


def step(trainer, inputs, device: str) -> float:
    t0 = time.perf_counter()
    trainer.training_step(trainer.model, dict(inputs))
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_s": statistics.median(times), "q1_s": q[0], "q3_s": q[2], "n": len(times)}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", help="tiny (CPU default); larger shapes need a GPU (issue 6, part 3)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.size != "tiny":
        sys.exit(f"--size {args.size}: only the tiny model is wired up so far (larger shapes: issue 6, GPU part)")
    from mirage_rl.modeling import create_tiny_model

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    rows = build_rows(max(args.batch_sizes), work / "data")
    results, t_start = [], time.perf_counter()
    for k in args.ks:
        model_dir = work / f"tiny_k{k}"
        create_tiny_model(model_dir, latent_size=k, seed=0)
        for batch in args.batch_sizes:
            setups = {v: make_trainer(v, model_dir, rows, batch, args.device, args.gradient_checkpointing)
                      for v in ("plain", "stage1", "stage2")}
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
            for v in ("stage1", "stage2"):
                row[f"{v}_over_plain"] = row[v]["median_s"] / row["plain"]["median_s"]
            results.append(row)
            print(f"k={k} batch={batch}: plain {row['plain']['median_s']:.4f}s  stage1 x{row['stage1_over_plain']:.3f}"
                  f"  stage2 x{row['stage2_over_plain']:.3f}", file=sys.stderr)
    head = next((r for r in results if r["k"] == 4 and r["batch"] == 8), results[0])
    return {
        "bench": "sft_step", "size": args.size, "device": args.device, "machine": platform.node(),
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"), "headline_at": {"k": head["k"], "batch": head["batch"]},
        "stage1_over_plain": head["stage1_over_plain"], "stage2_over_plain": head["stage2_over_plain"],
        "peak_memory_mb": peak_memory_mb(args.device), "gradient_checkpointing": args.gradient_checkpointing,
        "wall_s": time.perf_counter() - t_start, "results": results}


if __name__ == "__main__":
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # libraries (deepspeed's accelerator probe) print to stdout
        report = main()
    print(json.dumps(report, indent=1), file=stdout)
