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

from . import latent
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


@torch.no_grad()
def generate(model, processor, batch: dict, max_new_tokens: int = 64, latent_mode: str = "hidden",
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             generator: torch.Generator | list[torch.Generator] | None = None, return_logprobs: bool = False,
             latent_sigma: float | None = None, suppress_token_ids: list[int] | None = None,
             eos_token_ids: list[int] | None = None, latent_fn=None, record_latents: bool = False,
             share_prompts: bool = True, length_option: str = "max_new_tokens") -> GenerationOutput:
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
    Raises:
        ValueError: an unknown ``latent_mode`` (:class:`mirage_rl.latent.LatentMode`); ``latent_mode`` is not
            ``"none"`` and the checkpoint has no latent tokens; ``latent_sigma`` without ``latent_mode="hidden"``; or
            prompt + ``max_new_tokens`` beyond the model's positions or the free memory
            (:func:`mirage_rl.limits.check_new_tokens`).
    """
    latent_mode = latent.parse_latent_mode(latent_mode).value
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
    k = lt.latent_size if lt else 0
    lm, head, embed = latent.language_model(model), model.get_output_embeddings(), model.get_input_embeddings()

    ids, am = batch["input_ids"], batch["attention_mask"]
    B = ids.shape[0]
    check_new_tokens(model.config, max_new_tokens, ids.shape[1], B, option=length_option,
                     dtype_bytes=embed.weight.element_size(), device=device)
    pos, nxt = latent.position_ids(model, ids, am, batch.get("mm_token_type_ids"), batch.get("image_grid_thw"))
    cache = DynamicCache(config=lm.config)
    # the prefill runs once per distinct prompt (ids, mask, mm token types, images): a GRPO group repeats its prompt
    # num_generations times; the cache and the last hidden state are then indexed over the rows (issue 22)
    groups = (latent.prompt_groups(model, ids, am, ids.shape[1], batch.get("pixel_values"),
                                   batch.get("image_grid_thw"), batch.get("mm_token_type_ids"))
              if share_prompts and B > 1 else None)
    if groups is not None:
        emb = latent.embed_inputs(model, ids[groups.reps], groups.pixel_values, groups.image_grid_thw)
        h = lm(inputs_embeds=emb, position_ids=pos[:, groups.reps], attention_mask=am[groups.reps],
               past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
        cache.batch_select_indices(groups.index)
        h = h[groups.index]
    else:
        emb = latent.embed_inputs(model, ids, batch.get("pixel_values"), batch.get("image_grid_thw"))
        h = lm(inputs_embeds=emb, position_ids=pos, attention_mask=am, past_key_values=cache,
               use_cache=True).last_hidden_state[:, -1]
    slots_left = torch.zeros(B, dtype=torch.long, device=device)
    if lt is not None:
        slots_left[ids[:, -1] == lt.start] = k + 1
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    suppress = list(suppress_token_ids or []) + ([lt.pad, lt.end] if lt is not None else [])
    suppress = torch.tensor(sorted(set(suppress)), dtype=torch.long, device=device)
    out, logps, lat = [], [], []
    blocks = torch.zeros(B, dtype=torch.long, device=device)  # latent blocks each row has opened
    if lt is not None:
        blocks[ids[:, -1] == lt.start] = 1
    own: list[list[torch.Tensor]] = [[] for _ in range(B)]
    fed: list[list[torch.Tensor]] = [[] for _ in range(B)]
    for _ in range(max_new_tokens):
        logits = head(h)
        new = _pick(logits.index_fill(-1, suppress, float("-inf")) if len(suppress) else logits,
                    do_sample, temperature, top_p, generator)
        in_latent, force_end = slots_left > 1, slots_left == 1
        if lt is not None:
            new = torch.where(in_latent, lt.pad, torch.where(force_end, lt.end, new))
        new = torch.where(finished, tok.pad_token_id, new)
        out.append(new)
        forced = in_latent | force_end | finished
        nxt_emb = embed(new)
        if latent_mode == "hidden":
            z = h.float()
            if latent_sigma is not None:
                z = z + latent_sigma * _randn(tuple(z.shape), generator, z.device)
                lat.append(torch.where(in_latent[:, None], z, 0.0))
            fill = z
            if latent_fn is not None and bool(in_latent.any()):
                fill = latent_fn(z, (k + 1 - slots_left).clamp(0, k - 1), (blocks - 1).clamp(min=0)).float()
            if record_latents:
                for i in in_latent.nonzero().flatten().tolist():
                    own[i].append(z[i].cpu())
                    fed[i].append(fill[i].cpu())
            nxt_emb = torch.where(in_latent[:, None], fill.to(nxt_emb.dtype), nxt_emb)
        if return_logprobs:
            lp = torch.where(forced, 0.0, _logprob(logits, new, temperature))
            if latent_sigma is not None:
                lp = torch.where(in_latent, latent.gaussian_logprob(z, h, latent_sigma), lp)
            logps.append(lp)
        slots_left = torch.where(in_latent | force_end, slots_left - 1, slots_left)
        if lt is not None:
            opened = (new == lt.start) & ~finished
            slots_left = torch.where(opened, k + 1, slots_left)
            blocks = blocks + opened.long()
        finished |= torch.isin(new, eos)
        if bool(finished.all()):
            break
        am = torch.cat([am, am.new_ones(B, 1)], 1)
        step_pos = nxt.view(1, B, 1).expand(3, B, 1)
        nxt = nxt + 1
        h = lm(inputs_embeds=nxt_emb[:, None], position_ids=step_pos, attention_mask=am, past_key_values=cache,
               use_cache=True).last_hidden_state[:, -1]
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
