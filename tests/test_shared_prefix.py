"""Shared-prefix scoring (issue 22): each group's prompt runs once; log-probs and every gradient equal the
unshared computation.

Tolerances. Log-probs: fp64 within 1e-10 (they come out bit-identical), fp32 within 1e-5 (abs + rel). Gradients
are sums over rows and positions whose order sharing changes, and on this scrambled tiny model those sums cancel
hard: the *unshared* computation differs from itself by up to ~5e-8 (fp64) / ~2e-6 (fp32) of a parameter's largest
gradient entry when only the order of its rows changes (measured, the ``floor`` below). So every parameter's
gradient is held to ``max(1e-10 | 1e-5, 10 x floor)``, still far below what a detached prefix would change."""

from pathlib import Path

import pytest
import torch

from mirage_rl import latent
from test_grpo import grpo_rows, make_trainer, rollout, text_after_block  # noqa: F401  (grpo_rows: a fixture)
from conftest import per_backbone_tiny_dir

each = per_backbone_tiny_dir  # the exactness tests run on each backbone; the bookkeeping ones on the default


def scoring_batch(out):
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    am = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    return ids, am


def score(trainer, out, shared: bool, ids=None, am=None, width=None, rows=None, grad=False):
    """Per-token log-probs ``(B, C)`` of the rollout ``out`` (or of ``ids``/``am`` with completion ``width``), the
    rows ``rows`` only (images picked along), with ``shared_prefix`` on or off; with ``grad`` also the gradient of
    a fixed weighting of them with respect to every parameter. Returns (log-probs, grads, decoder tokens run)."""
    if ids is None:
        ids, am = scoring_batch(out)
    width = width or out["completion_ids"].shape[1]
    pix, grid, n_img = out["pixel_values"], out["image_grid_thw"], out["num_images"]
    mm, values = out["mm_token_type_ids"], out.get("latent_values")
    if rows is not None:  # a subset of rows, in the given order, with their images
        per = grid.prod(-1).tolist()
        starts = [sum(per[:i]) for i in range(len(per) + 1)]
        pix = torch.cat([pix[starts[i]:starts[i + 1]] for i in rows])
        grid, n_img = grid[rows], [n_img[i] for i in rows]
        ids, am, mm = ids[rows], am[rows], mm[rows]
        values = values[rows] if values is not None else None
    trainer.args.shared_prefix = shared
    trainer.rollout_state.loss_latents = values
    tokens = []
    hook = latent.language_model(trainer.model).register_forward_pre_hook(
        lambda m, a, kw: tokens.append(kw["inputs_embeds"].shape[0] * kw["inputs_embeds"].shape[1]), with_kwargs=True)
    trainer.model.zero_grad()
    try:
        with torch.set_grad_enabled(grad):
            lp, _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, ids, am, width, pixel_values=pix, image_grid_thw=grid, num_images=n_img,
                mm_token_type_ids=mm)
            grads = None
            if grad:
                w = torch.linspace(-1, 1, lp.shape[1], dtype=lp.dtype)
                (lp * am[:, -width:] * w).sum().backward()
                grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    finally:
        hook.remove()
        trainer.rollout_state.loss_latents = None
    return lp.detach(), grads, sum(tokens)


def grad_gap(a: dict, b: dict) -> float:
    """The largest difference between two gradients, per parameter relative to its largest entry in ``b``."""
    assert a.keys() == b.keys() and a
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp(min=1e-30)).item() for n in a)


def assert_same(a, b, tol, floor=0.0):
    """Log-probs within ``tol`` (abs + rel), every gradient within ``max(tol, 10 * floor)`` (module docstring)."""
    (lp_a, g_a, _), (lp_b, g_b, _) = a, b
    torch.testing.assert_close(lp_a, lp_b, atol=tol, rtol=tol)
    if g_a is not None:
        assert floor < 1e-6 if lp_a.dtype == torch.float64 else floor < 1e-4  # the order noise itself is small
        assert grad_gap(g_a, g_b) <= max(tol, 10 * floor)


def order_floor(trainer, out, n: int) -> float:
    """How much the unshared gradient moves when only the order of the ``n`` rows changes."""
    rows = list(reversed(range(n)))
    a, b = score(trainer, out, False, grad=True), score(trainer, out, False, grad=True, rows=rows)
    assert torch.equal(b[0].flip(0), a[0]) or a[0].dtype == torch.float32
    return grad_gap(b[1], a[1])


@pytest.mark.parametrize("objective,dtype,tol", [("none", torch.float64, 1e-10), ("gaussian", torch.float64, 1e-10),
                                                 ("none", torch.float32, 1e-5)])
def test_shared_prefix_scores_and_gradients_equal_the_unshared_ones(each, grpo_rows, tmp_path, objective, dtype,
                                                                     tol):
    # the tiny Qwen3-VL opens a block in every rollout at the default bias of <|latent_start|>: a lower one leaves rows
    # without a block (measured: 10 of 12 with a block, first slots at 6 distinct steps)
    bias = 4.0 if "qwen3_vl" in Path(each).name else 8.0
    trainer, lt = make_trainer(each, grpo_rows, tmp_path, dtype=dtype, latent_objective=objective,
                               per_device_train_batch_size=12, num_generations=4, start_bias=bias)
    out = rollout(trainer, grpo_rows, n_prompts=3)
    # the rollouts exercise what matters: blocks opened at different steps, text scored after a block, no block
    slots, _ = trainer._completion_slot_masks(out["prompt_ids"], out["completion_ids"])
    first = {int(r.nonzero()[0]) for r in slots if r.any()}
    assert int(text_after_block(out, lt).sum()) >= 5 and not bool(slots.any(1).all())
    assert len(first) >= 2 or objective == "gaussian", first  # (these Gaussian rollouts open theirs at one step)
    trainer.model.train()
    shared, unshared = score(trainer, out, True, grad=True), score(trainer, out, False, grad=True)
    floor = order_floor(trainer, out, 12)
    assert_same(shared, unshared, tol, floor)
    # the prompts ran once per group: 3 prompts instead of 12 rows
    P = out["prompt_ids"].shape[1] - 1
    assert unshared[2] - shared[2] == (12 - 3) * P


def test_rows_of_a_group_need_not_be_adjacent_nor_complete(tiny_dir, grpo_rows, tmp_path):
    trainer, _ = make_trainer(tiny_dir, grpo_rows, tmp_path, dtype=torch.float64, per_device_train_batch_size=12,
                              num_generations=4)
    out = rollout(trainer, grpo_rows, n_prompts=3)
    trainer.model.train()
    rows = [5, 0, 9, 1, 6, 10, 3]  # TRL shuffles a generation batch; groups of 3, 2 and 2 rows, interleaved
    shared, unshared = (score(trainer, out, s, rows=rows, grad=True) for s in (True, False))
    assert_same(shared, unshared, 1e-10, order_floor(trainer, out, 12))
    assert unshared[2] - shared[2] == (7 - 3) * (out["prompt_ids"].shape[1] - 1)
    # no two rows share a prompt: the unshared forward runs
    alone = score(trainer, out, True, rows=[0, 4, 8])
    assert alone[2] == score(trainer, out, False, rows=[0, 4, 8])[2]


def test_a_prompt_that_ends_in_latent_start_beside_one_that_does_not(each, grpo_rows, tmp_path):
    trainer, lt = make_trainer(each, grpo_rows, tmp_path, dtype=torch.float64, per_device_train_batch_size=8,
                               num_generations=4)
    out = rollout_out = rollout(trainer, grpo_rows, n_prompts=2)
    k, pad_id = lt.latent_size, trainer.processing_class.tokenizer.pad_token_id
    p_ids, p_am, c_ids, c_am = out["prompt_ids"], out["prompt_mask"], out["completion_ids"], out["completion_mask"]
    B = p_ids.shape[0]
    block = torch.tensor([lt.pad] * k + [lt.end])
    first = torch.arange(B) < 4  # group 0's prompt ends in <|latent_start|>; its completions open with the block
    ids = torch.cat([torch.where(first[:, None], p_ids, torch.cat([p_ids.new_full((B, 1), pad_id), p_ids[:, :-1]], 1)),
                     torch.where(first[:, None], p_ids.new_full((B, 1), lt.start), p_ids[:, -1:]),
                     torch.where(first[:, None], torch.cat([block.expand(B, -1), c_ids], 1),
                                 torch.cat([c_ids, c_ids.new_full((B, k + 1), pad_id)], 1))], 1)
    ones = torch.ones(B, k + 1, dtype=c_am.dtype)
    am = torch.cat([torch.where(first[:, None], p_am, torch.cat([p_am.new_zeros(B, 1), p_am[:, :-1]], 1)),
                    p_am[:, -1:],
                    torch.where(first[:, None], torch.cat([ones, c_am], 1), torch.cat([c_am, 0 * ones], 1))], 1)
    width = c_ids.shape[1] + k + 1
    slots, _ = trainer._slot_masks(ids)
    assert bool(slots[:4, -width].all()) and not bool(slots[4:, -width].any())  # block at the completion's start
    image = trainer.model.config.image_token_id  # mm_token_type_ids: 1 at image tokens, 0 at text
    assert torch.equal(out["mm_token_type_ids"], (scoring_batch(out)[0] == image).to(out["mm_token_type_ids"].dtype))
    out = dict(out, mm_token_type_ids=(ids == image).to(out["mm_token_type_ids"].dtype))
    trainer.model.train()
    shared, unshared = (score(trainer, out, s, ids=ids, am=am, width=width, grad=True) for s in (True, False))
    assert_same(shared, unshared, 1e-10, order_floor(trainer, rollout_out, 8))
    assert shared[2] < unshared[2]


def test_sharing_is_skipped_where_it_cannot_run(tiny_dir, grpo_rows, tmp_path):
    """``latent_fill: multipass`` asks for full forwards; reentrant checkpointing would drop the prompt keys'
    gradient; sliding-window layers are not supported. The unshared forward runs, and the reason is logged once."""
    import functools

    from torch.utils.checkpoint import checkpoint

    trainer, _ = make_trainer(tiny_dir, grpo_rows, tmp_path, latent_fill="multipass")
    trainer.model.train()
    assert not trainer._shares_prefix(trainer.model)
    trainer.args.latent_fill = "auto"
    assert trainer._shares_prefix(trainer.model)
    lm = latent.language_model(trainer.model)
    for layer in lm.layers:
        layer.gradient_checkpointing, layer._gradient_checkpointing_func = True, functools.partial(
            checkpoint, use_reentrant=False)
    assert trainer._shares_prefix(trainer.model)
    for layer in lm.layers:
        layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=True)
    assert not trainer._shares_prefix(trainer.model)
    assert not trainer._shares_prefix(trainer.model)
    assert trainer._prefix_skips == {"gradient checkpointing is reentrant (use_reentrant is not false)"}
    trainer.model.eval()  # no backward: checkpointing plays no part
    assert trainer._shares_prefix(trainer.model)
    for layer in lm.layers:
        layer.gradient_checkpointing = False
    lm.config.layer_types = ["full_attention"] * (len(lm.layers) - 1) + ["sliding_attention"]
    try:
        assert not trainer._shares_prefix(trainer.model)
    finally:
        lm.config.layer_types = ["full_attention"] * len(lm.layers)


def test_gradient_checkpointing_shares_too(each, grpo_rows, tmp_path):
    """Under (non-reentrant) gradient checkpointing the recomputed layers read the keys their first run stored: the
    shared scoring's log-probs and gradients equal the unshared ones (which run the multi-pass fill there)."""
    trainer, _ = make_trainer(each, grpo_rows, tmp_path, dtype=torch.float64, gradient_checkpointing=True,
                              per_device_train_batch_size=12, num_generations=4)
    out = rollout(trainer, grpo_rows, n_prompts=3)
    # as Trainer.train does (no kwargs: transformers' default, non-reentrant)
    trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)
    trainer.model.train()
    lm = latent.language_model(trainer.model)
    assert lm.gradient_checkpointing and all(layer.gradient_checkpointing for layer in lm.layers)
    assert trainer._shares_prefix(trainer.model)
    shared, unshared = score(trainer, out, True, grad=True), score(trainer, out, False, grad=True)
    assert_same(shared, unshared, 1e-10, order_floor(trainer, out, 12))
    assert shared[2] < unshared[2] / 2  # the prompts ran once per group (the unshared fill runs several passes)

@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_lora_policy_and_the_reference_share_too(each, grpo_rows, tmp_path, beta):
    """LoRA adapters (as ``mirage-rl grpo`` configures them) and, with ``beta > 0``, the reference: old, reference and loss
    log-probs of one GRPO step are those of the unshared computation, and so is the loss's gradient."""
    trainer, _ = make_trainer(each, grpo_rows, tmp_path, dtype=torch.float64, lora=True, beta=beta,
                              per_device_train_batch_size=8, num_generations=4, num_iterations=2)
    assert any("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    outs, losses, grads = {}, {}, {}
    for shared in (True, False):
        trainer.args.shared_prefix = shared
        outs[shared] = out = rollout(trainer, grpo_rows, n_prompts=2, seed=1)
        trainer.current_gradient_accumulation_steps = 1
        trainer.model.zero_grad()
        losses[shared] = loss = trainer._compute_loss(trainer.model, out)
        loss.backward()
        grads[shared] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert torch.equal(outs[True]["completion_ids"], outs[False]["completion_ids"])
    for key in ("old_per_token_logps",) + (("ref_per_token_logps",) if beta else ()):
        assert outs[True][key] is not None, key
        torch.testing.assert_close(outs[True][key], outs[False][key], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(losses[True], losses[False], atol=1e-10, rtol=1e-10)
    assert grad_gap(grads[True], grads[False]) <= max(1e-10, 10 * order_floor(trainer, outs[False], 8))


def test_rollouts_prefill_each_prompt_once_and_sample_the_same_tokens(each, grpo_rows, tmp_path):
    trainer, _ = make_trainer(each, grpo_rows, tmp_path, per_device_train_batch_size=12, num_generations=4,
                              latent_objective="gaussian")
    outs, prefill = {}, {}
    for shared in (True, False):
        trainer.args.shared_prefix = shared
        rows = []
        hook = latent.language_model(trainer.model).register_forward_pre_hook(
            lambda m, a, kw: rows.append(kw["inputs_embeds"].shape[0]) if kw["inputs_embeds"].shape[1] > 1 else None,
            with_kwargs=True)
        try:
            with torch.no_grad():
                outs[shared] = rollout(trainer, grpo_rows, n_prompts=3, seed=2)
        finally:
            hook.remove()
        prefill[shared] = rows[0]  # the first multi-column decoder call is the rollout's prefill
    assert (prefill[True], prefill[False]) == (3, 12)
    for key in ("completion_ids", "sampling_per_token_logps", "latent_values"):
        assert torch.equal(outs[True][key], outs[False][key]), key


def test_split_attention_equals_softmax_over_the_concatenated_keys():
    """The prompt's keys stay one per group; the result and every gradient equal attention over the prompt's keys
    copied to each row and concatenated with the row's own (groups of 3, 1 and 2 rows, not adjacent; left padding in
    the prompt; grouped-query heads; a chunk of 3 queries after 2 earlier completion columns, one of them padding)."""
    from mirage_rl.prefix_attention import SharedPrefix, shared_prefix_attention

    gen = torch.Generator().manual_seed(0)
    B, G, heads, kv, P, E, q, d = 6, 3, 4, 2, 7, 5, 3, 8
    group = torch.tensor([0, 1, 0, 2, 2, 0])
    kp, vp = (torch.randn(G, kv, P, d, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    pmask = torch.ones(G, P, dtype=torch.long)
    pmask[1, :3] = 0  # group 1's prompt is shorter (left padding)
    query = torch.randn(B, heads, q, d, generator=gen, dtype=torch.float64, requires_grad=True)
    key, value = (torch.randn(B, kv, E, d, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    cmask = torch.ones(B, E, dtype=torch.long)
    cmask[3, 1] = 0  # a masked completion column (a realignment gap)

    class Layer:
        layer_idx = 0

    prefix = SharedPrefix.for_groups(1, pmask, group)
    prefix.keys[0], prefix.values[0] = kp, vp  # as the prompt's forward stores them
    earlier = prefix.mask(cmask[:, :E - q], 0)  # the completion's first chunk, its keys stored as it runs
    prefix.completion_keys[0].append(key[:, :, :E - q])
    prefix.completion_values[0].append(value[:, :, :E - q])
    assert prefix.slots.shape == (G, 3) and earlier.chunk == 0
    chunk = prefix.mask(cmask, E - q)
    out, _ = shared_prefix_attention(Layer(), query, key[:, :, E - q:], value[:, :, E - q:], chunk, scaling=0.3)
    assert prefix.keys[0] is kp and len(prefix.completion_keys[0]) == 2  # no copy of the prompt's keys
    again, _ = shared_prefix_attention(Layer(), query, key[:, :, E - q:], value[:, :, E - q:], chunk, scaling=0.3)
    assert torch.equal(again, out) and len(prefix.completion_keys[0]) == 2  # a recomputation stores nothing

    # the reference: the prompt's keys copied over the rows, one softmax over prompt + completion
    k_all = torch.cat([kp[group], key], 2).repeat_interleave(heads // kv, 1)
    v_all = torch.cat([vp[group], value], 2).repeat_interleave(heads // kv, 1)
    causal = torch.arange(E)[None, :] <= torch.arange(E - q, E)[:, None]
    allowed = torch.cat([pmask[group][:, None, :].expand(B, q, P).bool(),
                         cmask[:, None, :].bool() & causal[None]], 2)[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(query, k_all, v_all, attn_mask=allowed, scale=0.3)
    ref = ref.transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    leaves = (query, kp, vp, key, value)
    g_out = torch.autograd.grad((out * w).sum(), leaves)
    g_ref = torch.autograd.grad((ref * w).sum(), leaves)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)

    with pytest.raises(ValueError, match="PrefixAttentionMask"):
        shared_prefix_attention(Layer(), query, key, value, torch.ones(B, 1, q, E, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout"):
        shared_prefix_attention(Layer(), query, key[:, :, E - q:], value[:, :, E - q:], chunk, dropout=0.1)


def test_the_loss_forward_saves_no_copy_of_the_prompt_per_row(tiny_dir, grpo_rows, tmp_path):
    """What sharing is for, in memory: unshared, attention saves keys and values as long as the prompt for every row
    (``(B, heads, >= P, d)``); shared, no tensor saved for the backward holds the prompt's length once per row, and
    the decoder's attention implementation is back to what it was."""
    trainer, _ = make_trainer(tiny_dir, grpo_rows, tmp_path, per_device_train_batch_size=8, num_generations=4)
    out = rollout(trainer, grpo_rows, n_prompts=2)
    B, P = out["prompt_ids"].shape
    d = trainer.model.config.get_text_config().hidden_size // trainer.model.config.get_text_config().num_attention_heads
    lm = latent.language_model(trainer.model)
    implementation = lm.config._attn_implementation
    trainer.model.train()
    per_row_prompt = {}
    for shared in (False, True):
        found = []

        def pack(t):
            if t.dim() == 4 and t.shape[0] == B and t.shape[2] >= P - 1 and t.shape[3] == d:
                found.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            score(trainer, out, shared, grad=True)
        per_row_prompt[shared] = found
    assert per_row_prompt[False], "the unshared forward saves per-row prompt keys (the check would see them)"
    assert per_row_prompt[True] == []
    assert lm.config._attn_implementation == implementation
