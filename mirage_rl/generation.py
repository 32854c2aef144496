"""Latent-interleaved decoding: one batched loop with a KV cache and per-row latent mode.

A row that emits ``<|latent_start|>`` feeds, for the next k steps, its own last hidden state as the
next input (``latent_mode="hidden"``; Mirage inference, arXiv 2506.17218 section 3.3) or the fixed
``<|latent_pad|>`` embedding (``"dummy"``); then ``<|latent_end|>`` is forced. Other rows decode text
meanwhile. ``latent_mode="none"`` is plain decoding with the same loop. The GRPO rollout is this loop
with sampling, ``return_logprobs`` and, for the Gaussian latent objective, ``latent_sigma``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from . import fused_steps as fused
from . import latent
from .backbones import inject
from .limits import check_new_tokens
from .modeling import LatentTokens


@dataclass
class GenerationOutput:
    """``sequences``: ``(B, T)`` long, the generated ids (latent slots appear as ``<|latent_pad|>``, the
    rows that finished early are padded with the pad id); ``texts``: decoded completions up to the first
    end-of-sequence token, special tokens kept (the latent block shows as its three token strings)."""

    sequences: torch.Tensor
    texts: list[str]
    logprobs: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    #: with ``record_latents``: per row, the model's own latents (what ``"hidden"`` would feed) ``(S_i, H)`` float32
    #: and the inputs actually fed (after ``latent_fn``), in slot order (block by block)
    own_latents: list[torch.Tensor] | None = None
    fed_latents: list[torch.Tensor] | None = None


def _logprob(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(token) under ``softmax(logits / temperature)`` over the full vocabulary (before top-p and
    suppression): the quantity TRL's fused LM head recomputes."""
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, tokens[:, None]).squeeze(-1)


def row_generators(seeds: list[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One ``torch.Generator`` per row, seeded with ``seeds``: sampling that does not depend on a row's batch mates
    (pass the list as ``generate(..., generator=...)``)."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def _multinomial(probs: torch.Tensor, generator) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.multinomial(p[None], 1, generator=g) for p, g in zip(probs, generator)]).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _randn(shape: tuple[int, int], generator, device) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator]).to(device)
    dev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=dev).to(device)


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), -1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return _multinomial(probs, generator)


@dataclass
class LatentStep:
    """What one decoding step decided for every row (:meth:`LatentDecodeState.step`).

    ``tokens`` ``(B,)`` long: the next token of each row (``<|latent_pad|>`` in a latent slot, ``<|latent_end|>`` when
    forced, the pad id for a finished row); ``in_latent`` / ``forced`` ``(B,)`` bool: the row fills a latent slot / its
    token was forced (slot, end, finished); ``fill`` ``(B, H)`` float32 or None: what enters the slot as the next input
    (``"hidden"`` mode; rows not in a slot ignore it); ``own`` ``(B, H)`` float32 or None: the rows' own latents (the
    hidden state, before noise and ``latent_fn``); ``gaussian`` ``(B, H)`` or None: the Gaussian latent inputs (zero
    outside slots); ``logprobs`` ``(B,)`` float32 or None."""

    tokens: torch.Tensor
    in_latent: torch.Tensor
    forced: torch.Tensor
    fill: torch.Tensor | None = None
    own: torch.Tensor | None = None
    gaussian: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None


class LatentDecodeState:
    """The latent state machine of decoding, one row per request: the unit both rollout engines follow (the HF loop
    of :func:`generate` and the vLLM model runner, :mod:`mirage_rl.engines.vllm_runner`).

    Per row: ``slots_left`` (``k + 1`` right after ``<|latent_start|>``: k slots, then the forced end; 0 outside a
    block) and ``blocks`` (latent blocks opened). A step takes the logits and the hidden state ``h`` of the last
    position, samples (image / latent-pad / latent-end ids suppressed; greedy, or temperature + top-p with the row's
    generator), forces ``<|latent_pad|>`` in a slot and ``<|latent_end|>`` after the k-th, computes what enters a slot
    (``h``; ``h + sigma * eps`` for Gaussian latents, ``eps`` drawn from the row's generator at every step as the HF
    loop always did; or ``latent_fn``'s output) and the log-probs (full-vocabulary log-softmax at the temperature,
    0.0 at forced positions, the Gaussian log-density at Gaussian slots), then advances the state.

    Args:
        tokens: the checkpoint's :class:`~mirage_rl.modeling.LatentTokens`, or None for plain decoding.
        mode: ``"hidden"``, ``"dummy"`` or ``"none"``.
        slots_left / blocks: ``(B,)`` long, from :meth:`initial` (a prompt ending in ``<|latent_start|>`` starts
            inside a block).
    """

    def __init__(self, tokens: LatentTokens | None, mode: str, slots_left: torch.Tensor, blocks: torch.Tensor,
                 suppress_token_ids: list[int] | None = None, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, latent_sigma: float | None = None, latent_fn=None, return_logprobs: bool = False,
                 pad_token_id: int = 0):
        self.tokens, self.mode = tokens, mode
        self.k = tokens.latent_size if tokens is not None else 0
        self.slots_left, self.blocks = slots_left, blocks
        suppress = list(suppress_token_ids or []) + ([tokens.pad, tokens.end] if tokens is not None else [])
        self.suppress = torch.tensor(sorted(set(suppress)), dtype=torch.long, device=slots_left.device)
        self.do_sample, self.temperature, self.top_p = do_sample, temperature, top_p
        self.latent_sigma, self.latent_fn, self.return_logprobs = latent_sigma, latent_fn, return_logprobs
        self.pad_token_id = pad_token_id

    @staticmethod
    def initial(last_prompt_ids: torch.Tensor, tokens: LatentTokens | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slots_left, blocks)`` ``(B,)`` long for prompts whose last tokens are ``last_prompt_ids`` ``(B,)``."""
        slots_left = torch.zeros_like(last_prompt_ids)
        blocks = torch.zeros_like(last_prompt_ids)
        if tokens is not None:
            opened = last_prompt_ids == tokens.start
            slots_left[opened] = tokens.latent_size + 1
            blocks[opened] = 1
        return slots_left, blocks

    def step(self, logits: torch.Tensor, h: torch.Tensor, finished: torch.Tensor, generator) -> LatentStep:
        """One step for every row (see the class docstring); ``logits`` ``(B, V)``, ``h`` ``(B, H)``, ``finished``
        ``(B,)`` bool (a finished row gets the pad id), ``generator``: one ``torch.Generator``, a list with one per row,
        or None. Advances ``slots_left`` and ``blocks``."""
        lt, k = self.tokens, self.k
        masked = logits.index_fill(-1, self.suppress, float("-inf")) if len(self.suppress) else logits
        new = _pick(masked, self.do_sample, self.temperature, self.top_p, generator)
        in_latent, force_end = self.slots_left > 1, self.slots_left == 1
        if lt is not None:
            new = torch.where(in_latent, lt.pad, torch.where(force_end, lt.end, new))
        new = torch.where(finished, self.pad_token_id, new)
        forced = in_latent | force_end | finished
        step = LatentStep(new, in_latent, forced)
        if self.mode == "hidden":
            z = h.float()
            step.own = z
            if self.latent_sigma is not None:
                z = z + self.latent_sigma * _randn(tuple(z.shape), generator, z.device)
                step.gaussian = torch.where(in_latent[:, None], z, 0.0)
            fill = z
            if self.latent_fn is not None and bool(in_latent.any()):
                fill = self.latent_fn(z, (k + 1 - self.slots_left).clamp(0, k - 1),
                                      (self.blocks - 1).clamp(min=0)).float()
            step.fill = fill
        if self.return_logprobs:
            lp = torch.where(forced, 0.0, _logprob(logits, new, self.temperature))
            if self.latent_sigma is not None:
                lp = torch.where(in_latent, latent.gaussian_logprob(step.fill, h, self.latent_sigma), lp)
            step.logprobs = lp
        self.slots_left = torch.where(in_latent | force_end, self.slots_left - 1, self.slots_left)
        if lt is not None:
            opened = (new == lt.start) & ~finished
            self.slots_left = torch.where(opened, k + 1, self.slots_left)
            self.blocks = self.blocks + opened.long()
        return step


def prefill(model, batch: dict, share_prompts: bool = True):
    """Run the prompts of a left-padded batch once: ``(h, cache, next_position)``, with ``h`` ``(B, H)`` the last
    position's (post-norm) hidden state, ``cache`` the filled ``DynamicCache`` and ``next_position`` ``(B,)`` long the
    mRoPE position of the first new token. With ``share_prompts`` each distinct prompt (ids, mask, mm token types,
    images) runs once and its cache is indexed over the rows that repeat it (a GRPO group; issue 22)."""
    lm = latent.language_model(model)
    ids, am = batch["input_ids"], batch["attention_mask"]
    B = ids.shape[0]
    pos, nxt = latent.position_ids(model, ids, am, batch.get("mm_token_type_ids"), batch.get("image_grid_thw"))
    cache = DynamicCache(config=lm.config)
    groups = (latent.prompt_groups(model, ids, am, ids.shape[1], batch.get("pixel_values"),
                                   batch.get("image_grid_thw"), batch.get("mm_token_type_ids"))
              if share_prompts and B > 1 else None)
    if groups is not None:
        emb, visual = latent.embed_inputs(model, ids[groups.reps], groups.pixel_values, groups.image_grid_thw)
        h = lm(inputs_embeds=emb, position_ids=pos[:, groups.reps], attention_mask=am[groups.reps],
               past_key_values=cache, use_cache=True, **inject(visual)).last_hidden_state[:, -1]
        cache.batch_select_indices(groups.index)
        h = h[groups.index]
    else:
        emb, visual = latent.embed_inputs(model, ids, batch.get("pixel_values"), batch.get("image_grid_thw"))
        h = lm(inputs_embeds=emb, position_ids=pos, attention_mask=am, past_key_values=cache,
               use_cache=True, **inject(visual)).last_hidden_state[:, -1]
    return h, cache, nxt


@torch.no_grad()
def generate(model, processor, batch: dict, max_new_tokens: int = 64, latent_mode: str = "hidden",
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             generator: torch.Generator | list[torch.Generator] | None = None, return_logprobs: bool = False,
             latent_sigma: float | None = None, suppress_token_ids: list[int] | None = None,
             eos_token_ids: list[int] | None = None, latent_fn=None, record_latents: bool = False,
             share_prompts: bool = True, length_option: str = "max_new_tokens",
             fused_steps: str = "off") -> GenerationOutput:
    """Decode a left-padded prompt batch (``LatentCollator(with_answer=False)`` or TRL's tokenized prompts).

    Args:
        batch: ``input_ids`` (B, L), ``attention_mask`` (B, L), ``mm_token_type_ids``, ``pixel_values``,
            ``image_grid_thw``. A prompt that ends with ``<|latent_start|>`` enters latent mode at once.
        latent_mode: ``"hidden"``, ``"dummy"`` or ``"none"``.
        do_sample / temperature / top_p: greedy when ``do_sample`` is False.
        generator: the random stream of sampling and Gaussian latents: one ``torch.Generator`` for the batch, or a
            list with one per row (:func:`row_generators`), which makes each row's sample independent of the batch
            it is decoded in (GRPO uses this so that N ranks reproduce one process).
        return_logprobs: also return ``logprobs`` (B, T) float32: log p(token) at ``temperature`` for sampled
            text tokens (0.0 at forced positions: latent slots, forced ``<|latent_end|>``, padding), or, with
            ``latent_sigma``, the Gaussian log-density of each latent slot's input (up to a constant).
        latent_sigma: Gaussian latents (Monet VLPO, arXiv 2511.21395): a latent slot's input is
            ``h + latent_sigma * eps`` (``eps ~ N(0, I)``, drawn with ``generator``) instead of ``h``; the inputs
            are returned in ``latents`` (B, T, H) float32 (zero outside latent slots). Needs ``"hidden"``.
        suppress_token_ids: never sampled in text steps (e.g. image tokens). ``<|latent_pad|>`` and
            ``<|latent_end|>`` are never sampled in text steps either: they are only ever forced.
        eos_token_ids: ids that end a row besides ``<|im_end|>`` and the pad token (GRPO's ``generation_kwargs``
            ``eos_token_id``).
        latent_fn: a latent intervention (:mod:`mirage_rl.interventions`), ``"hidden"`` only: called at every step
            where some row fills a latent slot as ``latent_fn(z, slot, block)`` with ``z`` ``(B, H)`` float32 the
            rows' own latents, ``slot`` ``(B,)`` long the slot index in its block (0..k-1) and ``block`` ``(B,)`` long
            the block index in its row; returns ``(B, H)``: what enters the slots (rows not in a slot ignore it).
        record_latents: return ``own_latents`` and ``fed_latents`` (per row ``(S_i, H)`` float32).
        share_prompts: prefill each distinct prompt (ids, mask, mm token types, images) once and index its KV cache
            over the rows that repeat it (a GRPO group); the same tokens as without (tested). ``False``: one prefill
            row per row.
        length_option: the setting ``max_new_tokens`` came from, named when it cannot fit.
        fused_steps: ``latent_fused_steps`` (:func:`mirage_rl.fused_steps.decode_step`): ``"off"`` (default), or
            ``"compile"`` / ``"cudagraphs"``: every step after the prefill runs as one compiled step function.
    Raises:
        ValueError: an unknown ``latent_mode`` (:class:`mirage_rl.latent.LatentMode`); ``latent_mode`` is not
            ``"none"`` and the checkpoint has no latent tokens; ``latent_sigma`` without ``latent_mode="hidden"``; or
            prompt + ``max_new_tokens`` beyond the model's positions or the free memory
            (:func:`mirage_rl.limits.check_new_tokens`).
    """
    latent_mode = latent.parse_latent_mode(latent_mode).value
    if fused_steps not in fused.FUSED_MODES:
        raise ValueError(f"latent_fused_steps must be one of {fused.FUSED_MODES}, got {fused_steps!r}")
    if latent_sigma is not None and latent_mode != "hidden":
        raise ValueError(f"latent_sigma (Gaussian latents) needs latent_mode='hidden', got {latent_mode!r}")
    if latent_fn is not None and (latent_mode != "hidden" or latent_sigma is not None):
        raise ValueError(f"latent_fn (a latent intervention) needs latent_mode='hidden' without latent_sigma, got "
                         f"{latent_mode!r}")
    device = model.get_input_embeddings().weight.device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    tok = processor.tokenizer
    eos = torch.tensor(sorted({tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id, *(eos_token_ids or [])}),
                       device=device)
    lt = LatentTokens.from_config(model.config) if latent_mode != "none" else None
    lm, head, embed = latent.language_model(model), model.get_output_embeddings(), model.get_input_embeddings()

    ids, am = batch["input_ids"], batch["attention_mask"]
    B = ids.shape[0]
    check_new_tokens(model.config, max_new_tokens, ids.shape[1], B, option=length_option,
                     dtype_bytes=embed.weight.element_size(), device=device)
    h, cache, nxt = prefill(model, batch, share_prompts)
    slots_left, blocks = LatentDecodeState.initial(ids[:, -1], lt)
    state = LatentDecodeState(lt, latent_mode, slots_left, blocks, suppress_token_ids, do_sample, temperature, top_p,
                              latent_sigma, latent_fn, return_logprobs, tok.pad_token_id)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    out, logps, lat = [], [], []
    own: list[list[torch.Tensor]] = [[] for _ in range(B)]
    fed: list[list[torch.Tensor]] = [[] for _ in range(B)]
    for _ in range(max_new_tokens):
        step = state.step(head(h), h, finished, generator)
        new = step.tokens
        out.append(new)
        nxt_emb = embed(new)
        if step.fill is not None:
            if record_latents:
                for i in step.in_latent.nonzero().flatten().tolist():
                    own[i].append(step.own[i].cpu())
                    fed[i].append(step.fill[i].cpu())
            nxt_emb = torch.where(step.in_latent[:, None], step.fill.to(nxt_emb.dtype), nxt_emb)
        if step.gaussian is not None:
            lat.append(step.gaussian)
        if step.logprobs is not None:
            logps.append(step.logprobs)
        finished |= torch.isin(new, eos)
        if bool(finished.all()):
            break
        am = torch.cat([am, am.new_ones(B, 1)], 1)
        step_pos = nxt.view(1, B, 1).expand(3, B, 1)
        nxt = nxt + 1
        if fused_steps == "off":
            h = lm(inputs_embeds=nxt_emb[:, None], position_ids=step_pos, attention_mask=am, past_key_values=cache,
                   use_cache=True).last_hidden_state[:, -1]
        else:
            h = fused.decode_step(lm, cache, nxt_emb[:, None], step_pos, am, fused_steps)[:, -1]
    seqs = torch.stack(out, 1) if out else ids.new_zeros(B, 0)
    logprobs = (torch.stack(logps, 1) if logps else torch.zeros(B, 0, device=device)) if return_logprobs else None
    latents = torch.stack(lat, 1) if lat else None
    texts = []
    for row in seqs.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos.tolist()), len(row))
        texts.append(tok.decode(row[:cut], skip_special_tokens=False))
    H = embed.weight.shape[1]
    stack = (lambda rows: [torch.stack(r) if r else torch.zeros(0, H) for r in rows]) if record_latents else None
    return GenerationOutput(seqs, texts, logprobs, latents, stack(own) if stack else None, stack(fed) if stack else None)
