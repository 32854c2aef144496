"""The latent fill under gradient checkpointing (issue 31): every method gives the values and gradients of the
cached fill without checkpointing; ``auto`` picks the chunked fill with a key store there, and says so.

Tolerances (as ``tests/test_shared_prefix.py``): fp64 values within 1e-10 of the cached fill; gradients within
``max(1e-10, 10 x floor)`` of a parameter's largest entry, ``floor`` being how far the reference gradient moves when
only the order of the batch's rows changes. The reference of a method's gradient is the same computation without
checkpointing: the key store's is the cached fill (they agree bit for bit in fp64), the multi-pass fill's is itself
(it sums the prompt's gradient over k + 1 passes, another order: it differs from the cached fill by ~4e-8 of a
parameter's largest entry in fp64, ``tests/test_latent.py``)."""

import logging

import pytest
import torch

from mirage_rl import latent
from conftest import per_backbone_tiny_dir, scramble
from test_grpo import grpo_rows, make_trainer, rollout  # noqa: F401  (grpo_rows: a fixture)
from test_latent import _batch, _mixed_rows, _stagger
from test_shared_prefix import assert_same, order_floor, score

tiny_dir = per_backbone_tiny_dir  # every test here runs on each backbone


def _set_checkpointing(model, mode: str | None):
    """``None``: off; ``"non-reentrant"`` (transformers' default) or ``"reentrant"`` (TRL's with PEFT under ZeRO-3)."""
    if mode is None:
        model.gradient_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})


def _run(model, emb, pos, b, method, rows=None, fused="off"):
    """Hidden states and every parameter's gradient of a fixed weighting of them (rows ``rows`` only, in order)."""
    am, mask, visual = b["attention_mask"], b["latent_mask"], b["visual"]
    if rows is not None:
        emb, pos, am, mask = emb[rows], pos[:, rows], am[rows], mask[rows]
        visual = visual.rows(torch.as_tensor(rows)) if visual is not None else None
    model.zero_grad()
    # inputs that need a gradient, as token embeddings do (reentrant checkpointing sends none to a layer whose inputs
    # need none)
    h = latent.latent_fill(model, emb.detach().requires_grad_(True), pos, am, mask, method, fused, visual)
    w = torch.linspace(-1, 1, h.shape[-1], dtype=h.dtype)
    (h * w * am[..., None]).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return h.detach(), grads


def _gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp(min=1e-30)).item() for n in a)


_REFERENCES: dict[str, tuple] = {}  # per backbone: the inputs and the references without checkpointing (read-only)


@pytest.fixture
def setup(tiny, tiny_dir, small_rows):
    """fp64 tiny model in training mode (fresh, seeded: the same weights in every test); rows with one block, two
    blocks and none, staggered (rollout-like); the references, computed once per backbone."""
    model, processor = tiny
    scramble(model, seed=5, std=0.1)
    model.double().train()
    _set_checkpointing(model, None)
    if str(tiny_dir) not in _REFERENCES:
        b, emb, pos = _stagger(*_batch(model, processor, _mixed_rows(small_rows)), shifts=[0, 3, 6, 1])
        ref = {m: _run(model, emb, pos, b, m) for m in ("cached", "multipass")}
        ref["keystore"] = ref["cached"]
        n = emb.shape[0]
        floor = _gap(_run(model, emb, pos, b, "cached", rows=list(reversed(range(n))))[1], ref["cached"][1])
        assert floor < 1e-12
        _REFERENCES[str(tiny_dir)] = (emb, pos, b, ref, max(1e-10, 10 * floor))
    return (model, *_REFERENCES[str(tiny_dir)])


@pytest.mark.parametrize("mode,method,runs", [
    ("non-reentrant", "auto", "keystore"), ("non-reentrant", "keystore", "keystore"),
    ("non-reentrant", "multipass", "multipass"), ("reentrant", "auto", "multipass"),
    ("reentrant", "multipass", "multipass"), (None, "keystore", "keystore"), (None, "multipass", "multipass")])
def test_every_fill_equals_the_cached_fill_without_checkpointing(setup, mode, method, runs):
    model, emb, pos, b, ref, tol = setup
    _set_checkpointing(model, mode)
    lm = latent.language_model(model)
    assert latent.resolve_fill(lm, method)[0] == runs
    h, g = _run(model, emb, pos, b, method)
    real = b["attention_mask"].bool()
    h_ref = ref["cached"][0]
    assert (h - h_ref).abs()[real].max() < 1e-10
    assert _gap(g, ref[runs][1]) <= tol
    assert _gap(g, ref["cached"][1]) <= 1e-6  # across methods: the multi-pass order (docstring)
    # the latents matter here: a fill whose slots read nothing (a dropped cache) differs by far more
    with torch.no_grad():
        plain = latent._lm_forward(lm, emb, pos, b["attention_mask"], visual=b["visual"])
    assert (plain - h_ref).abs()[real].max() > 1e-3


def test_keystore_recomputes_the_long_chunks_once_and_runs_k_steps_per_block(setup):
    """Under checkpointing the key store's long chunks (the prompt, the text between and after the blocks) are
    recomputed once in the backward, reading what their first run stored; a block's one-column steps are not
    checkpointed (their activations are one column) and run once each."""
    from unittest import mock

    from mirage_rl import fused_steps
    from mirage_rl.prefix_attention import KeyStore

    model, emb, pos, b, *_ = setup
    _set_checkpointing(model, "non-reentrant")
    calls, steps = [], []
    keys_so_far, column_step = KeyStore.keys_so_far, fused_steps.column_step

    def counted(self, layer, chunk, key, value):
        if layer == 0:
            calls.append((chunk, len(self.completion_keys[0]) > chunk))  # (chunk, a recomputation)
        return keys_so_far(self, layer, chunk, key, value)

    def step(*args):
        steps.append(1)
        return column_step(*args)

    with mock.patch.object(KeyStore, "keys_so_far", counted), mock.patch.object(fused_steps, "column_step", step):
        fused_steps.compiled_step.cache_clear()
        try:
            _run(model, emb, pos, b, "keystore")
        finally:
            fused_steps.compiled_step.cache_clear()
    first = [c for c, again in calls if not again]
    again = sorted(c for c, again in calls if again)
    k = model.config.latent_size
    # two blocks per row at most, realigned: chunks 0 (prompt), 2 (between), 4 (the rest) run as decoder calls,
    # chunks 1 and 3 are the blocks' first k - 1 slots as one-column steps (the last slot starts the next chunk)
    assert first == [0, 2, 4] and again == first
    assert len(steps) == 2 * (k - 1)


def test_auto_logs_its_pick_and_refuses_what_cannot_run(setup, caplog):
    model, emb, pos, b, *_ = setup
    lm = latent.language_model(model)
    _set_checkpointing(model, "non-reentrant")
    latent._fills_logged.clear()
    with caplog.at_level(logging.INFO, logger="mirage_rl.latent"):
        _run(model, emb, pos, b, "auto")
    assert "latent_fill auto: keystore (gradient checkpointing" in caplog.text
    with pytest.raises(ValueError, match="cached cannot run under gradient checkpointing"):
        latent.latent_fill(model, emb, pos, b["attention_mask"], b["latent_mask"], "cached")
    _set_checkpointing(model, "reentrant")
    with pytest.raises(ValueError, match="keystore cannot run here: gradient checkpointing is reentrant"):
        latent.latent_fill(model, emb, pos, b["attention_mask"], b["latent_mask"], "keystore")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mirage_rl.latent"):
        _run(model, emb, pos, b, "auto")
    assert "latent_fill auto: multipass (gradient checkpointing where the key store cannot run (gradient " \
           "checkpointing is reentrant" in caplog.text
    with torch.no_grad():  # no backward: the key store runs under reentrant checkpointing too
        assert latent.resolve_fill(lm, "auto")[0] == "keystore"
        h = latent.latent_fill(model, emb, pos, b["attention_mask"], b["latent_mask"], "auto")
    _set_checkpointing(model, None)
    model.eval()
    assert latent.resolve_fill(lm, "auto") == ("cached", "no gradient checkpointing: a KV cache")
    with torch.no_grad():
        ref = latent.latent_fill(model, emb, pos, b["attention_mask"], b["latent_mask"], "cached")
    assert (h - ref).abs()[b["attention_mask"].bool()].max() < 1e-10
    with pytest.raises(ValueError, match="latent fill method must be one of"):
        latent.latent_fill(model, emb, pos, b["attention_mask"], b["latent_mask"], "chunked")


def test_lora_under_checkpointing(tiny, small_rows):
    """LoRA adapters on the decoder (as ``use_peft: true``): the key store's adapter gradients equal the cached
    fill's without checkpointing."""
    from peft import LoraConfig, get_peft_model

    model, processor = tiny
    scramble(model, seed=6, std=0.1)
    model.double()
    b, emb, pos = _batch(model, processor, _mixed_rows(small_rows))
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                               "o_proj", "up_proj"]))
    for n, p in peft.named_parameters():  # non-zero B, so the adapters change the forward
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(0, 0.05)
    peft.train()
    emb = emb.detach()
    out = {}
    for mode in (None, "non-reentrant"):
        _set_checkpointing(peft, mode)
        if mode:  # as Trainer does for PEFT models under checkpointing
            peft.enable_input_require_grads()
        out[mode] = _run(peft, emb, pos, b, "auto")
        assert latent.resolve_fill(latent.language_model(peft), "auto")[0] == ("keystore" if mode else "cached")
    (h0, g0), (h1, g1) = out[None], out["non-reentrant"]
    assert all("lora_" in n for n in g0) and g0
    assert (h0 - h1).abs()[b["attention_mask"].bool()].max() < 1e-10
    assert _gap(g1, g0) <= 1e-8


def test_grpo_unshared_scoring_under_checkpointing(tiny_dir, grpo_rows, tmp_path):
    """GRPO's log-prob forward with ``shared_prefix: false`` under checkpointing runs the key store (it ran the
    multi-pass fill before issue 31): its log-probs and gradients equal the multi-pass fill's."""
    trainer, _ = make_trainer(tiny_dir, grpo_rows, tmp_path, dtype=torch.float64, gradient_checkpointing=True,
                              per_device_train_batch_size=8, num_generations=4)
    out = rollout(trainer, grpo_rows, n_prompts=2)
    trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)
    trainer.model.train()
    assert int(out["completion_ids"].eq(trainer.latent_tokens.start).sum()) > 0  # rollouts opened latent blocks
    lm = latent.language_model(trainer.model)
    assert latent.resolve_fill(lm, "auto")[0] == "keystore"
    trainer.args.latent_fill = "multipass"
    multipass = score(trainer, out, False, grad=True)
    trainer.args.latent_fill = "auto"
    keystore = score(trainer, out, False, grad=True)
    assert_same(keystore, multipass, 1e-10, order_floor(trainer, out, 8))
    assert keystore[2] < multipass[2] / 2  # decoder tokens run: k + 1 passes against one


def test_configs_refuse_a_fill_that_cannot_run_with_their_checkpointing():
    """At start-up, not at the first step: ``cached`` with gradient checkpointing, ``keystore`` with reentrant
    checkpointing (what :func:`mirage_rl.latent.resolve_fill` would refuse)."""
    from mirage_rl.trainers import MirageGRPOConfig, MirageSFTConfig

    common = dict(output_dir="/tmp/unused", use_cpu=True, report_to="none", gradient_checkpointing=True)
    for config in (MirageSFTConfig, MirageGRPOConfig):
        with pytest.raises(ValueError, match="latent_fill: cached cannot run with gradient_checkpointing: true"):
            config(latent_fill="cached", **common)
        with pytest.raises(ValueError, match="latent_fill: keystore cannot run under reentrant gradient checkpoint"):
            config(latent_fill="keystore", gradient_checkpointing_kwargs={"use_reentrant": True}, **common)
        assert config(latent_fill="keystore", **common).latent_fill == "keystore"  # non-reentrant: transformers' default
        assert config(latent_fill="cached", **{**common, "gradient_checkpointing": False}).latent_fill == "cached"
