"""The key-store fill's one-column steps compiled (``latent_fused_steps``, issue 31): values and gradients equal the
uncompiled step function's (fp32, within 1e-5) under gradient checkpointing, as stage 2 trains."""

import functools

import pytest
import torch

from mirage_rl import latent
from conftest import scramble
from test_fill_checkpointing import _gap, _run, _set_checkpointing
from test_grpo import grpo_rows  # noqa: F401  (a fixture)
from test_latent import _batch, _mixed_rows, _stagger


@functools.cache
def compiler_problem() -> str | None:
    """Why ``torch.compile`` cannot build CPU code here (Inductor needs a C++ compiler), or ``None``."""
    try:
        torch.compile(lambda x: torch.sin(x) * 2, dynamic=False)(torch.ones(3))
    except Exception as e:  # noqa: BLE001 - any failure of the backend means: no compiler
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def test_compiled_steps_equal_the_uncompiled_ones(tiny, small_rows):
    if (why := compiler_problem()) is not None:
        pytest.skip(f"torch.compile has no working CPU backend here ({why})")
    model, processor = tiny
    scramble(model, seed=7, std=0.1)
    model.train()
    b, emb, pos = _stagger(*_batch(model, processor, _mixed_rows(small_rows)), shifts=[0, 3, 6, 1])
    _set_checkpointing(model, "non-reentrant")
    lm = latent.language_model(model)
    assert latent.resolve_fill(lm, "auto", "compile")[0] == "keystore"
    from torch._dynamo.utils import counters

    counters.clear()
    out = {}
    for mode in ("off", "compile"):
        out[mode] = _run(model, emb, pos, b, "keystore", fused=mode)
    (h0, g0), (h1, g1) = out["off"], out["compile"]
    real = b["attention_mask"].bool()
    assert (h0 - h1).abs()[real].max() <= 1e-5 * max(1.0, h0.abs().max().item())
    assert _gap(g1, g0) <= 1e-5
    # the compiled function ran: Dynamo compiled frames (not an eager fallback)
    assert counters["stats"]["unique_graphs"] >= 1


def test_the_step_function_equals_the_decoder_calls(tiny, small_rows):
    """fp64: the key-store fill through the step function equals the cached fill (decoder calls with a KV cache)
    without checkpointing, values and gradients (both exact in fp64 on CPU)."""
    model, processor = tiny
    scramble(model, seed=8, std=0.1)
    model.double().train()
    b, emb, pos = _stagger(*_batch(model, processor, _mixed_rows(small_rows)), shifts=[2, 0, 5, 1])
    _set_checkpointing(model, None)
    h0, g0 = _run(model, emb, pos, b, "cached")
    h1, g1 = _run(model, emb, pos, b, "keystore")
    assert (h0 - h1).abs()[b["attention_mask"].bool()].max() < 1e-10
    assert _gap(g1, g0) <= 1e-10


def test_fused_steps_are_checked(tiny):
    model, _ = tiny
    lm = latent.language_model(model)
    with pytest.raises(ValueError, match="latent_fused_steps must be one of"):
        latent.resolve_fill(lm, "auto", "graphs")
    with pytest.raises(ValueError, match="latent_fill: multipass has none"):
        latent.resolve_fill(lm, "multipass", "compile")
    from mirage_rl.trainers import MirageSFTConfig

    with pytest.raises(ValueError, match="runs on the key store: set latent_fill to auto or keystore"):
        MirageSFTConfig(output_dir="/tmp/x", latent_fill="cached", latent_fused_steps="compile", use_cpu=True,
                        report_to="none")


@pytest.mark.parametrize("compiled", [False, True])
def test_decoding_steps_through_the_step_function(tiny, small_rows, compiled):
    """Decoding with ``latent_fused_steps`` (every step after the prefill through the step function, compiled or
    not): the same greedy tokens as the decoder calls with a KV cache, log-probs and fed latents within 1e-5 (fp32)."""
    from unittest import mock

    from mirage_rl import fused_steps
    from mirage_rl.collator import LatentCollator
    from mirage_rl.generation import generate
    from mirage_rl.modeling import LatentTokens

    if compiled and (why := compiler_problem()) is not None:
        pytest.skip(f"torch.compile has no working CPU backend here ({why})")
    model, processor = tiny
    scramble(model, seed=5, std=0.25)
    model.eval()
    lt = LatentTokens.from_config(model.config)
    with torch.no_grad():  # make <|latent_start|> likely, as tests/test_grpo.py does, so that blocks open
        model.lm_head.weight[lt.start] *= 8.0
    batch = LatentCollator(processor, lt, "hidden", with_answer=False)([small_rows[i] for i in range(4)])
    kw = dict(max_new_tokens=24, latent_mode="hidden", return_logprobs=True, record_latents=True,
              do_sample=True, generator=[torch.Generator().manual_seed(i) for i in range(4)])
    ref = generate(model, processor, batch, **kw)
    kw["generator"] = [torch.Generator().manual_seed(i) for i in range(4)]
    if compiled:
        got = generate(model, processor, batch, fused_steps="compile", **kw)
    else:
        with mock.patch.object(fused_steps, "compiled_step", lambda mode: fused_steps.column_step):
            got = generate(model, processor, batch, fused_steps="compile", **kw)
    assert int(ref.sequences.eq(lt.start).sum()) >= 2  # latent blocks were opened (and rows are not in step)
    assert torch.equal(ref.sequences, got.sequences)
    torch.testing.assert_close(got.logprobs, ref.logprobs, atol=1e-5, rtol=1e-5)
    for a, b in zip(ref.fed_latents, got.fed_latents):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="latent_fused_steps must be one of"):
        generate(model, processor, batch, max_new_tokens=2, fused_steps="graphs")


def test_grpo_passes_the_setting_to_its_rollouts_and_its_scoring(tiny_dir, grpo_rows, tmp_path):
    """``latent_fused_steps`` in a GRPO config reaches the HF engine's decoding and the unshared log-prob forwards
    (the step function counted, uncompiled here: the compiled one is tested above)."""
    from unittest import mock

    from mirage_rl import fused_steps
    from test_grpo import make_trainer, rollout
    from test_shared_prefix import score

    trainer, _ = make_trainer(tiny_dir, grpo_rows, tmp_path, latent_fused_steps="compile", shared_prefix=False)
    modes = []

    def step(mode):
        modes.append((mode, torch.is_grad_enabled()))
        return fused_steps.column_step

    with mock.patch.object(fused_steps, "compiled_step", step):
        out = rollout(trainer, grpo_rows, n_prompts=2)
        assert modes and all(m == ("compile", False) for m in modes)  # every decoding step
        modes.clear()
        score(trainer, out, False, grad=True)
    assert int(out["completion_ids"].eq(trainer.latent_tokens.start).sum()) > 0
    assert ("compile", True) in modes  # the scoring's one-column latent steps
