"""One prepared check that proves the GPU path: environment, bf16 and attention parity, speed and memory (issue 17).

    python bench/gpu_check.py --output_dir outputs/gpu_check                      # CUDA, Qwen2.5-VL-3B shapes
    python bench/gpu_check.py --output_dir outputs/gpu_check_qwen3 --backbone qwen3_vl   # CUDA, Qwen3-VL-8B shapes
    python bench/gpu_check.py --output_dir outputs/gpu_check --size tiny --device cpu   # the same code on CPU
    python bench/gpu_check.py --output_dir DIR --size tiny --device cpu --quick         # fewer repeats (the CI test)

Writes ``DIR/gpu_check.json`` and a summary ``DIR/gpu_check.md`` after every section, so a run cut off by a time
limit still leaves what it measured; progress goes to stderr with the elapsed seconds. Sections (top-level keys):

* ``env``: GPU name and memory, torch / CUDA / transformers / trl / deepspeed / peft versions, whether ``flash_attn``
  imports, the attention implementations tried, the exact command, the commit.
* ``parity``: on the model of ``--size`` (default ``3b``: Qwen2.5-VL-3B shapes with random weights, seeded; with
  ``--backbone qwen3_vl`` default ``8b``: Qwen3-VL-8B shapes, the tiny Qwen3-VL's tokenizer and processor):
  ``bf16_vs_fp32``: the latent fill in bf16 against fp32 on the same inputs, max / mean absolute logit difference at
  the answer's text positions after the latent block, for the cached and the multi-pass fill;
  ``attention``: SDPA (and FlashAttention-2 when it imports) against eager attention, in the working dtype, on the
  layouts that are unusual here: left padding, realigned rollouts with masked gap columns
  (``mirage_rl.latent.aligned_columns``) and two latent blocks per row;
  ``grpo_logprobs``: a bf16 GRPO rollout's sampling-time log-probs against the recomputed ones (mean, max, 99th
  percentile absolute difference, in nats) and the importance-sampling correction they get; again with the
  ``<|latent_start|>`` head bias scaled to 15 and 5 (``by_start_bias``: at 3B shapes the bench's bias opens a block
  at every step, and ``sampled_logprob_mean_nats`` near 0 says the sampled tokens were near-certain).
* ``speed`` (the working dtype: bf16 on CUDA, fp32 on CPU; medians of interleaved repeats, as ``bench/`` does):
  stage-1 / plain and stage-2 / plain SFT step ratios at batch 8, k = 4 (``bench/sft_step.py``); latent-interleaved
  decoding tokens/s against plain decoding and HF ``generate`` at batch 8 and 64 (``bench/generate.py``); one GRPO
  step split into phases at 2 prompts x 4 generations with gradient checkpointing on CUDA (``bench/grpo_step.py``;
  4 x 8 ran out of the H100's 80 GB at 3B shapes in the 2026-11-26 runs, in which the bench left checkpointing
  off), and ``shared_over_unshared_step``: the step with each group's prompt shared over the step with every
  rollout running its own (``shared_prefix``; ``gradient_checkpointing`` says whether the decoder checkpointed).
* ``profile`` (issue 31): one profiled step of plain SFT, stage 2 and stage 2 with fused one-column steps: on CUDA
  the kernels run, the launch calls made and the top 15 kernels by GPU time; on CPU the leaf ``aten`` operators and
  the top 15 by self CPU time. The fused variant is CUDA graphs on CUDA, ``torch.compile`` on CPU (not with
  ``--quick``), also timed in ``speed.sft`` (``stage2_fused_*_over_plain``).
* ``vllm``: the vLLM engine (issue 30) against the HF engine at batch 8, greedy, latent: whether the tokens are equal,
  the largest gap between the latents each fed, and tokens/s of each; ``skipped`` where vLLM does not import (the lent
  GPU machine has no vLLM: there it is not measured).
* ``memory``: peak allocated GPU memory (CPU: the process's peak RSS) of each of the above, and whether one
  7B-shaped stage-2 step with gradient checkpointing at batch 2 fits this GPU (``seven_b_stage2_gc_batch2``; with
  ``--backbone qwen3_vl`` an 8B-shaped one, ``eight_b_stage2_gc_batch2``; ``skipped`` on CPU, with ``--quick`` or
  when the time budget is spent).

Every figure carries its unit in its key (``_ms``, ``_tokens_per_s``, ``_gib``, ``_nats``; ratios are ``_over_``).
``--size 3b``/``7b`` need a GPU: on CPU they are refused before anything is built.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import importlib.util
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
from common import REPO, SIZES, bench_model_dir, build_rows, load_bench_model, run, size_backbone, sync

ATTENTION = ("eager", "sdpa", "flash_attention_2")


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


class Report:
    """The report being built: every finished section is written at once (JSON and markdown, atomically)."""

    def __init__(self, out: Path, device: str):
        from mirage_rl.atomic import atomic_write_text

        self.out, self.device, self.data, self.t0 = out, device, {}, time.perf_counter()
        self._write = atomic_write_text
        out.mkdir(parents=True, exist_ok=True)

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {message}", file=sys.stderr, flush=True)

    @contextmanager
    def section(self, name: str):
        """Fill ``self.data[name]`` inside the block; on error record it (the traceback goes to stderr) and go on."""
        self.log(f"{name}: start")
        self.data[name] = body = {}
        try:
            yield body
        except Exception as e:  # a broken part is a finding, not the end of the check
            traceback.print_exc()
            body["error"] = f"{type(e).__name__}: {e}"[:2000]
        body["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.save()
        self.log(f"{name}: done")

    @contextmanager
    def part(self, body: dict, name: str):
        """Fill ``body[name]`` inside the block; an error (an OOM, say) is recorded there and the next part runs."""
        body[name] = part = {}
        try:
            yield part
        except Exception as e:
            traceback.print_exc()
            part["error"] = f"{type(e).__name__}: {e}"[:600]
            self.log(f"{name}: {type(e).__name__}")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.save()

    def save(self) -> None:
        self._write(self.out / "gpu_check.json", json.dumps(self.data, indent=1, default=str) + "\n")
        self._write(self.out / "gpu_check.md", markdown(self.data))


def flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.extend(flatten(v, key) if isinstance(v, dict) else [(key, v)])
    return out


def markdown(data: dict) -> str:
    lines = ["# GPU check", "", f"`{data.get('env', {}).get('command', '')}`", ""]
    for name, body in data.items():
        lines += [f"## {name}", "", "| key | value |", "|---|---|"]
        for k, v in flatten(body):
            shown = f"{v:.4g}" if isinstance(v, float) else str(v)
            if isinstance(v, list) and v and all(isinstance(x, dict) and "ms" in x for x in v):  # a profile's top 15
                shown = "; ".join(f"{x['name']} x{x['count']} {x['ms']:.3g} ms" for x in v)
            lines.append(f"| {k} | {shown.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def gib(nbytes: float) -> float:
    return round(nbytes / 2**30, 3)


@contextmanager
def peak(device: str, into: dict, key: str):
    """Record the peak memory of the block in ``into[key]`` (GiB): CUDA ``max_memory_allocated``; CPU peak RSS."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    yield
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        into[key] = gib(torch.cuda.max_memory_allocated())
    else:
        into[key] = gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


# ------------------------------------------------------------------------------------------------------- env
def env_section(body: dict, args) -> None:
    from mirage_rl.results.machine import git_commit

    cuda = args.device.startswith("cuda")
    body.update({
        "gpu_name": torch.cuda.get_device_name() if cuda else None,
        "gpu_memory_gib": gib(torch.cuda.get_device_properties(0).total_memory) if cuda else None,
        "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": version("transformers"),
        "trl": version("trl"), "deepspeed": version("deepspeed"), "peft": version("peft"),
        "accelerate": version("accelerate"), "flash_attn_importable": importlib.util.find_spec("flash_attn") is not None,
        "attention_implementations_tried": attention_implementations(args.device),
        "size": args.size, "backbone": args.backbone, "device": args.device, "quick": args.quick,
        "command": " ".join(["python", *sys.argv]), "commit": git_commit(REPO), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    })


def attention_implementations(device: str) -> list[str]:
    ok = device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None
    return [a for a in ATTENTION if a != "flash_attention_2" or ok]


# ---------------------------------------------------------------------------------------------------- parity
def to_device(batch: dict, device: str, dtype) -> dict:
    return {k: (v.to(device, dtype) if torch.is_tensor(v) and v.is_floating_point() else
                v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def text_logits(model, batch: dict, method: str, keep: torch.Tensor) -> torch.Tensor:
    """Logits (float32) at the ``keep`` positions of a latent sequence, the slots filled by ``method``."""
    from mirage_rl import latent

    with torch.no_grad():
        hidden = latent.latent_hidden_states(model, batch["input_ids"], batch["attention_mask"],
                                             batch.get("pixel_values"), batch.get("image_grid_thw"),
                                             batch.get("mm_token_type_ids"), batch["latent_mask"], method=method)
        return model.get_output_embeddings()(hidden[keep]).float()


def diff_stats(a: torch.Tensor, b: torch.Tensor, unit: str = "logit") -> dict:
    d = (a.float() - b.float()).abs()
    finite = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
    return {f"max_abs_{unit}_diff": float(d.max()) if finite else float("nan"),
            f"mean_abs_{unit}_diff": float(d.mean()) if finite else float("nan"), "positions": int(d.numel() // max(
                1, d.shape[-1] if d.dim() > 1 else 1)), "finite": finite}


def answer_batch(processor, lt, rows, n: int, device: str, dtype, prompt_pad: bool = False) -> tuple[dict, torch.Tensor]:
    """A stage-2 batch of ``n`` VSP rows (answer with one latent block) and its text positions after the block;
    ``prompt_pad``: prompts of different lengths (left padding of up to several dozen columns)."""
    from mirage_rl.collator import LatentCollator

    examples = []
    for i in range(n):
        ex = dict(rows[i % len(rows)])
        if prompt_pad and i % 2:
            ex["prompt"] = copy.deepcopy(ex["prompt"])
            part = next(p for p in ex["prompt"][0]["content"] if p["type"] == "text")
            part["text"] = part["text"] + " Think step by step." * (3 * i)
        examples.append(ex)
    batch = LatentCollator(processor, lt, "hidden", stage=2)(examples)
    after = (batch["input_ids"] == lt.end).long().cumsum(1) > 0
    keep = after & (batch["labels"] != -100) & (batch["input_ids"] != lt.end)
    return to_device(batch, device, dtype), keep.to(device)


def rollout_batch(processor, lt, rows, n: int, blocks: int, device: str, dtype) -> tuple[dict, torch.Tensor]:
    """Rollout-shaped sequences: a prompt, then per row ``i`` some text, ``blocks`` latent blocks opened at different
    steps (row-dependent offsets: the cached fill realigns them with masked gap columns), text after each; returns the
    batch and its non-slot, non-padding positions."""
    from mirage_rl import latent
    from mirage_rl.collator import LatentCollator

    prompts = LatentCollator(processor, lt, "hidden", with_answer=False)([rows[i % len(rows)] for i in range(n)])
    text = processor.tokenizer("RIGHT, DOWN, LEFT, UP, DOWN, RIGHT", add_special_tokens=False)["input_ids"]
    tails = []
    for i in range(n):
        seq = []
        for b in range(blocks):
            seq += (text * 4)[: 1 + (i * 3 + b * 2) % 7] + [lt.start] + [lt.pad] * lt.latent_size + [lt.end]
        tails.append(seq + text[:3])
    width = max(len(t) for t in tails)
    pad = processor.tokenizer.pad_token_id
    tail_ids = torch.tensor([t + [pad] * (width - len(t)) for t in tails])
    tail_am = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in tails])
    batch = {"input_ids": torch.cat([prompts["input_ids"], tail_ids], 1),
             "attention_mask": torch.cat([prompts["attention_mask"], tail_am], 1),
             "mm_token_type_ids": torch.cat([prompts["mm_token_type_ids"], torch.zeros_like(tail_ids)], 1),
             "pixel_values": prompts["pixel_values"], "image_grid_thw": prompts["image_grid_thw"]}
    slots, _ = latent.slot_masks(batch["input_ids"], lt.start, lt.pad, lt.end, lt.latent_size)
    batch["latent_mask"] = slots
    keep = batch["attention_mask"].bool() & ~slots
    keep[:, : prompts["input_ids"].shape[1]] = False  # compare the generated part (prompt columns: left padding)
    return to_device(batch, device, dtype), keep.to(device)


def parity_section(body: dict, args, model, model_fp32, processor, lt, rows) -> None:
    from mirage_rl import latent

    dtype = next(model.parameters()).dtype
    n = 2 if args.quick else 4
    # bf16 latent fill against fp32, same inputs
    bf16 = model if dtype == torch.bfloat16 else copy.deepcopy(model_fp32).to(torch.bfloat16)
    batch32, keep = answer_batch(processor, lt, rows, n, args.device, torch.float32)
    batch16, _ = answer_batch(processor, lt, rows, n, args.device, torch.bfloat16)
    body["bf16_vs_fp32"] = {}
    reference = {}
    for method in ("cached", "multipass"):
        reference[method] = text_logits(model_fp32, batch32, method, keep)
        body["bf16_vs_fp32"][method] = diff_stats(text_logits(bf16, batch16, method, keep), reference[method])
    body["bf16_vs_fp32"]["fp32_cached_vs_multipass"] = diff_stats(reference["cached"], reference["multipass"])
    body["bf16_vs_fp32"]["logit_abs_max"] = float(reference["cached"].abs().max())
    if bf16 is not model:
        del bf16
    # attention implementations against eager, in the working dtype
    layouts = {"left_padding": answer_batch(processor, lt, rows, n, args.device, dtype, prompt_pad=True),
               "realigned_rollout": rollout_batch(processor, lt, rows, n, 1, args.device, dtype),
               "two_blocks_per_row": rollout_batch(processor, lt, rows, n, 2, args.device, dtype)}
    body["attention"] = {}
    for name, (batch, keep) in layouts.items():
        cols = latent.aligned_columns(batch["latent_mask"])
        row = {"left_pad_columns_max": int((batch["attention_mask"] == 0).sum(1).max()),
               "gap_columns_inserted": int(cols.max() + 1 - batch["latent_mask"].shape[1]) if cols is not None else 0}
        outputs = {}
        for impl in attention_implementations(args.device):
            try:
                model.set_attn_implementation(impl)
                outputs[impl] = text_logits(model, batch, "cached", keep)
                if impl != "eager":
                    row[impl] = diff_stats(outputs[impl], outputs["eager"])
            except Exception as e:  # an implementation that breaks on these masks is a finding
                row[impl] = {"error": f"{type(e).__name__}: {e}"[:500]}
        model.set_attn_implementation("sdpa")
        body["attention"][name] = row


def grpo_parity(body: dict, trainer, rows, prompts: int, gens: int) -> None:
    """A bf16 rollout (``prompts`` x ``gens``, one group per prompt) : sampling-time log-probs against the recomputed
    ones (the importance-sampling correction recomputes them: ``old_per_token_logps``)."""
    trainer.model.train()
    out = trainer._generate_and_score_completions([dict(rows[i]) for i in range(prompts) for _ in range(gens)])
    mask = (out["completion_mask"] * out["tool_mask"]).bool()
    d = (out["old_per_token_logps"].float() - out["sampling_per_token_logps"].float()).abs()[mask]
    metrics = trainer._metrics["train"]
    body.update({"dtype": str(next(trainer.model.parameters()).dtype).replace("torch.", ""),
                 "mean_abs_logprob_diff_nats": float(d.mean()), "max_abs_logprob_diff_nats": float(d.max()),
                 "p99_abs_logprob_diff_nats": float(torch.quantile(d, 0.99)), "tokens": int(d.numel()),
                 # near 0: the sampled tokens were near-certain and the differences above say little (the first H100
                 # run: the biased head opened a latent block at every step, the only sampled tokens)
                 "sampled_logprob_mean_nats": float(out["sampling_per_token_logps"].float()[mask].mean()),
                 "latent_blocks_per_completion": metrics["latent/blocks_per_completion"][-1],
                 "importance_sampling_ratio_mean": metrics["sampling/importance_sampling_ratio/mean"][-1],
                 "importance_sampling_clipped_fraction":
                     metrics["sampling/importance_sampling_ratio/clipped_fraction"][-1]})


def grpo_parity_weaker_bias(body: dict, trainer, rows, gens: int, biases=(15.0, 5.0)) -> None:
    """The parity again with the ``<|latent_start|>`` head row scaled down from the bench's ``start_bias`` 50 to each of
    ``biases``: at 3B shapes a bias of 50 opens a block at every step, so every sampled token is near-certain (the
    first H100 run). Filled into ``body["by_start_bias"]["<bias>"]``; the head row is restored afterwards."""
    from mirage_rl.modeling import LatentTokens

    lt = LatentTokens.from_config(trainer.model.config)
    head = trainer.model.get_output_embeddings().weight
    saved = head[lt.start].detach().clone()
    body["by_start_bias"] = {}
    try:
        for bias in biases:
            with torch.no_grad():
                head[lt.start] = saved * (bias / 50.0)
            part = body["by_start_bias"][f"{bias:g}"] = {}
            try:
                grpo_parity(part, trainer, rows, 1, gens)
            except Exception as e:  # a finding, not the end of the check
                part["error"] = f"{type(e).__name__}: {e}"[:500]
    finally:
        with torch.no_grad():
            head[lt.start] = saved


# ----------------------------------------------------------------------------------------------------- speed
def decode_speed(body: dict, mem: dict, args, model, processor, lt, rows) -> None:
    import generate as decoding

    suppress = decoding.suppressed(model, processor, lt)
    new = 8 if args.quick else 64
    for batch_size in (8, 64):
        batch = decoding.prompt_batch(processor, lt, rows, batch_size, args.device)
        runs = {"latent": lambda: decoding.decode_ours(model, processor, batch, new, "hidden", suppress),
                "plain": lambda: decoding.decode_ours(model, processor, batch, new, "none", suppress),
                "hf_generate": lambda: decoding.decode_hf(model, processor, batch, new, suppress)}
        times = {k: [] for k in runs}
        with peak(args.device, mem, f"decode_batch{batch_size}_peak_gib"):
            for i in range(1 + (1 if args.quick else 3)):
                for name, fn in runs.items():
                    sync(args.device)
                    t0 = time.perf_counter()
                    fn()
                    sync(args.device)
                    if i:  # the first round warms up
                        times[name].append(time.perf_counter() - t0)
        tps = {k: batch_size * new / statistics.median(v) for k, v in times.items()}
        body[f"batch{batch_size}"] = {"new_tokens": new, **{f"{k}_tokens_per_s": v for k, v in tps.items()},
                                      "latent_over_plain_tokens_per_s": tps["latent"] / tps["plain"],
                                      "plain_over_hf_generate_tokens_per_s": tps["plain"] / tps["hf_generate"]}
        args.report.log(f"speed: decode batch {batch_size}: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in tps.items()))


def grpo_trainer(args, model, model_dir: Path, rows, work: Path, start_bias: float = 50.0, fp32: bool = False):
    """A bench GRPO trainer on ``model`` (``bench/grpo_step.make_trainer``). ``fp32``: no mixed precision, and the
    importance-sampling correction forced on so that the recomputed log-probs exist to compare."""
    import grpo_step

    ns = argparse.Namespace(batch=args.grpo_prompts * args.grpo_generations, num_generations=args.grpo_generations,
                            max_completion_length=16 if args.quick else 48, beta=0.0, num_iterations=1,
                            start_bias=start_bias, bf16=False if fp32 else None,
                            config_overrides={"vllm_importance_sampling_correction": True} if fp32 else {},
                            # 3B shapes on one H100, 2026-11-26 (checkpointing never turned on then: prepare_for_steps
                            # lacked it): 4 x 8 ran out of 80 GB; 2 x 4 peaked at 49 GiB
                            gradient_checkpointing=args.device.startswith("cuda"))
    return grpo_step.make_trainer(model_dir, args.size, rows, ns, args.device, True,
                                  work / ("grpo_fp32" if fp32 else "grpo"), model=model)


def grpo_speed(body: dict, mem: dict, args, setup, rows) -> None:
    import grpo_step

    trainer, timer, images = setup
    batch = [rows[i] for i in range(args.grpo_prompts) for _ in range(args.grpo_generations)]
    steps, unshared = [], []
    with peak(args.device, mem, "grpo_step_peak_gib"):
        for i in range(1 + (1 if args.quick else 2)):
            s = grpo_step.grpo_step(trainer, timer, images, batch, args.device)
            if i:
                steps.append(s)
    # the same steps with every rollout running its own prompt (shared_prefix off, issue 22), interleaved
    try:
        for i in range(2 if args.quick else 4):
            trainer.args.shared_prefix = bool(i % 2)
            s = grpo_step.grpo_step(trainer, timer, images, batch, args.device)
            (steps if trainer.args.shared_prefix else unshared).append(s)
    finally:
        trainer.args.shared_prefix = True
    med = {p: statistics.median(s[p] for s in steps) for p in (*grpo_step.PHASES, "total")}
    lm = trainer.accelerator.unwrap_model(trainer.model).model.language_model
    body.update({"prompts": args.grpo_prompts, "generations": args.grpo_generations,
                 "step_ms": 1000 * med["total"], **{f"{p}_ms": 1000 * med[p] for p in grpo_step.PHASES},
                 "generation_share": med["generation"] / med["total"],
                 "unshared_step_ms": 1000 * statistics.median(s["total"] for s in unshared),
                 "shared_over_unshared_step": med["total"] / statistics.median(s["total"] for s in unshared),
                 "gradient_checkpointing": bool(lm.gradient_checkpointing)})


def fused_variant(args) -> str | None:
    """The stage-2 variant with fused one-column steps (issue 31) this check times: CUDA graphs on CUDA; on CPU
    ``torch.compile`` (Inductor's C++ backend), not with ``--quick`` (compiling takes a minute there)."""
    if args.device.startswith("cuda"):
        return "stage2_fused_cudagraphs"
    return None if args.quick else "stage2_fused_compile"


def sft_speed(body: dict, mem: dict, args, model, model_dir: Path, rows) -> dict:
    """Stage 1 / plain and stage 2 / plain step ratios at batch 8, k = 4, and stage 2 with fused one-column steps
    (:func:`fused_variant`); returns the trainers (``variant -> (trainer, inputs, tokens)``) for the profile."""
    import sft_step

    first = None
    trainers = {}
    fused = fused_variant(args)
    for variant in ("plain", "stage1", "stage2", *([fused] if fused else [])):
        trainers[variant] = sft_step.make_trainer(variant, args.size, model_dir, rows, 8, args.device, False,
                                                  share=first, model=model if first is None else None)
        first = first or trainers[variant][0]
    times = {v: [] for v in trainers}
    with peak(args.device, mem, "sft_step_peak_gib"):
        for i in range(2 + (1 if args.quick else 3)):  # two warm-up rounds: the fused variant compiles in its first
            for variant, (trainer, inputs, _) in list(trainers.items()):
                try:
                    t = sft_step.step(trainer, inputs, args.device)
                except Exception as e:  # the opt-in fused path failing is a finding; the other variants go on
                    if variant != fused:
                        raise
                    traceback.print_exc()
                    body["stage2_fused_error"] = f"{type(e).__name__}: {e}"[:600]
                    del trainers[variant], times[variant]
                    continue
                if i >= 2:
                    times[variant].append(t)
    ms = {v: 1000 * statistics.median(t) for v, t in times.items()}
    body.update({"batch": 8, "latent_size": 4, **{f"{v}_step_ms": t for v, t in ms.items()},
                 "stage1_over_plain": ms["stage1"] / ms["plain"], "stage2_over_plain": ms["stage2"] / ms["plain"]})
    if fused in ms:
        body[f"{fused}_over_plain"] = ms[fused] / ms["plain"]
    elif not fused:
        body["stage2_fused_skipped"] = "--quick on CPU: compiling the fused steps takes a minute; not measured"
    return trainers


#: CUDA runtime / driver calls that launch work on the GPU (one per kernel, one per replayed CUDA graph)
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch",
                "cudaMemcpyAsync", "cudaMemsetAsync")


def profile_section(body: dict, args, trainers: dict) -> None:
    """One profiled training step of each SFT variant (``torch.profiler``; issue 31): on CUDA the kernels run and the
    launch calls made, and the top 15 kernels by GPU time; on CPU the leaf ``aten`` operators run and the top 15 by
    self CPU time (there is no kernel launch on CPU). Each variant steps once untimed first."""
    import sft_step
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for variant, (trainer, inputs, _) in trainers.items():
        if variant == "stage1":
            continue
        sft_step.step(trainer, inputs, args.device)
        with profile(activities=activities) as prof:
            sft_step.step(trainer, inputs, args.device)
        events = prof.events()
        if cuda:
            work = [e for e in events if e.device_type == DeviceType.CUDA]
            entry = {"kernels": len(work), "launch_calls": sum(e.name in LAUNCH_CALLS for e in events),
                     "graph_launches": sum(e.name == "cudaGraphLaunch" for e in events)}
        else:
            work = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")
                    and not e.cpu_children]
            entry = {"leaf_aten_ops": len(work)}
        totals: dict[str, list[float]] = {}
        for e in work:
            t = totals.setdefault(e.name, [0, 0.0])
            t[0] += 1
            t[1] += e.time_range.elapsed_us() / 1000 if cuda else e.self_cpu_time_total / 1000
        entry["total_ms"] = sum(t for _, t in totals.values())
        entry["top15"] = [{"name": n[:120], "count": c, "ms": t}
                          for n, (c, t) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:15]]
        body[variant] = entry
    if "plain" in body and "stage2" in body:
        key = "kernels" if cuda else "leaf_aten_ops"
        for variant in body:
            if variant != "plain" and isinstance(body[variant], dict):
                body[variant][f"{key}_over_plain"] = body[variant][key] / body["plain"][key]


def seven_b_fits(body: dict, args, model_dir: Path, rows, size: str = "7b") -> None:
    """One 7B-shaped (``size``) stage-2 step (AdamW, gradient checkpointing, batch 2) on this GPU: fits or the OOM
    message."""
    import sft_step

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        trainer, inputs, _ = sft_step.make_trainer("stage2", size, model_dir, rows, 2, args.device, True)
        body["step_ms"] = 1000 * sft_step.step(trainer, inputs, args.device)
        body["fits"] = True
    except torch.cuda.OutOfMemoryError as e:
        body["fits"], body["error"] = False, str(e).splitlines()[0][:300]
    body["peak_gib"] = gib(torch.cuda.max_memory_allocated())


# ------------------------------------------------------------------------------------------------------ main
def vllm_section(body: dict, args, model, processor, lt, model_dir: Path, rows) -> None:
    """The vLLM engine (issue 30) against the HF engine: greedy latent decoding of 8 prompts (tokens equal, fed
    latents' gap) and tokens/s of both. ``skipped`` where vLLM does not import (the lent GPU machine has none)."""
    from mirage_rl.engines import DecodeSettings, RolloutBatch, build_engine, vllm_available

    if not vllm_available():
        body["skipped"] = "vLLM is not installed on this machine (the lent GPU machine has none); not measured"
        return
    try:
        import os

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from generate import prompt_batch, suppressed

        batch = RolloutBatch(prompt_batch(processor, lt, rows, 8, args.device))
        settings = DecodeSettings(max_new_tokens=32, latent_mode="hidden", record_latents=True,
                                  suppress_token_ids=suppressed(model, processor, lt))
        hf = build_engine("hf", model, processor, lt, model_dir, latent=True)
        vl = build_engine("vllm", model, processor, lt, model_dir, latent=True)
        times = {}
        for name, engine in (("hf", hf), ("vllm", vl)):
            engine.rollout(batch, settings)
            t0 = time.perf_counter()
            out = engine.rollout(batch, settings)
            times[name] = (time.perf_counter() - t0, out)
        a, b = times["hf"][1], times["vllm"][1]
        body["greedy_tokens_equal"] = a.sequences.tolist() == b.sequences.cpu().tolist()
        gaps = [float((x - y).abs().max()) for x, y in zip(a.fed_latents, b.fed_latents) if x.numel() and
                x.shape == y.shape]
        body["fed_latent_max_gap"] = max(gaps) if gaps else None
        for name, (dt, out) in times.items():
            body[f"{name}_tokens_per_s"] = out.sequences.numel() / dt
        vl.close()
    except Exception as e:  # a finding, not the end of the check
        traceback.print_exc()
        body["error"] = f"{type(e).__name__}: {e}"[:500]


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="where gpu_check.json and gpu_check.md go")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backbone", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen3_vl"],
                        help="model family (issue 32): qwen2_5_vl (sizes 3b, 7b) or qwen3_vl (size 8b)")
    parser.add_argument("--size", default=None, choices=SIZES,
                        help="model shape (3b/7b/8b need a GPU); default 3b, or 8b with --backbone qwen3_vl")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and tokens (the CI test)")
    parser.add_argument("--time_budget_s", type=float, default=450.0,
                        help="the 7B memory check is skipped when less than 150 s of this budget is left")
    parser.add_argument("--grpo_prompts", type=int, default=2)
    parser.add_argument("--grpo_generations", type=int, default=4)
    args = parser.parse_args()
    if args.size is None:
        args.size = "8b" if args.backbone == "qwen3_vl" else "3b"
    if args.size != "tiny" and size_backbone(args.size) != args.backbone:
        sys.exit(f"gpu_check: --size {args.size} is a {size_backbone(args.size)} shape; with --backbone "
                 f"{args.backbone} use {' or '.join(s for s in SIZES if s == 'tiny' or size_backbone(s) == args.backbone)}")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit(f"gpu_check: --device {args.device} but torch sees no CUDA device; on a CPU machine run "
                 "--size tiny --device cpu")
    if args.size != "tiny" and not cuda:
        sys.exit(f"gpu_check: --size {args.size} builds a {args.size}-shaped model and needs a GPU (--device cuda); "
                 "on CPU run --size tiny --device cpu")
    report = args.report = Report(Path(args.output_dir), args.device)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    torch.manual_seed(0)
    with report.section("env") as body:
        env_section(body, args)

    from mirage_rl.modeling import LatentTokens

    model_dir = bench_model_dir("tiny", 4, work, args.backbone)
    rows = build_rows(8, work / "data", "bench/gpu_check.py")
    report.log(f"model: building {args.size} on {args.device}")
    model, processor = load_bench_model(args.size, model_dir, args.device)
    model.eval()
    lt = LatentTokens.from_config(model.config)
    model_fp32 = model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()

    with report.section("parity") as body:
        parity_section(body, args, model, model_fp32, processor, lt, rows)
    if model_fp32 is not model:
        del model_fp32
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    mem: dict = {}  # peaks measured in the speed section, reported under "memory"
    trainers: dict = {}  # the SFT variants, profiled after the speed section
    with report.section("speed") as body:
        body["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
        with report.part(body, "decode"):
            decode_speed(body["decode"], mem, args, model, processor, lt, rows)
        grpo_rows = rows.remove_columns([c for c in ("helper_image", "answer") if c in rows.column_names])
        # the GRPO parity needs a bf16 policy: on CPU a bf16 copy of the tiny model, on CUDA the bf16 model itself
        policy = model if next(model.parameters()).dtype == torch.bfloat16 else copy.deepcopy(model).to(torch.bfloat16)
        setup = grpo_trainer(args, policy, model_dir, grpo_rows, work)
        report.data["parity"]["grpo_logprobs"] = {}
        grpo_parity(report.data["parity"]["grpo_logprobs"], setup[0], grpo_rows, 1, args.grpo_generations)
        grpo_parity_weaker_bias(report.data["parity"]["grpo_logprobs"], setup[0], grpo_rows, args.grpo_generations)
        # the bias-15 parity in fp32 (no mixed precision): what gap is left there is not bf16 rounding
        fp32_body = report.data["parity"]["grpo_logprobs"]["fp32_start_bias_15"] = {}
        try:
            fp32_policy = copy.deepcopy(policy).float()
            grpo_parity(fp32_body, grpo_trainer(args, fp32_policy, model_dir, grpo_rows, work, 15.0, fp32=True)[0],
                        grpo_rows, 1, args.grpo_generations)
        except Exception as e:  # a finding, not the end of the check
            traceback.print_exc()
            fp32_body["error"] = f"{type(e).__name__}: {e}"[:500]
        fp32_policy = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if policy is not model:  # the phase split is timed on the working model
            del setup
            setup = grpo_trainer(args, model, model_dir, grpo_rows, work)
        del policy
        with report.part(body, "grpo"):
            grpo_speed(body["grpo"], mem, args, setup, grpo_rows)
        del setup
        model.gradient_checkpointing_disable()  # the SFT steps are timed without it, as bench/sft_step.py does
        with report.part(body, "sft"):
            trainers = sft_speed(body["sft"], mem, args, model, model_dir, rows)
    with report.section("profile") as body:
        if trainers:
            profile_section(body, args, trainers)
        else:
            body["skipped"] = "the SFT speed part failed: nothing to profile"
        del trainers

    with report.section("vllm") as body:
        vllm_section(body, args, model, processor, lt, model_dir, rows)
    del model
    gc.collect()
    with report.section("memory") as body:
        body.update(mem)
        big = "8b" if args.backbone == "qwen3_vl" else "7b"
        big_key = {"7b": "seven_b_stage2_gc_batch2", "8b": "eight_b_stage2_gc_batch2"}[big]
        left = args.time_budget_s - (time.perf_counter() - report.t0)
        if not cuda or args.quick or left < 150:
            why = "CPU" if not cuda else "--quick" if args.quick else f"{left:.0f} s of the time budget left"
            body[big_key] = {"skipped": why}
        else:
            torch.cuda.empty_cache()
            body[big_key] = {}
            seven_b_fits(body[big_key], args, model_dir, rows, big)
    report.log(f"wrote {report.out / 'gpu_check.json'} and gpu_check.md")
    return report.data


if __name__ == "__main__":
    run(main)
