"""Decoding throughput: latent-interleaved vs plain decoding with the same loop, and our plain loop vs HF ``generate``.

    python bench/generate.py                          # tiny model, CPU: batch 1, 8, 32; k = 4, 8
    python bench/generate.py --batch_sizes 8 --ks 4 8 --new_tokens 128

Every variant decodes the same VSP prompts (``LatentCollator(with_answer=False)``, left-padded, one maze image per
row) followed by ``<|latent_start|>``, greedy, exactly ``--new_tokens`` new positions per row (end-of-sequence and
``<|latent_start|>`` are suppressed in text steps, so no row stops early and each latent row opens one block):

* ``latent``: ``mirage_rl.generation.generate(latent_mode="hidden")``: the first k new positions are latent steps
  (the row's last hidden state is the next input), then ``<|latent_end|>`` is forced and text follows.
* ``plain``: the same function with ``latent_mode="none"``: every position is a text step.
* ``hf``: ``model.generate`` (transformers) on the same batch, the same suppressed tokens, ``min_new_tokens``.

Tokens/s counts every new position of every row (latent slots included: each is one decoder step), prefill included.
Variants are interleaved per repeat. A separate instrumented pass times each decoder call of the latent variant and
reports the share of decode time spent in latent steps (``latent_step_share``), and the median of those k steps
against the same first k steps of a plain decode. Headline keys (batch 8,
k = 4, medians): ``latent_over_plain_tokens_per_s`` and ``plain_over_hf_generate_tokens_per_s``.

``--vllm`` (needs vLLM: ``make install-vllm``; issue 30) adds the section ``vllm``: at ``--vllm_batch_sizes`` (8, 64,
256), k = the first of ``--ks``, the same prompts and suppressed tokens, interleaved per repeat, through the rollout
engine interface: ``hf_latent`` / ``hf_plain`` (the HF engine), ``vllm_latent`` / ``vllm_plain`` (the vLLM engine:
its latent runner, ``latent_mode`` hidden / none) and ``vllm_stock`` (the same ``LLM``, requests without latent
settings: vLLM's own sampler, ``min_tokens`` = ``max_tokens``). Ratios: ``vllm_latent_over_vllm_stock`` (target >=
0.9), ``vllm_latent_over_hf_latent`` (target >= 1 at batch 256). Each vLLM variant's time is split into the runner's
``execute_model`` (forward), ``sample_tokens`` (sampling, the latent state machine) and the rest (scheduler,
input preparation, output processing), from timers around those two runner methods.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    SIZES,
    bench_model_dir,
    build_rows,
    header,
    load_bench_model,
    peak_memory_mb,
    run,
    summary,
    sync,
)


def prompt_batch(processor, lt, rows, batch: int, device: str) -> dict:
    """``batch`` VSP prompts, each ending with ``<|latent_start|>`` (so latent decoding opens a block at once)."""
    from mirage_rl.collator import LatentCollator

    collate = LatentCollator(processor, lt, "hidden", with_answer=False)
    b = collate([rows[i % len(rows)] for i in range(batch)])
    n = b["input_ids"].shape[0]
    b["input_ids"] = torch.cat([b["input_ids"], b["input_ids"].new_full((n, 1), lt.start)], 1)
    b["attention_mask"] = torch.cat([b["attention_mask"], b["attention_mask"].new_ones(n, 1)], 1)
    if "mm_token_type_ids" in b:
        b["mm_token_type_ids"] = torch.cat([b["mm_token_type_ids"], b["mm_token_type_ids"].new_zeros(n, 1)], 1)
    b.pop("latent_mask", None)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}


def suppressed(model, processor, lt) -> list[int]:
    tok = processor.tokenizer
    ids = {tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id, lt.start, lt.pad, lt.end,
           model.config.image_token_id, model.config.video_token_id}
    return sorted(ids)


def decode_ours(model, processor, batch, n_new: int, mode: str, suppress: list[int]):
    from mirage_rl.generation import generate

    return generate(model, processor, batch, max_new_tokens=n_new, latent_mode=mode, suppress_token_ids=suppress)


def decode_hf(model, processor, batch, n_new: int, suppress: list[int]):
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                                      "mm_token_type_ids")}
    return model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                          suppress_tokens=suppress, pad_token_id=processor.tokenizer.pad_token_id,
                          temperature=None, top_p=None, top_k=None)


def step_times(model, processor, batch, n_new: int, suppress: list[int], k: int, device: str, mode: str) -> dict:
    """One instrumented decode: the wall time between the starts of consecutive decoder calls is one step (decoder
    forward + LM head + token choice). Call 0 is the prefill; with ``mode="hidden"`` calls 1..k take latent inputs
    (with ``"none"`` the same first k steps are text steps: the comparison for the same cache lengths)."""
    from mirage_rl import latent

    starts = []

    def pre_hook(module, args, kwargs):
        sync(device)
        starts.append(time.perf_counter())

    handle = latent.language_model(model).register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        decode_ours(model, processor, batch, n_new, mode, suppress)
        sync(device)
        end = time.perf_counter()
    finally:
        handle.remove()
    steps = [b - a for a, b in zip(starts[1:], starts[2:] + [end])]
    first, rest = steps[:k], steps[k:]
    total = end - starts[0]
    return {"prefill_s": starts[1] - starts[0], "first_k_step_median_s": statistics.median(first),
            "later_step_median_s": statistics.median(rest), "first_k_share": sum(first) / total,
            "prefill_share": (starts[1] - starts[0]) / total}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=SIZES, help="model shape (3b/7b need a GPU)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8], help="latent sizes k")
    parser.add_argument("--new_tokens", type=int, default=64, help="new positions per row (latent slots included)")
    parser.add_argument("--repeats", type=int, default=5, help="timed decodes per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed decodes per variant first")
    parser.add_argument("--no_hf", action="store_true", help="skip HF generate")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vllm", action="store_true", help="add the vLLM-engine section (needs vLLM)")
    parser.add_argument("--vllm_only", action="store_true", help="only the vLLM-engine section")
    parser.add_argument("--vllm_batch_sizes", type=int, nargs="+", default=[8, 64, 256])
    args = parser.parse_args()
    if args.vllm_only:
        args.vllm, args.batch_sizes = True, []
    from mirage_rl.modeling import LatentTokens

    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    # distinct prompts: up to 64 (the vLLM section's larger batches cycle them, as GRPO groups repeat a prompt)
    wanted = args.batch_sizes + ([min(64, max(args.vllm_batch_sizes))] if args.vllm else [])
    rows = build_rows(max(wanted), work / "data", "bench/generate.py")
    results, t_start = [], time.perf_counter()
    for k in args.ks:
        model, processor = load_bench_model(args.size, bench_model_dir(args.size, k, work), args.device)
        model.eval()
        lt = LatentTokens.from_config(model.config)
        suppress = suppressed(model, processor, lt)
        for batch_size in args.batch_sizes:
            batch = prompt_batch(processor, lt, rows, batch_size, args.device)
            variants = {"plain": lambda: decode_ours(model, processor, batch, args.new_tokens, "none", suppress),
                        "latent": lambda: decode_ours(model, processor, batch, args.new_tokens, "hidden", suppress)}
            if not args.no_hf:
                variants["hf"] = lambda: decode_hf(model, processor, batch, args.new_tokens, suppress)
            times = {v: [] for v in variants}
            with torch.no_grad():
                outs = {v: f() for v, f in variants.items()}  # also checks the lengths and plain == hf below
                for i in range(args.warmup + args.repeats):
                    for v, f in variants.items():
                        sync(args.device)
                        t0 = time.perf_counter()
                        f()
                        sync(args.device)
                        if i >= args.warmup:
                            times[v].append(time.perf_counter() - t0)
                steps = {m: step_times(model, processor, batch, args.new_tokens, suppress, k, args.device, m)
                         for m in ("hidden", "none")}
            prompt_len = batch["input_ids"].shape[1]
            row = {"k": k, "batch": batch_size, "prompt_tokens": prompt_len, "new_tokens": args.new_tokens}
            for v, ts in times.items():
                s = summary(ts)
                row[v] = {**s, "tokens_per_s": batch_size * args.new_tokens / s["median_s"]}
            lengths = {"plain": outs["plain"].sequences.shape[1], "latent": outs["latent"].sequences.shape[1]}
            if "hf" in outs:
                hf_new = outs["hf"][:, prompt_len:]
                lengths["hf"] = hf_new.shape[1]
                row["plain_equals_hf_tokens"] = bool(torch.equal(hf_new.cpu(), outs["plain"].sequences.cpu()))
                row["plain_over_hf_generate_tokens_per_s"] = row["plain"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
            if set(lengths.values()) != {args.new_tokens}:
                raise RuntimeError(f"a variant decoded a different number of positions: {lengths}")
            row["latent_over_plain_tokens_per_s"] = row["latent"]["tokens_per_s"] / row["plain"]["tokens_per_s"]
            row["latent_step_share"] = steps["hidden"]["first_k_share"]
            row["steps"] = {"latent": steps["hidden"], "plain": steps["none"]}
            results.append(row)
            print(f"k={k} batch={batch_size}: plain {row['plain']['tokens_per_s']:.0f} tok/s, latent "
                  f"x{row['latent_over_plain_tokens_per_s']:.3f}, plain/hf "
                  f"x{row.get('plain_over_hf_generate_tokens_per_s', float('nan')):.3f}, latent steps "
                  f"{row['latent_step_share']:.1%} of the time", file=sys.stderr)
    out = {**header("generate", args.size, args.device), "new_tokens": args.new_tokens}
    if results:
        head = next((r for r in results if r["k"] == 4 and r["batch"] == 8), results[0])
        out.update({"headline_at": {"k": head["k"], "batch": head["batch"]},
                    "latent_over_plain_tokens_per_s": head["latent_over_plain_tokens_per_s"],
                    "plain_over_hf_generate_tokens_per_s": head.get("plain_over_hf_generate_tokens_per_s"),
                    "latent_step_share": head["latent_step_share"]})
    if args.vllm:
        out["vllm"] = vllm_section(args, rows, work)
    return {**out, "peak_memory_mb": peak_memory_mb(args.device), "wall_s": time.perf_counter() - t_start,
            "results": results}


def vllm_section(args, rows, work: Path) -> dict:
    """The vLLM engine against the HF engine and vLLM's own sampler (module docstring)."""
    import os

    from mirage_rl.engines import DecodeSettings, RolloutBatch, build_engine, vllm_available
    from mirage_rl.modeling import LatentTokens

    if not vllm_available():
        return {"skipped": "vLLM is not installed here (make install-vllm)"}
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    k = args.ks[0]
    model_dir = bench_model_dir(args.size, k, work)
    model, processor = load_bench_model(args.size, model_dir, args.device)
    model.eval()
    lt = LatentTokens.from_config(model.config)
    suppress = suppressed(model, processor, lt)
    hf = build_engine("hf", model, processor, lt, model_dir, latent=True)
    vl = build_engine("vllm", model, processor, lt, model_dir, latent=True, max_num_seqs=max(args.vllm_batch_sizes))
    runner = vl.llm.llm_engine.model_executor.driver_worker.worker.model_runner \
        if hasattr(vl.llm.llm_engine.model_executor.driver_worker, "worker") \
        else vl.llm.llm_engine.model_executor.driver_worker.model_runner
    clocks = {"execute_model": 0.0, "sample_tokens": 0.0}
    for name in clocks:
        inner = getattr(runner, name)

        def timed(*a, _inner=inner, _name=name, **kw):
            t0 = time.perf_counter()
            try:
                return _inner(*a, **kw)
            finally:
                clocks[_name] += time.perf_counter() - t0

        setattr(runner, name, timed)
    n = args.new_tokens

    def stock(batch):  # the engine's prompts (the same ids and image features), without latent settings
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False)
        return vl.llm.generate(vl.prompts(batch), params, use_tqdm=False)

    out = {"k": k, "new_tokens": n, "results": []}
    for batch_size in args.vllm_batch_sizes:
        batch = RolloutBatch(prompt_batch(processor, lt, rows, batch_size, args.device))
        settings = {m: DecodeSettings(max_new_tokens=n, latent_mode=m, suppress_token_ids=suppress)
                    for m in ("hidden", "none")}
        variants = {"hf_latent": lambda: hf.rollout(batch, settings["hidden"]),
                    "hf_plain": lambda: hf.rollout(batch, settings["none"]),
                    "vllm_latent": lambda: vl.rollout(batch, settings["hidden"]),
                    "vllm_plain": lambda: vl.rollout(batch, settings["none"]),
                    "vllm_stock": lambda: stock(batch)}
        times = {v: [] for v in variants}
        split = {v: {"execute_model_s": [], "sample_tokens_s": [], "rest_s": []} for v in variants if "vllm" in v}
        with torch.no_grad():
            first = {v: f() for v, f in variants.items()}
            same = first["hf_latent"].sequences.tolist() == first["vllm_latent"].sequences.tolist()
            for i in range(args.warmup + args.repeats):
                for v, f in variants.items():
                    for c in clocks:
                        clocks[c] = 0.0
                    sync(args.device)
                    t0 = time.perf_counter()
                    f()
                    sync(args.device)
                    dt = time.perf_counter() - t0
                    if i >= args.warmup:
                        times[v].append(dt)
                        if v in split:
                            split[v]["execute_model_s"].append(clocks["execute_model"])
                            split[v]["sample_tokens_s"].append(clocks["sample_tokens"])
                            split[v]["rest_s"].append(dt - clocks["execute_model"] - clocks["sample_tokens"])
        row = {"batch": batch_size, "latent_tokens_equal_hf": same}
        for v, ts in times.items():
            s = summary(ts)
            row[v] = {**s, "tokens_per_s": batch_size * n / s["median_s"]}
            if v in split:
                row[v]["split_median_s"] = {c: statistics.median(x) for c, x in split[v].items()}
        row["vllm_latent_over_vllm_stock"] = row["vllm_latent"]["tokens_per_s"] / row["vllm_stock"]["tokens_per_s"]
        row["vllm_latent_over_hf_latent"] = row["vllm_latent"]["tokens_per_s"] / row["hf_latent"]["tokens_per_s"]
        row["vllm_plain_over_hf_plain"] = row["vllm_plain"]["tokens_per_s"] / row["hf_plain"]["tokens_per_s"]
        out["results"].append(row)
        print(f"vllm batch={batch_size}: latent {row['vllm_latent']['tokens_per_s']:.0f} tok/s, x"
              f"{row['vllm_latent_over_vllm_stock']:.2f} of vLLM's own, x{row['vllm_latent_over_hf_latent']:.2f} of "
              f"the HF engine", file=sys.stderr)
    vl.close()
    return out


if __name__ == "__main__":
    run(main)
