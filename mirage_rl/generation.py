"""Latent-interleaved decoding: one batched loop with a KV cache and per-row latent mode.

A row that emits ``<|latent_start|>`` feeds, for the next k steps, its own last hidden state as the
next input (``latent_mode="hidden"``; Mirage inference, arXiv 2506.17218 section 3.3) or the fixed
``<|latent_pad|>`` embedding (``"dummy"``); then ``<|latent_end|>`` is forced. Other rows decode text
meanwhile. ``latent_mode="none"`` is plain decoding with the same loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from . import latent
from .modeling import LatentTokens


@dataclass
class GenerationOutput:
    """``sequences``: ``(B, T)`` long, the generated ids (latent slots appear as ``<|latent_pad|>``, the
    rows that finished early are padded with the pad id); ``texts``: decoded completions up to the first
    end-of-sequence token, special tokens kept (the latent block shows as its three token strings)."""

    sequences: torch.Tensor
    texts: list[str]


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), -1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, processor, batch: dict, max_new_tokens: int = 64, latent_mode: str = "hidden",
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             generator: torch.Generator | None = None) -> GenerationOutput:
    """Decode a left-padded prompt batch (``LatentCollator(with_answer=False)``).

    Args:
        batch: ``input_ids`` (B, L), ``attention_mask`` (B, L), ``mm_token_type_ids``, ``pixel_values``,
            ``image_grid_thw``. A prompt that ends with ``<|latent_start|>`` enters latent mode at once.
        latent_mode: ``"hidden"``, ``"dummy"`` or ``"none"``.
        do_sample / temperature / top_p: greedy when ``do_sample`` is False.
    Raises:
        ValueError: ``latent_mode`` is not ``"none"`` and the checkpoint has no latent tokens.
    """
    device = model.get_input_embeddings().weight.device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    tok = processor.tokenizer
    eos = torch.tensor(sorted({tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id}), device=device)
    lt = LatentTokens.from_config(model.config) if latent_mode != "none" else None
    k = lt.latent_size if lt else 0
    lm, head, embed = latent.language_model(model), model.get_output_embeddings(), model.get_input_embeddings()

    ids, am = batch["input_ids"], batch["attention_mask"]
    B = ids.shape[0]
    emb = latent.embed_inputs(model, ids, batch.get("pixel_values"), batch.get("image_grid_thw"))
    pos, nxt = latent.position_ids(model, ids, am, batch.get("mm_token_type_ids"), batch.get("image_grid_thw"))
    cache = DynamicCache(config=lm.config)
    h = lm(inputs_embeds=emb, position_ids=pos, attention_mask=am, past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
    slots_left = torch.zeros(B, dtype=torch.long, device=device)
    if lt is not None:
        slots_left[ids[:, -1] == lt.start] = k + 1
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    for _ in range(max_new_tokens):
        new = _pick(head(h), do_sample, temperature, top_p, generator)
        in_latent, force_end = slots_left > 1, slots_left == 1
        if lt is not None:
            new = torch.where(in_latent, lt.pad, torch.where(force_end, lt.end, new))
        new = torch.where(finished, tok.pad_token_id, new)
        out.append(new)
        nxt_emb = embed(new)
        if latent_mode == "hidden":
            nxt_emb = torch.where(in_latent[:, None], h.to(nxt_emb.dtype), nxt_emb)
        slots_left = torch.where(in_latent | force_end, slots_left - 1, slots_left)
        if lt is not None:
            slots_left = torch.where((new == lt.start) & ~finished, k + 1, slots_left)
        finished |= torch.isin(new, eos)
        if bool(finished.all()):
            break
        am = torch.cat([am, am.new_ones(B, 1)], 1)
        step_pos = nxt.view(1, B, 1).expand(3, B, 1)
        nxt = nxt + 1
        h = lm(inputs_embeds=nxt_emb[:, None], position_ids=step_pos, attention_mask=am, past_key_values=cache,
               use_cache=True).last_hidden_state[:, -1]
    seqs = torch.stack(out, 1) if out else ids.new_zeros(B, 0)
    texts = []
    for row in seqs.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos.tolist()), len(row))
        texts.append(tok.decode(row[:cut], skip_special_tokens=False))
    return GenerationOutput(seqs, texts)
