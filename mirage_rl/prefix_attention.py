"""Key stores that replace a KV cache, so that gradient checkpointing may recompute (ours): :class:`KeyStore`, the
chunks of each row (the latent fill under checkpointing, issue 31), and :class:`SharedPrefix`, also a prompt shared
by a group of rows, read once per group (issue 22).

A GRPO group holds ``G`` rollouts of one prompt. :func:`mirage_rl.latent.shared_prefix_hidden_states` runs the
prompt once per group; the rows' completions then attend to it. Expanding the prompt's keys and values over the rows
(``DynamicCache.batch_select_indices``) and concatenating them with the completion's at every chunk of the latent
fill costs a ``(B, heads, P + C, d)`` copy per chunk and layer that the attention saves for the backward: at batch 32
it was the largest remaining activation (``bench/README.md``). Here the prompt's keys and values stay
``(groups, kv heads, P, d)``; each chunk's queries are regrouped by prompt (``(groups, kv heads, rows x heads per kv
head x q, d)``, a query-sized copy) and attend to the prompt and to the row's own completion keys separately; the two
parts share one softmax normaliser (exp of the scores minus their common row maximum, summed over both parts),
so the result is the softmax attention over the concatenated keys, up to floating-point reordering.

The attention runs as a registered transformers attention function (``AttentionInterface.register``, the documented
way to add one: https://huggingface.co/docs/transformers/attention_interface), selected for the shared forwards only
(:func:`use_prefix_attention`). The decoder gets a mask object in place of its 4-D mask (the text model skips its own
mask when it is given a dict per layer type): in the prompt's forward a :class:`PromptMask` (the model's own
attention runs and each layer's keys and values are kept), in the completion's a :class:`PrefixAttentionMask`.
No KV cache object is used: :class:`SharedPrefix` keeps the prompt's and the completion's keys, and a call that
gradient checkpointing recomputes reads what the first call stored, so sharing works under (non-reentrant)
checkpointing too.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from unittest import mock

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

#: the attention implementation name registered with transformers
ATTENTION_NAME = "mirage_shared_prefix"


@dataclass
class KeyStore:
    """Per decoder layer, the keys and values of the chunks of a sequence run so far (the chunked latent fill's KV
    cache under gradient checkpointing, issue 31).

    The latent fill runs a sequence in chunks, cut at its latent slots. With a KV cache (``DynamicCache``) it cannot
    run under gradient checkpointing: a checkpointed layer gets no cache (transformers drops it), and a recomputed
    call would append its keys twice. Here the attention function keeps each chunk's keys and values itself, and a
    recomputed call reads what the first call stored and stores nothing new; the stored tensors keep their autograd
    history, so a later chunk's gradient reaches the layers of the chunk that made them (non-reentrant checkpointing
    recomputes them on demand). Every row is its own sequence: attention is SDPA over the concatenated keys
    (``transformers.integrations.sdpa_attention.sdpa_attention_forward``, whatever the model's own implementation).

    Attributes:
        completion_keys / completion_values: per decoder layer, the chunks' ``(B, kv heads, q_i, d)``, in order.
        chunks: the chunks begun so far.
    """

    completion_keys: list[list[torch.Tensor]]
    completion_values: list[list[torch.Tensor]]
    chunks: int = 0

    @classmethod
    def for_layers(cls, num_layers: int) -> "KeyStore":
        """An empty store for ``num_layers`` decoder layers."""
        return cls([[] for _ in range(num_layers)], [[] for _ in range(num_layers)])

    def mask(self, attention_mask: torch.Tensor, start: int) -> "PrefixAttentionMask":
        """The mask of the next decoder call on columns ``start..E-1`` (calls go left to right): ``attention_mask``
        ``(B, E)``, the columns ``0..E-1`` so far (keys are causal; a shared prompt, if any, is seen whole)."""
        E = attention_mask.shape[1]
        cols = torch.arange(E, device=attention_mask.device)
        causal = cols[None, :] <= torch.arange(start, E, device=attention_mask.device)[:, None]  # (q, E)
        self.chunks += 1
        return PrefixAttentionMask(self, attention_mask.bool()[:, None, :] & causal[None], self.chunks - 1)

    def keys_so_far(self, layer: int, chunk: int, key: torch.Tensor, value: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store chunk ``chunk``'s ``key`` / ``value`` of ``layer`` (first call only) and return the keys and values
        of chunks ``0..chunk``: earlier chunks as stored, this one as computed now (equal values when recomputed).

        Raises:
            RuntimeError: a chunk runs before an earlier one has (the chunks must go left to right)."""
        past_k, past_v = self.completion_keys[layer], self.completion_values[layer]
        if len(past_k) == chunk:
            past_k.append(key)
            past_v.append(value)
        elif len(past_k) < chunk:
            raise RuntimeError(f"chunk {chunk} of layer {layer} runs before chunk {len(past_k)}")
        if not chunk:
            return key, value
        return torch.cat([*past_k[:chunk], key], 2), torch.cat([*past_v[:chunk], value], 2)

    def append_chunk(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Add the next chunk's keys and values of every layer, computed outside the decoder's layers (the fused slot
        steps, :mod:`mirage_rl.fused_steps`)."""
        for layer, (key, value) in enumerate(zip(keys, values)):
            if len(self.completion_keys[layer]) != self.chunks:
                raise RuntimeError(f"layer {layer} holds {len(self.completion_keys[layer])} chunks, not {self.chunks}")
            self.completion_keys[layer].append(key)
            self.completion_values[layer].append(value)
        self.chunks += 1


@dataclass
class SharedPrefix(KeyStore):
    """The prompt's keys and values, once per group, which rows read them, and the completion's keys so far.

    Filled as the decoder runs (no KV cache object, so gradient checkpointing may recompute any layer call: a
    recomputed call reads what the first call stored and stores nothing new).

    Attributes:
        keys / values: per decoder layer, ``(G, kv heads, P, d)``, stored by the prompt's forward (differentiable).
        key_mask: ``(G, P)`` bool, the prompt's real (not padding) columns.
        slots: ``(G, n)`` long, the rows of each group, padded with the group's first row (``n`` = the largest group).
        slot_of_row: ``(B,)`` long, each row's index in ``slots.flatten()``.
        completion_keys / completion_values: per decoder layer, the completion's ``(B, kv heads, q_i, d)`` chunk by
            chunk (the latent fill runs the completion in chunks; :class:`KeyStore`).
        chunks: the completion chunks begun so far.
        wide: per decoder layer, ``keys`` and ``values`` in float32 when they are half precision (made once, read
            by every chunk).
    """

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    key_mask: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    slot_of_row: torch.Tensor | None = None
    wide: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def for_groups(cls, num_layers: int, key_mask: torch.Tensor, group_of_row: torch.Tensor) -> "SharedPrefix":
        """An empty store for ``num_layers`` decoder layers; ``key_mask`` ``(G, P)``, the groups' prompt mask;
        ``group_of_row`` ``(B,)`` long, each row's group (``0..G-1``)."""
        groups = int(group_of_row.max()) + 1
        members = [(group_of_row == g).nonzero().flatten() for g in range(groups)]
        n = max(len(m) for m in members)
        slots = torch.stack([torch.cat([m, m[:1].expand(n - len(m))]) for m in members])
        slot_of_row = torch.empty_like(group_of_row)
        for g, m in enumerate(members):
            slot_of_row[m] = g * n + torch.arange(len(m), device=m.device)
        return cls([[] for _ in range(num_layers)], [[] for _ in range(num_layers)], keys=[None] * num_layers,
                   values=[None] * num_layers, key_mask=key_mask.bool(), slots=slots, slot_of_row=slot_of_row)

    def prompt_mask(self, mask, implementation) -> "PromptMask":
        """The mask of the prompt's decoder call: ``mask`` as ``transformers.masking_utils.create_causal_mask`` built
        it for the model's own attention ``implementation`` (the function), which computes the prompt's attention."""
        return PromptMask(self, mask, implementation)


@dataclass
class PromptMask:
    """What the decoder layers pass as their attention mask in the prompt's forward: the model's own mask and
    attention function, and the store the layers' keys and values go to."""

    prefix: SharedPrefix
    mask: torch.Tensor | None
    implementation: object


@dataclass
class PrefixAttentionMask:
    """What the decoder layers pass to :func:`shared_prefix_attention` as their attention mask in a chunk: the store
    (a :class:`SharedPrefix`, or a :class:`KeyStore` without a shared prompt), ``completion`` ``(B, q, E)`` bool
    (which of the store's keys each query may read) and the chunk's index."""

    prefix: KeyStore
    completion: torch.Tensor
    chunk: int


def _regroup(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows ``(B, kv, r, ...)`` -> groups ``(G, kv, n * r, ...)`` (a copy), ``r`` rows of each kv head per row."""
    G, n = slots.shape
    y = x[slots.flatten()]
    y = y.view(G, n, *y.shape[1:]).transpose(1, 2)
    return y.reshape(G, y.shape[1], n * y.shape[3], *y.shape[4:])


def _ungroup(x: torch.Tensor, prefix: SharedPrefix, r: int) -> torch.Tensor:
    """Groups ``(G, kv, n * r, ...)`` -> rows ``(B, kv, r, ...)``."""
    G, n = prefix.slots.shape
    y = x.view(G, x.shape[1], n, r, *x.shape[3:]).transpose(1, 2)
    return y.reshape(G * n, x.shape[1], r, *x.shape[3:])[prefix.slot_of_row]


def shared_prefix_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: PrefixAttentionMask | PromptMask, dropout: float = 0.0,
                            scaling: float | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """Softmax attention of a completion chunk over its group's prompt and its own completion so far (a transformers
    attention function; see the module docstring). Safe under gradient checkpointing: a recomputed call reads the
    keys stored by the first one.

    Args:
        module: the attention layer (``layer_idx``).
        query: ``(B, heads, q, d)``. key / value: ``(B, kv heads, q, d)``, this chunk's (earlier chunks' come from the
            store). attention_mask: a :class:`PrefixAttentionMask`, or a :class:`PromptMask` in the prompt's forward
            (``(G, ...)`` inputs; the model's own attention runs and the keys and values are stored).
            scaling: the score scale (``d ** -0.5``).
    Returns:
        ``((B, q, heads, d), None)``, as transformers' ``sdpa_attention_forward``. For half-precision inputs the
        products, the softmax and its sums run in float32 (the prompt's keys and values are widened once per layer),
        else in the input's dtype.
    Raises:
        ValueError: ``dropout > 0`` (not supported) or a mask of another type (the function was selected outside
            :func:`mirage_rl.latent.shared_prefix_hidden_states`).
        RuntimeError: a completion chunk runs before an earlier one has (the chunks must go left to right).
    """
    attention_mask = kwargs.pop(MASK_ARGUMENT, attention_mask)
    layer = module.layer_idx
    if isinstance(attention_mask, PromptMask):  # the prompt: the model's own attention; keep its keys and values
        prefix = attention_mask.prefix
        if prefix.keys[layer] is None:  # (a recomputation under gradient checkpointing stores nothing)
            prefix.keys[layer], prefix.values[layer] = key, value
        return attention_mask.implementation(module, query, key, value, attention_mask.mask, dropout=dropout,
                                             scaling=scaling, **kwargs)
    if not isinstance(attention_mask, PrefixAttentionMask):
        raise ValueError(f"{ATTENTION_NAME} attention needs a PrefixAttentionMask, got {type(attention_mask).__name__}:"
                         " it runs only inside mirage_rl.latent.shared_prefix_hidden_states")
    if dropout:
        raise ValueError(f"{ATTENTION_NAME} attention does not support attention dropout ({dropout}): set the model's "
                         "attention_dropout to 0 or shared_prefix: false")
    prefix, i = attention_mask.prefix, attention_mask.chunk
    key, value = prefix.keys_so_far(layer, i, key, value)
    if not isinstance(prefix, SharedPrefix):  # every row its own sequence: SDPA over the concatenated keys
        return sdpa_attention_forward(module, query, key, value, attention_mask.completion[:, None], scaling=scaling,
                                      is_causal=False)
    kp, vp = prefix.keys[layer], prefix.values[layer]
    B, heads, q, d = query.shape
    kv = key.shape[1]
    r = heads // kv * q  # query rows per kv head and row
    scale = d ** -0.5 if scaling is None else scaling
    acc = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    if kp.dtype != acc:  # half precision: products and sums in float32 (as SDPA accumulates), the prompt's once
        if layer not in prefix.wide:
            prefix.wide[layer] = (kp.to(acc), vp.to(acc))
        kp, vp = prefix.wide[layer]
    qs = (query.to(acc) * scale).reshape(B, kv, r, d)
    key, value = key.to(acc), value.to(acc)
    sp = _regroup(qs, prefix.slots) @ kp.transpose(-1, -2)  # (G, kv, n*r, P)
    sp = sp.masked_fill(~prefix.key_mask[:, None, None, :], float("-inf"))
    sc = qs @ key.transpose(-1, -2)  # (B, kv, r, E)
    cmask = attention_mask.completion[:, None, None].expand(B, kv, heads // kv, q, -1).reshape(B, kv, r, -1)
    sc = sc.masked_fill(~cmask, float("-inf"))
    with torch.no_grad():  # the common maximum only keeps exp in range: the result does not depend on it
        m = torch.maximum(_ungroup(sp.amax(-1), prefix, r), sc.amax(-1))  # (B, kv, r)
    ep = torch.exp(sp - _regroup(m, prefix.slots)[..., None])  # (G, kv, n*r, P)
    ec = torch.exp(sc - m[..., None])  # (B, kv, r, E)
    num = _ungroup(ep @ vp, prefix, r) + ec @ value  # (B, kv, r, d)
    den = _ungroup(ep.sum(-1), prefix, r) + ec.sum(-1)  # (B, kv, r)
    out = (num / den[..., None]).to(query.dtype)
    return out.view(B, heads, q, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)

#: the keyword through which a decoder call hands its :class:`PrefixAttentionMask` / :class:`PromptMask` to
#: :func:`shared_prefix_attention`: every family's text model passes extra keywords down to its attention function,
#: while only some take a prepared mask as ``attention_mask`` (Qwen3-VL's always rebuilds it, and an unregistered
#: mask type becomes None there)
MASK_ARGUMENT = "mirage_attention_mask"


def decoder_mask(mask: "PrefixAttentionMask | PromptMask") -> dict:
    """The keyword arguments of a decoder call that runs :func:`shared_prefix_attention` with ``mask`` (any family)."""
    return {"attention_mask": None, MASK_ARGUMENT: mask}


@contextlib.contextmanager
def attention_implementation(config, name: str):
    """Within the block the model of ``config`` uses the registered attention function ``name`` (the shared-prefix
    and key-store attention here, the fused steps' in :mod:`mirage_rl.fused_steps`); the previous one is restored on
    exit, also on errors. (``_attn_implementation`` is a property of the config: ``unittest.mock.patch.object``
    would delete it on exit.)"""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


@contextlib.contextmanager
def use_prefix_attention(lm):
    """Within the block, the decoder layers of the text model ``lm`` use :func:`shared_prefix_attention`; the
    previous implementation is restored on exit, also on errors. Under gradient checkpointing each layer's
    recomputation in the backward (after the block) runs under the same switch, through the non-reentrant
    checkpoint's ``context_fn`` (https://pytorch.org/docs/stable/checkpoint.html); without checkpointing the
    backward looks nothing up. (Reentrant checkpointing, or one with a ``context_fn`` of its own, is left as it is:
    :func:`unsupported` refuses it where a backward follows.)"""
    config = lm.config
    with contextlib.ExitStack() as stack:
        if lm.training:
            for layer in lm.layers:
                fn = getattr(layer, "_gradient_checkpointing_func", None)
                if (getattr(layer, "gradient_checkpointing", False) and isinstance(fn, functools.partial)
                        and fn.keywords.get("use_reentrant") is False and "context_fn" not in fn.keywords):
                    stack.enter_context(mock.patch.object(layer, "_gradient_checkpointing_func", functools.partial(
                        fn, context_fn=lambda: (contextlib.nullcontext(),
                                                attention_implementation(config, ATTENTION_NAME)))))
        stack.enter_context(attention_implementation(config, ATTENTION_NAME))
        yield


@contextlib.contextmanager
def unchecked(lm):
    """Within the block the decoder layers of ``lm`` run without gradient checkpointing: for a chunk of one column,
    whose activations are one column per layer, a recomputation would cost more than keeping them (issue 31)."""
    with contextlib.ExitStack() as stack:
        for layer in lm.layers:
            stack.enter_context(mock.patch.object(layer, "gradient_checkpointing", False))
        yield


def unsupported(lm, backward: bool = True) -> str | None:
    """Why the text decoder ``lm`` cannot keep its keys in a store (share prompts, or run the key-store latent fill)
    now, or ``None`` when it can; ``backward``: gradients will flow (without them checkpointing plays no part).

    Sliding-window layers are not supported. Under gradient checkpointing the checkpoint must be non-reentrant
    (``gradient_checkpointing_kwargs: {"use_reentrant": false}``, transformers' default since 5.0): the prompt's keys
    leave each checkpointed layer through :class:`SharedPrefix`, not through its outputs, and the reentrant checkpoint
    sends no gradient along that way (TRL forces it with PEFT under ZeRO-3); and without a ``context_fn`` of its own
    (:func:`use_prefix_attention` sets one)."""
    if any(t != "full_attention" for t in getattr(lm.config, "layer_types", None) or ()):
        return "the decoder has sliding-window layers"
    if lm.training and backward:
        for layer in lm.layers:
            fn = getattr(layer, "_gradient_checkpointing_func", None)
            if not getattr(layer, "gradient_checkpointing", False):
                continue
            if not (isinstance(fn, functools.partial) and fn.keywords.get("use_reentrant") is False):
                return "gradient checkpointing is reentrant (use_reentrant is not false)"
            if "context_fn" in fn.keywords:
                return "gradient_checkpointing_kwargs has a context_fn of its own"
    return None
