"""One GRPO step split into its phases, with each group's prompt shared and not (issue 22).

    python bench/grpo_step.py                         # tiny model, CPU: 2x4, 4x8 and 8x8 (prompts x rollouts), k = 4
    python bench/grpo_step.py --layouts 2x4 --variants shared unshared uncached --repeats 5
    python bench/grpo_step.py --layouts 4x8 --gradient_checkpointing      # as the 7B recipes train

A step is what ``Trainer.train`` runs per optimizer step with one accumulation step: ``MirageGRPOTrainer.training_step``
on a generation batch of VSP prompts (each repeated G times, as TRL's sampler does), then the optimizer step.
Phases are timed by wrapping the trainer's methods on the instance:

* ``generation``: ``_generate_single_turn`` (latent-interleaved sampling, ``mirage_rl.generation``);
* ``reward``: ``_calculate_rewards`` (the recipe's reward functions, ``plan_success_reward`` + ``format_reward``);
* ``log_prob``: every ``_get_per_token_logps_and_entropies`` call: old and reference log-probs (no gradient; the old
  ones only when ``--num_iterations`` > 1) and the policy forward of the loss;
* ``optimisation``: the rest of the loss and its backward, plus ``optimizer.step``;
* ``other``: the rest of ``_generate_and_score_completions`` (prompt templating and tokenization, image processing,
  advantages, gathers).

Variants, run interleaved step by step: ``shared`` (the default trainer: ``shared_prefix`` on, prompt-image caches
on), ``unshared`` (``shared_prefix: false``: every rollout runs its prompt, as TRL does) and, on request,
``uncached`` (``unshared`` without the prompt-image caches either: TRL's behaviour) and ``unshared_multipass``
(``unshared`` with ``latent_fill: multipass``, what the unshared scoring ran under checkpointing before issue 31).
After the timed steps, one more step per variant measures the peak memory of the loss forward and backward (from the
end of
``_prepare_inputs`` to the end of the backward; CPU: live malloc'd memory sampled by a thread, CUDA:
``max_memory_allocated``; ``common.PeakMemory``), untimed because the sampler costs CPU.

The model has random weights; the ``<|latent_start|>`` row of its LM head is redrawn with ``--start_bias`` times the
init std so that rollouts open latent blocks as a trained policy does (``latent_blocks_per_completion`` is reported).
Headline keys: ``shared_over_unshared_step`` (4x8, k = 4: the shared step's median over the unshared one),
``shared_over_unshared_loss_memory`` (4x8) and ``generation_share`` (2x4, shared: generation over the whole step).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
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

PHASES = ("generation", "reward", "log_prob", "optimisation", "image_processing", "other")


class PhaseTimer:
    """Wraps trainer methods so that each call adds its wall time to a phase; nested calls (a log-prob forward
    inside the loss) are charged to the innermost phase only."""

    def __init__(self, device: str):
        self.device, self.times, self._stack = device, defaultdict(float), []

    def wrap(self, obj, name: str, phase: str) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            sync(self.device)
            t0 = time.perf_counter()
            self._stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                inner = self._stack.pop()
                spent = time.perf_counter() - t0
                self.times[phase] += spent - inner
                if self._stack:
                    self._stack[-1] += spent

        setattr(obj, name, timed)


#: variant -> (prompt-image caches, shared_prefix, latent_fill)
VARIANTS = {"shared": (True, True, "auto"), "unshared": (True, False, "auto"), "uncached": (False, False, "auto"),
            "unshared_multipass": (True, False, "multipass")}


def make_trainer(model_dir: Path, size: str, rows, args, device: str, cache: bool, out: Path, model=None,
                 shared_prefix: bool = True, latent_fill: str = "auto"):
    """A prepared GRPO trainer (its ``<|latent_start|>`` head row biased so that rollouts open latent blocks), its
    phase timer and image counters. ``model``: an already built model (``bench/gpu_check.py``); ``cache``:
    ``cache_prompt_images``; ``shared_prefix``: the config field."""
    import rewards
    from mirage_rl.modeling import LatentTokens, load_processor
    from mirage_rl.trainers import MirageGRPOConfig, MirageGRPOTrainer

    if model is None:
        model, processor = load_bench_model(size, model_dir, device)
    else:
        processor = load_processor(model_dir)
    lt = LatentTokens.from_config(model.config)
    with torch.no_grad():  # a random policy that opens latent blocks
        head = model.get_output_embeddings().weight
        std = model.config.get_text_config().initializer_range * args.start_bias
        row = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(0)) * std
        head[lt.start] = row.to(head.device, head.dtype)
    bf16 = getattr(args, "bf16", None)
    config = MirageGRPOConfig(
        output_dir=str(out), use_cpu=device == "cpu", bf16=device.startswith("cuda") if bf16 is None else bf16,
        gradient_checkpointing=getattr(args, "gradient_checkpointing", False),
        per_device_train_batch_size=args.batch, num_generations=args.num_generations,
        max_completion_length=args.max_completion_length, beta=args.beta, num_iterations=args.num_iterations,
        loss_type="dapo", learning_rate=1e-5, report_to="none", save_strategy="no", seed=0,
        latent_mode="hidden", cache_prompt_images=cache, shared_prefix=shared_prefix, latent_fill=latent_fill,
        **getattr(args, "config_overrides", {}))
    funcs = rewards.load_reward_funcs(["plan_success_reward", "format_reward"],
                                      {"format_reward": {"latent_blocks_expected": 1}})
    trainer = MirageGRPOTrainer(model, funcs, config, train_dataset=rows, processing_class=processor)
    prepare_for_steps(trainer)
    trainer.model.train()
    timer = PhaseTimer(device)
    timer.wrap(trainer, "_generate_single_turn", "generation")
    timer.wrap(trainer, "_calculate_rewards", "reward")
    timer.wrap(trainer, "_get_per_token_logps_and_entropies", "log_prob")
    timer.wrap(trainer, "_generate_and_score_completions", "other")
    timer.wrap(trainer, "training_step", "optimisation")
    timer.wrap(trainer.optimizer, "step", "optimisation")
    images = {"tower": 0, "processor": 0}

    def count_tower(module, a, kwargs, output):
        images["tower"] += len(kwargs["grid_thw"])

    for m in filter(None, (trainer.model, trainer.ref_model)):
        trainer.accelerator.unwrap_model(m).model.visual.register_forward_hook(count_tower, with_kwargs=True)
    image_processor = trainer.processing_class.image_processor
    inner = image_processor._preprocess  # the per-batch work under preprocess (the cache wraps preprocess)

    def count_processed(imgs, *a, **kw):
        images["processor"] += len(imgs)
        return inner(imgs, *a, **kw)

    image_processor._preprocess = count_processed
    timer.wrap(image_processor, "_preprocess", "image_processing")
    return trainer, timer, images


def grpo_step(trainer, timer, images, generation_batch, device: str) -> dict:
    """One optimizer step; returns the seconds per phase, the total and the images the vision tower encoded."""
    timer.times.clear()
    images.update(tower=0, processor=0)
    sync(device)
    t0 = time.perf_counter()
    trainer.training_step(trainer.model, [dict(r) for r in generation_batch], None)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    sync(device)
    total = time.perf_counter() - t0
    trainer.state.global_step += 1  # new rollout seeds next step
    return {**{p: timer.times[p] for p in PHASES}, "total": total, "tower_images": images["tower"],
            "processed_images": images["processor"]}


def loss_memory_step(trainer, timer, images, generation_batch, device: str) -> float:
    """One more step; returns the peak memory (MiB) of its loss forward and backward above the level at their
    start (``common.PeakMemory`` from the end of ``_prepare_inputs`` to the end of ``accelerator.backward``)."""
    probe = {}
    prepare, backward = trainer._prepare_inputs, trainer.accelerator.backward

    def prepared(*a, **kw):
        out = prepare(*a, **kw)
        probe["ctx"] = PeakMemory(device).__enter__()
        return out

    def backward_then_read(loss, **kw):
        result = backward(loss, **kw)
        ctx = probe.pop("ctx")
        ctx.__exit__(None, None, None)
        probe["mb"] = ctx.mb
        return result

    trainer._prepare_inputs, trainer.accelerator.backward = prepared, backward_then_read
    try:
        grpo_step(trainer, timer, images, generation_batch, device)
    finally:
        del trainer._prepare_inputs, trainer.accelerator.backward  # the instance attributes: back to the methods
    return probe["mb"]


def parse_layout(text: str) -> tuple[int, int]:
    """``"4x8"`` -> (4 prompts, 8 rollouts each)."""
    try:
        prompts, gens = (int(x) for x in text.lower().split("x"))
    except ValueError:
        sys.exit(f"--layouts: {text!r} is not PROMPTSxROLLOUTS, e.g. 4x8")
    return prompts, gens


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=SIZES, help="model shape (3b/7b need a GPU)")
    parser.add_argument("--layouts", nargs="+", default=["2x4", "4x8", "8x8"],
                        help="generation batches as PROMPTSxROLLOUTS (rollouts per prompt = the group size)")
    parser.add_argument("--variants", nargs="+", default=["shared", "unshared"], choices=list(VARIANTS))
    parser.add_argument("--ks", type=int, nargs="+", default=[4], help="latent sizes k")
    parser.add_argument("--max_completion_length", type=int, default=48)
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient (> 0: a reference forward)")
    parser.add_argument("--num_iterations", type=int, default=1, help="> 1: old log-probs are computed too")
    parser.add_argument("--start_bias", type=float, default=50.0, help="see above")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--memory_steps", type=int, default=1, help="untimed loss-memory steps per variant (0: none)")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="train with (non-reentrant) gradient checkpointing, as the 7B recipes do")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    layouts = [parse_layout(x) for x in args.layouts]
    rows = build_rows(max(p for p, _ in layouts), work / "data", "bench/grpo_step.py")
    rows = rows.remove_columns([c for c in ("helper_image", "answer") if c in rows.column_names])
    results, t_start = [], time.perf_counter()
    for k in args.ks:
        model_dir = bench_model_dir(args.size, k, work)
        for prompts, gens in layouts:
            args.batch, args.num_generations = prompts * gens, gens
            generation_batch = [rows[i] for i in range(prompts) for _ in range(gens)]
            setups = {name: make_trainer(model_dir, args.size, rows, args, args.device, VARIANTS[name][0], work / name,
                                         shared_prefix=VARIANTS[name][1], latent_fill=VARIANTS[name][2])
                      for name in args.variants}
            steps = {name: [] for name in setups}
            for i in range(args.warmup + args.repeats):
                for name, (trainer, timer, images) in setups.items():
                    s = grpo_step(trainer, timer, images, generation_batch, args.device)
                    if i >= args.warmup:
                        steps[name].append(s)
            memory = {name: [loss_memory_step(*setup, generation_batch, args.device) for _ in range(args.memory_steps)]
                      for name, setup in setups.items()}
            row = {"k": k, "layout": f"{prompts}x{gens}", "batch": args.batch, "prompts": prompts,
                   "num_generations": gens}
            for name, ss in steps.items():
                med = {key: summary([s[key] for s in ss])["median_s"] for key in (*PHASES, "total")}
                total = summary([s["total"] for s in ss])
                row[name] = {"median_s": med, "total": total,
                             "share": {p: sum(s[p] for s in ss) / sum(s["total"] for s in ss) for p in PHASES},
                             "tower_images_per_step": max(s["tower_images"] for s in ss),
                             "processed_images_per_step": max(s["processed_images"] for s in ss),
                             "loss_peak_mb": statistics.median(memory[name]) if memory[name] else None}
                metrics = setups[name][0]._metrics["train"]
                blocks = metrics.get("latent/blocks_per_completion", [])
                row[name]["latent_blocks_per_completion"] = sum(blocks) / max(1, len(blocks))
                lengths = metrics.get("completions/mean_length", [])
                row[name]["mean_completion_length"] = sum(lengths) / max(1, len(lengths))
            first = next(iter(steps))
            row["generation_share"] = row[first]["share"]["generation"]
            if "shared" in row and "unshared" in row:
                sh, un = row["shared"], row["unshared"]
                row["shared_over_unshared_step"] = sh["total"]["median_s"] / un["total"]["median_s"]
                row["shared_over_unshared_train_forward_backward"] = (
                    (sh["median_s"]["log_prob"] + sh["median_s"]["optimisation"])
                    / (un["median_s"]["log_prob"] + un["median_s"]["optimisation"]))
                if sh["loss_peak_mb"] and un["loss_peak_mb"]:
                    row["shared_over_unshared_loss_memory"] = sh["loss_peak_mb"] / un["loss_peak_mb"]
            if "uncached" in row and "unshared" in row:
                row["uncached_over_unshared_step"] = row["uncached"]["total"]["median_s"] / row["unshared"]["total"]["median_s"]
            results.append(row)
            for name in steps:
                c = row[name]
                print(f"k={k} {prompts}x{gens} {name}: step {c['total']['median_s']:.3f}s, "
                      + ", ".join(f"{p} {c['share'][p]:.1%}" for p in PHASES)
                      + f"; loss peak {c['loss_peak_mb'] or 0:.1f} MB; images processed/encoded per step "
                      f"{c['processed_images_per_step']}/{c['tower_images_per_step']}", file=sys.stderr)
            if "shared_over_unshared_step" in row:
                print(f"k={k} {prompts}x{gens}: shared/unshared step x{row['shared_over_unshared_step']:.3f}, loss "
                      f"memory x{row.get('shared_over_unshared_loss_memory', float('nan')):.3f}", file=sys.stderr)
            del setups

    def at(layout):
        return next((r for r in results if r["k"] == 4 and r["layout"] == layout), results[0])

    head, small = at("4x8"), at("2x4")
    return {**header("grpo_step", args.size, args.device),
            "headline_at": {"k": head["k"], "layout": head["layout"], "generation_share_layout": small["layout"]},
            "shared_over_unshared_step": head.get("shared_over_unshared_step"),
            "shared_over_unshared_loss_memory": head.get("shared_over_unshared_loss_memory"),
            "generation_share": small["generation_share"],
            "max_completion_length": args.max_completion_length, "beta": args.beta,
            "gradient_checkpointing": args.gradient_checkpointing,
            "num_iterations": args.num_iterations, "peak_memory_mb": peak_memory_mb(args.device),
            "wall_s": time.perf_counter() - t_start, "results": results}


if __name__ == "__main__":
    run(main)
