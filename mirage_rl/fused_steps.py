"""The latent fill's one-column steps (issue 31; ours): a latent block's one-column decoder calls as one step
function of fixed shapes, which may be compiled.

The recurrent fill runs a latent block as k decoder calls of one column each (each slot's input is the previous
position's output). Each call launches a whole decoder's kernels for ``B x 1`` tokens, so on a GPU stage 2 is bound
by kernel launches, not by arithmetic (``docs/GPU.md``). The key-store fill (``latent_fill: keystore``) runs each
run of one-column calls through :func:`column_step`, one function of fixed shapes: as it is (``latent_fused_steps:
off``), or compiled once by ``torch.compile`` (``compile``: Inductor fuses the element-wise work of every layer) and,
in ``cudagraphs`` mode (``mode="reduce-overhead"``), replayed as CUDA graphs, forward and backward:

* the keys and values of every column before the run are concatenated once per run and per layer, padded to a
  multiple of :data:`PAD` columns (``prior``: ``(B, kv heads, P_pad, d)``), so batches of similar length share one
  compiled graph;
* the run's own keys and values live in a buffer of its length ``m`` (``(B, kv heads, m, d)``), written functionally
  (``torch.where`` on a one-hot column), so every step of the run has the same shapes;
* each step's attention is SDPA over ``prior + buffer`` with a ``(B, 1, 1, P_pad + m)`` boolean mask.

The decoder layers run their own ``forward`` (the model's code, LoRA adapters included) with
:func:`slot_step_attention` as their attention function, without gradient checkpointing: a one-column step's
activations are ``B x 1`` per layer (plus the keys it reads), and recomputing them would double the work of the
steps (on CPU, batch 8, k = 4, it took stage 2 under checkpointing from 1.27x to 1.11x a plain step). The run's
keys join the fill's :class:`~mirage_rl.prefix_attention.KeyStore` as one chunk, so the columns after it attend to
them as to any other chunk. Values and gradients equal the unfused key-store fill (``tests/test_fused_steps.py``).

Only the per-row key store runs fused (``latent_fill`` ``keystore``, which ``latent_fused_steps`` selects); a shared
prompt (GRPO's shared scoring) runs unfused. In decoding (the HF engine: GRPO rollouts, ``eval``) every step is one
such column (:func:`decode_step`): rows open their latent blocks at different steps, so a latent step is the same call
as a text step, and with ``latent_fused_steps`` every step runs fused over the KV cache's keys.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .prefix_attention import attention_implementation

#: ``latent_fused_steps`` values: ``off`` (the step function runs as it is), ``compile`` (``torch.compile``, default
#: mode) or ``cudagraphs`` (``torch.compile(mode="reduce-overhead")``: CUDA graphs)
FUSED_MODES = ("off", "compile", "cudagraphs")

#: the registered attention implementation of the fused steps
ATTENTION_NAME = "mirage_slot_step"

#: the columns before a run are padded to a multiple of this (fewer distinct shapes to compile and capture)
PAD = 64


@dataclass
class SlotStepMask:
    """What the decoder layers pass to :func:`slot_step_attention` in a fused step.

    Attributes:
        prior_keys / prior_values: per layer, ``(B, kv heads, P_pad, d)``, the columns before the run.
        run_keys / run_values: per layer, ``(B, kv heads, m, d)``, the run's columns so far (zeros ahead).
        column: ``(1, 1, m, 1)`` bool, the step's column in the run.
        mask: ``(B, 1, 1, P_pad + m)`` bool, the keys the step's query reads.
        new_keys / new_values: per layer, the run's buffer with this step's column written (filled by the call).
    """

    prior_keys: tuple
    prior_values: tuple
    run_keys: tuple
    run_values: tuple
    column: torch.Tensor
    mask: torch.Tensor
    new_keys: list = field(default_factory=list)
    new_values: list = field(default_factory=list)


def slot_step_attention(module, query, key, value, attention_mask: SlotStepMask, dropout: float = 0.0,
                        scaling: float | None = None, **kwargs):
    """SDPA of one column over the columns before the run and the run's buffer with this column written (a
    transformers attention function; ``query`` ``(B, heads, 1, d)``, ``key`` / ``value`` ``(B, kv heads, 1, d)``).
    Returns ``((B, 1, heads, d), None)``.

    Raises:
        ValueError: a mask of another type (the function was selected outside :func:`column_step`)."""
    if not isinstance(attention_mask, SlotStepMask):
        raise ValueError(f"{ATTENTION_NAME} attention runs only inside mirage_rl.fused_steps.column_step, got a "
                         f"{type(attention_mask).__name__}")
    layer = module.layer_idx
    k = torch.where(attention_mask.column, key, attention_mask.run_keys[layer])
    v = torch.where(attention_mask.column, value, attention_mask.run_values[layer])
    attention_mask.new_keys.append(k)
    attention_mask.new_values.append(v)
    keys = torch.cat([attention_mask.prior_keys[layer], k], 2)
    values = torch.cat([attention_mask.prior_values[layer], v], 2)
    return sdpa_attention_forward(module, query, keys, values, attention_mask.mask, dropout=dropout, scaling=scaling,
                                  is_causal=False)


AttentionInterface.register(ATTENTION_NAME, slot_step_attention)


def _raw_forward(layer):
    """The layer's ``forward`` without transformers' checkpointing wrapper (transformers 5.23 wraps ``forward`` in
    ``GradientCheckpointingLayer``; 5.17 checkpoints in ``__call__``, and ``forward`` is the layer's own)."""
    forward = type(layer).forward
    return functools.partial(getattr(forward, "__wrapped__", forward), layer)


def column_step(lm, x, position_ids, column, mask, prior_keys, prior_values, run_keys, run_values):
    """One decoder step of one column for every row: the function that is compiled.

    Args:
        lm: the text decoder. x: ``(B, 1, H)`` the column's inputs. position_ids: ``(3, B, 1)`` mRoPE positions.
        column / mask / prior_* / run_*: as :class:`SlotStepMask`.
    Returns:
        ``(hidden (B, 1, H) after the final norm, run_keys, run_values)`` (the buffers with this column written).
    """
    step = SlotStepMask(prior_keys, prior_values, run_keys, run_values, column, mask)
    embeddings = lm.rotary_emb(x, position_ids)
    for layer in lm.layers:
        x = _raw_forward(layer)(x, attention_mask=step, position_embeddings=embeddings, position_ids=None,
                                past_key_values=None, use_cache=False)
    return lm.norm(x), tuple(step.new_keys), tuple(step.new_values)


@functools.cache
def compiled_step(mode: str):
    """``column_step`` as ``mode`` runs it (one compiled function per mode and process)."""
    if mode == "off":
        return column_step
    # dynamic=None: one graph per shape until a second shape is seen, then symbolic sizes (the batch and the padded
    # prior length vary between batches; https://pytorch.org/docs/stable/generated/torch.compile.html)
    if mode == "compile":
        return torch.compile(column_step, dynamic=None)
    if mode == "cudagraphs":
        return torch.compile(column_step, dynamic=None, mode="reduce-overhead")
    raise ValueError(f"latent_fused_steps must be one of {FUSED_MODES}, got {mode!r}")


def _padded(chunks: list[torch.Tensor], pad: int) -> torch.Tensor:
    """``(B, kv heads, sum q_i + pad, d)``: the chunks concatenated along the columns, ``pad`` zero columns after."""
    zeros = chunks[0].new_zeros(*chunks[0].shape[:2], pad, chunks[0].shape[-1])
    return torch.cat([*chunks, zeros], 2)


def _key_mask(real: torch.Tensor, P: int, pad: int) -> torch.Tensor:
    """``real`` ``(B, P + m)`` bool with ``pad`` False columns inserted after column ``P - 1``."""
    return torch.cat([real[:, :P], real.new_zeros(real.shape[0], pad), real[:, P:]], 1)


def decode_step(lm, cache, x: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                mode: str) -> torch.Tensor:
    """One decoding step of every row through :func:`column_step` (``latent_fused_steps`` in decoding): in decoding
    a latent step and a text step are the same one-column call (rows open their blocks at different steps), so every
    step runs fused. Reads the KV cache's keys (padded as in :func:`run_columns`) and appends the step's to it.

    Args:
        lm: the text decoder. cache: the ``DynamicCache`` of the positions so far (``P`` columns).
        x: ``(B, 1, H)`` the step's inputs. position_ids: ``(3, B, 1)``. attention_mask: ``(B, P + 1)``.
        mode: ``compile`` or ``cudagraphs`` (:data:`FUSED_MODES`).
    Returns:
        ``(B, 1, H)`` hidden states after the final norm.
    """
    B = x.shape[0]
    P = attention_mask.shape[1] - 1
    pad = -P % PAD
    layers = cache.layers
    prior_k = tuple(_padded([layer.keys], pad) for layer in layers)
    prior_v = tuple(_padded([layer.values], pad) for layer in layers)
    kv, d = prior_k[0].shape[1], prior_k[0].shape[-1]
    run = tuple(x.new_zeros(B, kv, 1, d) for _ in layers)
    column = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=x.device)
    mask = _key_mask(attention_mask.bool(), P, pad)[:, None, None]
    with attention_implementation(lm.config, ATTENTION_NAME):
        hidden, keys, values = compiled_step(mode)(lm, x, position_ids, column, mask, prior_k, prior_v, run, run)
    if mode == "cudagraphs":  # outputs of a replayed graph are overwritten by its next replay
        hidden, keys, values = hidden.clone(), [k.clone() for k in keys], [v.clone() for v in values]
    for i, (k, v) in enumerate(zip(keys, values)):
        cache.update(k, v, i)
    return hidden


def run_columns(lm, store, embeds, first_input, latent_mask, pos, attention_mask, mode: str) -> torch.Tensor:
    """Run ``m`` consecutive one-column chunks of the latent fill as fused steps, continuing ``store``.

    Args:
        lm: the text decoder. store: the fill's :class:`~mirage_rl.prefix_attention.KeyStore`, holding the columns
            before the run (``P`` columns); the run's keys and values are added to it as one chunk.
        embeds: ``(B, m, H)`` the run's input embeddings. first_input: ``(B, H)``, the hidden state of column
            ``P - 1`` (what a slot in the run's first column reads).
        latent_mask: ``(B, m)`` bool, the run's slots (a slot's input is the previous column's output, other columns
            keep their embedding). pos: ``(3, B, m)``. attention_mask: ``(B, P + m)``.
        mode: one of :data:`FUSED_MODES` (``off``: the step function uncompiled).
    Returns:
        ``(B, m, H)`` hidden states after the final norm, differentiable (also into the stored keys).
    """
    B, m, _ = embeds.shape
    P = attention_mask.shape[1] - m
    pad = -P % PAD
    prior_k = tuple(_padded(keys, pad) for keys in store.completion_keys)
    prior_v = tuple(_padded(values, pad) for values in store.completion_values)
    kv, d = prior_k[0].shape[1], prior_k[0].shape[-1]
    run_k = tuple(embeds.new_zeros(B, kv, m, d) for _ in prior_k)
    run_v = tuple(embeds.new_zeros(B, kv, m, d) for _ in prior_k)
    keys_real = _key_mask(attention_mask.bool(), P, pad)  # (B, P_pad + m)
    step = compiled_step(mode)
    outs, previous = [], first_input
    with attention_implementation(lm.config, ATTENTION_NAME):
        for j in range(m):
            x = torch.where(latent_mask[:, j, None], previous, embeds[:, j])[:, None]
            column = torch.arange(m, device=embeds.device).eq(j).view(1, 1, m, 1)
            upto = torch.cat([keys_real.new_ones(P + pad), torch.arange(m, device=embeds.device) <= j])
            mask = (keys_real & upto)[:, None, None]
            hidden, run_k, run_v = step(lm, x, pos[..., j:j + 1], column, mask, prior_k, prior_v, run_k, run_v)
            if mode == "cudagraphs":  # outputs of a replayed graph are overwritten by its next replay
                hidden, run_k, run_v = hidden.clone(), tuple(t.clone() for t in run_k), tuple(t.clone() for t in run_v)
            outs.append(hidden)
            previous = hidden[:, 0]
    store.append_chunk(list(run_k), list(run_v))
    return torch.cat(outs, 1)
