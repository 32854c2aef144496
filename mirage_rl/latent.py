"""The latent core: input embeddings, mRoPE positions, helper-image targets and the latent fill.

Family-agnostic: what differs between model families (vision features, DeepStack injection, positions, the eager
attention function) is asked of :mod:`mirage_rl.backbones` (issue 32).

Everything that trains or decodes with latent tokens calls these functions (one concept, one place).
Shapes: ``B`` batch, ``L`` sequence length, ``H`` hidden size, ``k`` latent size.

Source: Mirage (arXiv 2506.17218), section 3: stage 1 teacher-forces the k latent slots with the
helper image's pooled visual embeddings; stage 2 feeds, at every latent slot, the model's own last
hidden state of the previous position (Coconut-style recurrence, arXiv 2412.06769).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import backbones, fused_steps, prefix_attention
from .backbones import ImageFeatures, VisualInjection, inject
from .prefix_attention import KeyStore, SharedPrefix, use_prefix_attention

logger = logging.getLogger(__name__)

COMPRESS_MODES = ("average", "grid")


class LatentMode(str, enum.Enum):
    """What enters the k latent slots of a block, in training, rollouts and decoding (one type for every entry point;
    a ``str`` enum, so ``LatentMode.HIDDEN == "hidden"``).

    * ``hidden``: Mirage. Each slot's input is the model's own last hidden state of the previous position (the
      recurrent fill of stage 2, GRPO and decoding; stage 1 teacher-forces the helper-image targets instead).
    * ``dummy``: the control. Each slot keeps the fixed input embedding of ``<|latent_pad|>``: the block is there,
      with its k positions of extra compute, but carries no state from the model.
    * ``none``: no latent block at all (Direct SFT, a plain VLM): ``<output_image>`` markers are dropped.
    """

    HIDDEN = "hidden"
    DUMMY = "dummy"
    NONE = "none"


#: the values of :class:`LatentMode`, for messages and help texts
LATENT_MODES = tuple(m.value for m in LatentMode)


def parse_latent_mode(value, what: str = "latent_mode") -> LatentMode:
    """``value`` (a string or a :class:`LatentMode`) as a :class:`LatentMode`.

    Raises:
        ValueError: naming ``what``, the valid values and the value given (``"hiden"`` is not silently a dummy).
    """
    try:
        return LatentMode(value)
    except ValueError:
        raise ValueError(f"{what} must be one of {LATENT_MODES}, got {value!r}") from None


def resolve_latent_mode(requested, config=None, where: str = "model") -> LatentMode:
    """The latent mode a run uses: ``requested`` when given, else the mode the checkpoint was trained with
    (``config.latent_mode``, recorded by every stage's save), else ``hidden`` when the checkpoint has latent tokens.

    Raises:
        ValueError: an unknown mode; or nothing requested, nothing recorded and no latent tokens in the checkpoint.
    """
    if requested is not None:
        return parse_latent_mode(requested)
    recorded = getattr(config, "latent_mode", None)
    if recorded is not None:
        return parse_latent_mode(recorded, f"{where}: config.latent_mode")
    if getattr(config, "latent_token_ids", None):
        return LatentMode.HIDDEN
    raise ValueError(f"{where}: the checkpoint has no latent tokens and records no latent_mode; pass --latent_mode none "
                     "to use it as a plain VLM, or Start from `mirage-rl create-model` or a stage-1 output")


def check_decoding_mode(mode, config=None, where: str = "model") -> None:
    """Refuse to decode (``eval``, GRPO rollouts) with latent slots from a checkpoint trained without them: one that
    records ``latent_mode: none`` (Direct SFT, or the perception base) never trained its latent tokens or slots, so
    ``hidden`` or ``dummy`` would feed the model inputs it never learned to read. Stage 1 (which teaches the slots)
    may start from such a checkpoint; decoding may not.

    Raises:
        ValueError: ``mode`` is not ``none`` and the checkpoint records ``latent_mode: none``, naming both and the
            two ways on.
    """
    mode = parse_latent_mode(mode)
    if mode is not LatentMode.NONE and getattr(config, "latent_mode", None) == LatentMode.NONE.value:
        raise ValueError(f"{where}: the checkpoint was trained with latent_mode none (no latent block: Direct SFT or a "
                         f"base model), so its latent slots were never trained and latent_mode {mode.value} would feed "
                         "it inputs it never learned to read; use latent_mode none with it, or train stage 1 and "
                         "stage 2 from it first")


def backbone(model):
    """The backbone ``model.model`` (vision tower + decoder + mRoPE index) of a model, PEFT-wrapped or not
    (the backbone itself is returned as is)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner if hasattr(inner, "get_rope_index") else inner.model


def language_model(model):
    """The text decoder (``backbone(model).language_model``) of a model, PEFT-wrapped or not."""
    return backbone(model).language_model


def slot_masks(input_ids: torch.Tensor, start: int, pad: int, end: int, latent_size: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the latent slots and the forced ``<|latent_end|>`` are, read from the token ids.

    A slot is one of the k positions after a ``<|latent_start|>`` that holds ``<|latent_pad|>``; the forced end
    is the ``<|latent_end|>`` at position k + 1. Blocks cut by the end of the sequence keep their slots.
    Args:
        input_ids: ``(B, L)`` long. start / pad / end: the latent token ids. latent_size: k.
    Returns:
        ``(slots, forced_end)``: two ``(B, L)`` bool masks.
    """
    is_start = input_ids == start
    window = torch.zeros_like(is_start)
    for d in range(1, latent_size + 1):
        window[:, d:] |= is_start[:, :-d]
    after = torch.zeros_like(is_start)
    after[:, latent_size + 1:] = is_start[:, : -(latent_size + 1)] if input_ids.shape[1] > latent_size + 1 else False
    return window & (input_ids == pad), after & (input_ids == end)


def vision_features(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[ImageFeatures]:
    """Each image through the vision tower: one :class:`~mirage_rl.backbones.ImageFeatures` per row of
    ``image_grid_thw`` ``(N_images, 3)`` (merged visual tokens ``(t*h*w / merge^2, H)``, and the DeepStack features of
    a family that has them), from the flattened patches ``pixel_values`` ``(P, C*T*p*p)``. The tower runs without
    gradients unless it has trainable parameters (``train_vision_tower``; Mirage keeps it frozen)."""
    inner = backbone(model)
    trainable = torch.is_grad_enabled() and any(p.requires_grad for p in inner.visual.parameters())
    with torch.set_grad_enabled(trainable):
        return backbones.of(inner).image_features(inner, pixel_values, image_grid_thw)


def image_features(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """The merged visual tokens of each image (:func:`vision_features`): what :func:`embed_inputs` scatters into the
    image tokens and what stage 1 pools."""
    return [f.merged for f in vision_features(model, pixel_values, image_grid_thw)]


def image_embeds(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """Each image's vision features packed into one tensor (:meth:`mirage_rl.backbones.base.Backbone.packed`: the
    merged visual tokens, then the DeepStack features along the last dim): what the vLLM engine feeds vLLM as
    ``image_embeds``."""
    family = backbones.of(backbone(model))
    return [family.packed(f) for f in vision_features(model, pixel_values, image_grid_thw)]


class Embedded(NamedTuple):
    """Input embeddings of a batch (:func:`embed_inputs`)."""

    embeds: torch.Tensor  #: ``(B, L, H)``, the image features in the image tokens
    visual: VisualInjection | None  #: what the decoder adds at the image tokens (DeepStack), or None


def embed_inputs(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 image_grid_thw: torch.Tensor | None = None) -> Embedded:
    """Token embeddings with the image features scattered into the image-token positions, and the family's visual
    injection (every decoder call on these columns passes it: :func:`mirage_rl.backbones.inject`).

    Args:
        input_ids: ``(B, L)`` long.
        pixel_values: ``(P, C*T*p*p)`` float, the processor's flattened patches of all images, or None.
        image_grid_thw: ``(N_images, 3)`` long.
    Returns:
        :class:`Embedded`: ``(B, L, H)`` in the embedding dtype, and the injection (None without images or DeepStack).
    Raises:
        ValueError: if the number of image tokens does not match the image features (a truncated prompt).
    """
    embeds = model.get_input_embeddings()(input_ids)
    if pixel_values is None:
        return Embedded(embeds, None)
    inner = backbone(model)
    features = vision_features(model, pixel_values, image_grid_thw)
    feats = torch.cat([f.merged for f in features], 0).to(embeds.dtype)
    mask = input_ids == inner.config.image_token_id
    if int(mask.sum()) != feats.shape[0]:
        raise ValueError(f"{int(mask.sum())} image tokens in input_ids but {feats.shape[0]} image features: "
                         "was the prompt truncated? Raise max_length.")
    return Embedded(embeds.masked_scatter(mask.unsqueeze(-1), feats), backbones.of(inner).injection(mask, features))


def position_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 mm_token_type_ids: torch.Tensor | None = None,
                 image_grid_thw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D mRoPE position ids and the next text position of every row.

    Returns:
        ``(position_ids (3, B, L) long, next_position (B,) long)``; ``next_position`` is the position the
        next generated token takes (the ``rope_deltas`` made explicit, so decode loops never rely on
        ``model.model.rope_deltas`` state). Always explicit: a decoder given ``inputs_embeds`` and no positions would
        compute 1-D ones, silently wrong for image tokens.
    Raises:
        ValueError: images without ``mm_token_type_ids`` (:meth:`mirage_rl.backbones.base.Backbone.rope_index`).
    """
    if image_grid_thw is not None:
        inner = backbone(model)
        pos, deltas = backbones.of(inner).rope_index(inner, input_ids, attention_mask, mm_token_type_ids,
                                                     image_grid_thw)
        nxt = attention_mask.sum(-1) + deltas.view(-1).to(attention_mask.device)
        return pos, nxt.long()
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return pos.unsqueeze(0).expand(3, -1, -1), attention_mask.long().sum(-1)


def helper_targets(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, latent_size: int,
                   compress: str = "average") -> torch.Tensor:
    """Stage-1 targets: each helper image through the frozen vision tower, pooled into ``k`` vectors.

    Args:
        pixel_values, image_grid_thw: the processor's output for the helper images (one per latent block).
        latent_size: k.
        compress: ``"average"`` (the paper: the merged visual tokens, in raster order, split into k
            contiguous groups and averaged) or ``"grid"`` (adaptive 2-D average pooling of the merged token
            grid to a ``a x b`` grid with ``a * b = k``, ``a`` the largest divisor of k <= sqrt(k); keeps the
            spatial layout).
    Returns:
        ``(N_images, k, H)`` float, no gradient.
    Raises:
        ValueError: unknown ``compress`` or an image with fewer visual tokens than k.
    """
    if compress not in COMPRESS_MODES:
        raise ValueError(f"compress must be one of {COMPRESS_MODES}, got {compress!r}")
    merge = backbone(model).config.vision_config.spatial_merge_size
    with torch.no_grad():  # the merged visual tokens only: DeepStack features have no input-space counterpart
        feats = image_features(model, pixel_values, image_grid_thw)
    out = []
    for f, (t, h, w) in zip(feats, image_grid_thw.tolist()):
        if f.shape[0] < latent_size:
            raise ValueError(f"a helper image has {f.shape[0]} visual tokens, fewer than latent_size={latent_size}")
        if compress == "average":
            out.append(torch.stack([c.mean(0) for c in torch.tensor_split(f, latent_size)]))
        else:
            a = max(d for d in range(1, int(math.isqrt(latent_size)) + 1) if latent_size % d == 0)
            grid = f.view(t, h // merge, w // merge, -1).mean(0).permute(2, 0, 1)
            out.append(F.adaptive_avg_pool2d(grid.float(), (a, latent_size // a)).flatten(1).T.to(f.dtype))
    return torch.stack(out)


def _lm_forward(lm, embeds, pos, attention_mask, cache=None, prefix: KeyStore | None = None,
                visual: VisualInjection | None = None):
    """The text decoder's last hidden states. With ``prefix`` (a key store, or a prompt shared by groups of rows),
    ``embeds`` are columns ``E - q..E-1`` after the ones it holds, ``attention_mask`` ``(B, E)`` the columns so far
    (after the shared prompt, if any), and no ``cache``: the earlier columns' keys are in ``prefix``
    (:mod:`mirage_rl.prefix_attention`). ``visual``: the injection of exactly the columns of ``embeds``. Positions
    ``pos`` are always explicit (never the decoder's default)."""
    if prefix is None:
        return lm(inputs_embeds=embeds, position_ids=pos, attention_mask=attention_mask, past_key_values=cache,
                  use_cache=cache is not None, **inject(visual)).last_hidden_state
    mask = prefix.mask(attention_mask, attention_mask.shape[1] - embeds.shape[1])
    with use_prefix_attention(lm):
        return lm(inputs_embeds=embeds, position_ids=pos, use_cache=False, **prefix_attention.decoder_mask(mask),
                  **inject(visual)).last_hidden_state


#: the latent fill methods (:func:`latent_fill`); ``auto`` picks one (:func:`resolve_fill`)
FILL_METHODS = ("auto", "cached", "keystore", "multipass")

_fills_logged: set[tuple[str, str]] = set()


def resolve_fill(lm, method: str = "auto", fused: str = "off") -> tuple[str, str]:
    """The fill method that runs for the text decoder ``lm`` now, and why (issue 31).

    ``auto`` picks the fastest exact method (``bench/sft_step.py``): ``cached`` when the decoder keeps a KV cache (no
    gradient checkpointing in training); under gradient checkpointing ``keystore`` (the same chunked fill with the
    keys in a :class:`~mirage_rl.prefix_attention.KeyStore`, its one-column steps not checkpointed), which needs
    non-reentrant checkpointing when gradients flow (:func:`mirage_rl.prefix_attention.unsupported`); else
    ``multipass`` (reentrant checkpointing, which sends no gradient through a key store: the documented fallback).
    With ``fused`` (a :data:`mirage_rl.fused_steps.FUSED_MODES` other than ``off``) ``auto`` picks ``keystore``
    wherever it can run (the fused steps continue a key store).

    Returns:
        ``(method, reason)``, ``method`` one of ``cached``, ``keystore``, ``multipass``.
    Raises:
        ValueError: an unknown method; ``cached`` under gradient checkpointing in training (transformers drops the
            cache there, so the slots would read nothing); ``keystore`` where the decoder cannot keep its keys (the
            reason named).
    """
    if method not in FILL_METHODS:
        raise ValueError(f"latent fill method must be one of {FILL_METHODS}, got {method!r}")
    if fused not in fused_steps.FUSED_MODES:
        raise ValueError(f"latent_fused_steps must be one of {fused_steps.FUSED_MODES}, got {fused!r}")
    if fused != "off" and method in ("cached", "multipass"):
        raise ValueError(f"latent_fused_steps: {fused} runs on the key store; latent_fill: {method} has none (use "
                         "latent_fill: auto or keystore, or latent_fused_steps: off)")
    checkpointing = bool(getattr(lm, "gradient_checkpointing", False) and lm.training)
    why = prefix_attention.unsupported(lm, backward=torch.is_grad_enabled())
    if method == "cached" and checkpointing:
        raise ValueError("latent_fill: cached cannot run under gradient checkpointing in training (the checkpointed "
                         "layers get no KV cache); use latent_fill: auto or keystore")
    if method == "keystore" and why is not None:
        raise ValueError(f"latent_fill: keystore cannot run here: {why}; use latent_fill: auto or multipass")
    if method != "auto":
        return method, "requested"
    if fused != "off" and why is None:
        return "keystore", f"latent_fused_steps: {fused} (fused one-column steps on a key store)"
    if not checkpointing:
        return "cached", "no gradient checkpointing: a KV cache"
    if why is None:
        return "keystore", "gradient checkpointing: the chunked fill with its keys in a key store"
    return "multipass", f"gradient checkpointing where the key store cannot run ({why})"


def latent_fill(model, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                latent_mask: torch.Tensor, method: str = "auto", fused: str = "off",
                visual: VisualInjection | None = None) -> torch.Tensor:
    """Run the decoder where every latent slot's input is the last hidden state of the previous position.

    Args:
        inputs_embeds: ``(B, L, H)`` token (and image) embeddings; latent slots hold anything (replaced).
        position_ids: ``(3, B, L)`` mRoPE positions. attention_mask: ``(B, L)``, 1 for real tokens.
        latent_mask: ``(B, L)`` bool, True at latent slots. A slot may not sit in column 0.
        method: ``"cached"`` (a KV cache; the sequence is cut at every column that holds a slot in any
            row, so aligned batches cost k single-column steps; misaligned rows, e.g. rollouts that opened their
            blocks at different steps, are first realigned by :func:`aligned_columns`), ``"keystore"`` (the same
            chunks with the keys in a :class:`~mirage_rl.prefix_attention.KeyStore` instead of a cache: runs under
            non-reentrant gradient checkpointing, which drops the cache), ``"multipass"`` (no cache: full forwards
            repeated until every slot is exact; cost ~ (slots per row + 1) forwards; runs under any checkpointing) or
            ``"auto"`` (:func:`resolve_fill`; the pick is logged once per process). All give the same values and
            gradients (tested).
        fused: ``latent_fused_steps`` (:mod:`mirage_rl.fused_steps`): how the key store's one-column steps run:
            ``"off"`` (default) as they are, ``"compile"`` / ``"cudagraphs"`` compiled.
        visual: the injection of ``inputs_embeds``' image tokens (:attr:`Embedded.visual`); every chunk gets its part.
    Returns:
        ``(B, L, H)`` last-layer hidden states (after the final norm), differentiable.
    Raises:
        ValueError: a slot in column 0; a method that cannot run here (:func:`resolve_fill`).
    """
    lm = language_model(model)
    if not bool(latent_mask.any()):
        return _lm_forward(lm, inputs_embeds, position_ids, attention_mask, visual=visual)
    if bool(latent_mask[:, 0].any()):
        raise ValueError("a latent slot sits in column 0: it has no previous hidden state")
    requested = method
    method, reason = resolve_fill(lm, method, fused)
    if requested == "auto" and (method, reason) not in _fills_logged:
        _fills_logged.add((method, reason))
        logger.info("latent_fill auto: %s (%s)", method, reason)
    if method == "multipass":
        return _fill_multipass(lm, inputs_embeds, position_ids, attention_mask, latent_mask, visual)
    store = KeyStore.for_layers(len(lm.layers)) if method == "keystore" else None
    cols = aligned_columns(latent_mask)
    if cols is None:
        return _fill_cached(lm, inputs_embeds, position_ids, attention_mask, latent_mask, store, fused, visual)
    return _fill_cached_aligned(lm, inputs_embeds, position_ids, attention_mask, latent_mask, cols, store, fused,
                                visual)


def _fill_cached(lm, embeds, pos, attention_mask, latent_mask, prefix: KeyStore | None = None, fused: str = "off",
                 visual: VisualInjection | None = None):
    """The chunked fill: with a KV cache, or with ``prefix`` its keys kept in a store (a
    :class:`~mirage_rl.prefix_attention.KeyStore`; a :class:`SharedPrefix`: a prompt shared by groups of rows, which
    the columns here continue). With a per-row key store each run of consecutive one-column chunks goes through
    :func:`mirage_rl.fused_steps.run_columns`, compiled as ``fused`` says. Every chunk gets its columns' part of
    ``visual``; a column that holds an image token in some row never joins a run of fused steps."""
    L = embeds.shape[1]
    cols = latent_mask.any(0).nonzero().flatten().tolist()
    chunks = [(s, e) for s, e in zip([0] + cols, cols + [L]) if e > s]
    if type(prefix) is KeyStore:  # runs of one-column chunks go through the step function as one item
        merged: list[tuple[int, int, bool]] = []
        for s, e in chunks:
            step = e - s == 1 and s > 0 and (visual is None or visual.columns(s, e) is None)
            if step and merged and merged[-1][2] and merged[-1][1] == s:
                merged[-1] = (merged[-1][0], e, True)
            else:
                merged.append((s, e, step))
    else:
        merged = [(s, e, False) for s, e in chunks]
    cache = DynamicCache(config=lm.config) if prefix is None else None
    outs: list[torch.Tensor] = []
    for s, e, run in merged:
        if run:
            outs.append(fused_steps.run_columns(lm, prefix, embeds[:, s:e], outs[-1][:, -1], latent_mask[:, s:e],
                                                pos[..., s:e], attention_mask[:, :e], fused))
            continue
        chunk = embeds[:, s:e]
        if s > 0 and s in cols:  # this chunk starts at a latent column: feed the previous hidden state there
            first = torch.where(latent_mask[:, s, None], outs[-1][:, -1], chunk[:, 0])
            chunk = torch.cat([first[:, None], chunk[:, 1:]], 1)
        # a one-column chunk on a store (a shared prompt's latent steps) runs outside the checkpoint
        unchecked = prefix_attention.unchecked(lm) if prefix is not None and e - s == 1 else contextlib.nullcontext()
        with unchecked:
            outs.append(_lm_forward(lm, chunk, pos[..., s:e], attention_mask[:, :e], cache, prefix,
                                    visual.columns(s, e) if visual is not None else None))
    return torch.cat(outs, 1)


def _slot_runs(cols: list[int]) -> list[list[int]]:
    """Consecutive slot columns grouped into runs ``[first column, length]`` (a latent block is one run)."""
    runs: list[list[int]] = []
    for c in cols:
        if runs and c == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([c, 1])
    return runs


def aligned_columns(latent_mask: torch.Tensor) -> torch.Tensor | None:
    """A layout in which the r-th run of latent slots (the r-th latent block) starts in the same column in every row.

    The cached fill cuts the sequence at every column that holds a slot in any row: rows whose blocks sit in
    different columns (GRPO rollouts open ``<|latent_start|>`` at different steps) cost one decoder call per distinct
    column, up to ``B * k`` calls. Shifting each row's columns right by masked gap columns inserted before the token
    that precedes each block (a slot and the position it reads stay adjacent) lines the blocks up: k calls per
    block. Positions are explicit (mRoPE ids) and gaps are masked out, so the values are those of the original
    layout.

    Args:
        latent_mask: ``(B, L)`` bool.
    Returns:
        ``(B, L)`` long, the new column of every original column (strictly increasing per row), or None when the
        realigned layout would not cut the sequence fewer times.
    """
    slots = [row.nonzero().flatten().tolist() for row in latent_mask.cpu()]
    runs = [_slot_runs(cols) for cols in slots]
    n_runs = max(len(r) for r in runs)
    starts: list[int] = []  # the aligned first column of run r
    for r in range(n_runs):
        have = [rr for rr in runs if len(rr) > r]
        if r == 0:
            starts.append(max(rr[0][0] for rr in have))
        else:  # room for the longest stretch since the previous run's start, in every row
            starts.append(starts[-1] + max(rr[r][0] - rr[r - 1][0] for rr in have))
    before = len({c for cols in slots for c in cols})
    after = len({starts[r] + j for rr in runs for r, (_, n) in enumerate(rr) for j in range(n)})
    if after >= before:
        return None
    B, L = latent_mask.shape
    offset = torch.zeros(B, L, dtype=torch.long)
    for i, rr in enumerate(runs):
        for r, (first, _) in enumerate(rr):  # from the position the run reads onwards
            offset[i, (first - 1 if r else 0):] = starts[r] - first
    return (torch.arange(L)[None] + offset).to(latent_mask.device)


def _fill_cached_aligned(lm, embeds, pos, attention_mask, latent_mask, cols, prefix: KeyStore | None = None,
                         fused: str = "off", visual: VisualInjection | None = None):
    """:func:`_fill_cached` on the layout of :func:`aligned_columns`, mapped back to the original columns (gap
    columns go after a given ``prefix``, never into it)."""
    B, L, H = embeds.shape
    width = int(cols.max()) + 1
    rows = torch.arange(B, device=cols.device)[:, None].expand(B, L)
    e = embeds.new_zeros(B, width, H)
    e[rows, cols] = embeds
    p = pos.new_zeros(pos.shape[0], B, width)
    p[:, rows, cols] = pos
    am = attention_mask.new_zeros(B, width)
    am[rows, cols] = attention_mask
    lmask = latent_mask.new_zeros(B, width)
    lmask[rows, cols] = latent_mask
    moved = visual.realign(cols, width) if visual is not None else None
    hidden = _fill_cached(lm, e, p, am, lmask, prefix, fused, moved)
    return hidden.gather(1, cols[..., None].expand(B, L, hidden.shape[-1]))


def _fill_multipass(lm, embeds, pos, attention_mask, latent_mask, visual: VisualInjection | None = None):
    passes = int(latent_mask.sum(1).max())
    last = int(latent_mask.any(0).nonzero().max())  # columns after the last slot never feed a slot
    cur = embeds
    mask3 = latent_mask[..., None]
    for _ in range(passes):
        hidden = _lm_forward(lm, cur[:, :last], pos[..., :last], attention_mask[:, :last],
                             visual=visual.columns(0, last) if visual is not None else None)
        shifted = torch.cat([hidden[:, :1], hidden], 1)  # shifted[:, j] = hidden[:, j - 1] for j >= 1
        cur = torch.cat([torch.where(mask3[:, :last + 1], shifted, embeds[:, :last + 1]), embeds[:, last + 1:]], 1)
    return _lm_forward(lm, cur, pos, attention_mask, visual=visual)


def latent_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                         mm_token_type_ids: torch.Tensor | None = None, latent_mask: torch.Tensor | None = None,
                         latent_inputs: torch.Tensor | None = None, method: str = "auto",
                         fused: str = "off") -> torch.Tensor:
    """Last hidden states of a whole latent sequence, the way decoding produced it (scoring a rollout).

    Args:
        input_ids / attention_mask / pixel_values / image_grid_thw / mm_token_type_ids: as the processor gives them,
            completion appended (``(B, L)``).
        latent_mask: ``(B, L)`` bool, the latent slots. Without ``latent_inputs`` each slot gets the previous
            position's hidden state (``latent_fill``, differentiable through the recurrence).
        latent_inputs: ``(N, H)`` float, the inputs the slots received at sampling time, row-major (Gaussian latents);
            fed as they are, so the sequence costs one forward.
        method / fused: the fill (:func:`latent_fill`).
    Returns:
        ``(B, L, H)`` hidden states after the final norm.
    Raises:
        ValueError: ``latent_inputs`` without ``latent_mask``, or a count that differs from the slots.
    """
    emb, visual = embed_inputs(model, input_ids, pixel_values, image_grid_thw)
    pos, _ = position_ids(model, input_ids, attention_mask, mm_token_type_ids, image_grid_thw)
    if latent_inputs is not None:
        if latent_mask is None:
            raise ValueError(f"0 latent slots but {latent_inputs.shape[0]} latent vectors: pass latent_mask")
        return _lm_forward(language_model(model), teacher_forced(emb, latent_mask, latent_inputs), pos, attention_mask,
                           visual=visual)
    if latent_mask is None:
        return _lm_forward(language_model(model), emb, pos, attention_mask, visual=visual)
    return latent_fill(model, emb, pos, attention_mask, latent_mask, method, fused, visual)


def prefix_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_len: int,
                  extras: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """For every row, the first row whose first ``prefix_len`` columns are the same: the rows that can share one
    prompt forward (a GRPO group repeats its prompt ``num_generations`` times; rows need not be adjacent).

    Args:
        input_ids / attention_mask: ``(B, L)``. prefix_len: the columns compared.
        extras: per-row tensors that must also be equal (``(B, ...)``, e.g. ``mm_token_type_ids[:, :prefix_len]``),
            or per-row lists of tensors (a row's image patches) given as ``None`` when absent.
    Returns:
        ``(B,)`` long, ``out[i] <= i``; ``out[i] == i`` for the first row of each group.
    """
    B = input_ids.shape[0]
    keys = [input_ids[:, :prefix_len], attention_mask[:, :prefix_len], *[x for x in (extras or []) if x is not None]]
    out = list(range(B))
    reps: list[int] = []
    for i in range(B):
        for r in reps:
            if all(torch.equal(k[i], k[r]) for k in keys):
                out[i] = r
                break
        else:
            reps.append(i)
    return torch.tensor(out, dtype=torch.long, device=input_ids.device)


def row_images(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
               image_grid_thw: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per row, its images' patches ``(P_i, C*T*p*p)`` and grids ``(N_i, 3)`` (a row's images are the ones whose
    ``<|vision_start|>`` it holds, in order); ``None`` without images."""
    if pixel_values is None or image_grid_thw is None:
        return None
    per_row = (input_ids == backbone(model).config.vision_start_token_id).sum(1).tolist()
    patches = image_grid_thw.prod(-1).tolist()
    if sum(per_row) != len(patches):
        raise ValueError(f"{sum(per_row)} <|vision_start|> tokens but {len(patches)} images in image_grid_thw")
    out, img, row = [], 0, 0
    for n in per_row:
        rows = sum(patches[img:img + n])
        out.append((pixel_values[row:row + rows], image_grid_thw[img:img + n]))
        img, row = img + n, row + rows
    return out


class PromptGroups(NamedTuple):
    """Rows that share their first ``prefix_len`` columns (:func:`prompt_groups`)."""

    rows: torch.Tensor  #: ``(B,)`` long, :func:`prefix_groups`
    reps: torch.Tensor  #: ``(R,)`` long, the first row of each group, ascending
    index: torch.Tensor  #: ``(B,)`` long, each row's group in ``reps``
    pixel_values: torch.Tensor | None  #: the groups' first rows' image patches, in ``reps`` order
    image_grid_thw: torch.Tensor | None  #: and their grids


def prompt_groups(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_len: int,
                  pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                  mm_token_type_ids: torch.Tensor | None = None) -> PromptGroups | None:
    """The groups of rows whose first ``prefix_len`` columns (ids, mask, mm token types and the images whose
    ``<|vision_start|>`` they hold: :func:`row_images`) are identical, with the images of each group's first row;
    ``None`` when no two rows share (the rollout prefill and the shared scoring, issue 22)."""
    ids = input_ids[:, :prefix_len]
    images = row_images(model, ids, pixel_values, image_grid_thw)
    mm = mm_token_type_ids[:, :prefix_len] if mm_token_type_ids is not None else None
    rows = prefix_groups(input_ids, attention_mask, prefix_len, [mm, [x[0] for x in images] if images else None])
    reps, index = torch.unique(rows, sorted=True, return_inverse=True)
    if len(reps) == len(rows):
        return None
    r = reps.tolist()
    return PromptGroups(rows, reps, index, torch.cat([images[i][0] for i in r]) if images else None,
                        torch.cat([images[i][1] for i in r]) if images else None)


def shared_prefix_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                image_grid_thw: torch.Tensor | None, mm_token_type_ids: torch.Tensor | None,
                                latent_mask: torch.Tensor | None, latent_inputs: torch.Tensor | None,
                                prefix_rows: torch.Tensor, prefix_len: int,
                                prefix_pixel_values: torch.Tensor | None = None,
                                prefix_image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`latent_hidden_states` with the first ``prefix_len`` columns run once per group of rows that share them
    (issue 22; ours: TRL runs a GRPO group's prompt once per rollout).

    The prefix (the prompt minus its last token) of each group's first row goes through the vision tower and the
    decoder once, each layer's keys and values kept, and the rest of each row (the prompt's last token, then the
    completion with its latent blocks: realigned recurrent fill, or ``latent_inputs`` teacher-forced) continues on
    it: its attention reads the group's prompt keys and values where they are, ``(groups, kv heads, P, d)``, never
    copied over the rows (:mod:`mirage_rl.prefix_attention`); the backward sums every row's gradient into the one
    prefix forward, as the unshared computation sums them. Values and gradients equal :func:`latent_hidden_states` within
    floating-point reordering (``tests/test_shared_prefix.py``).

    Args:
        input_ids / attention_mask / image_grid_thw (every row's images, for the mRoPE positions) /
            mm_token_type_ids / latent_mask / latent_inputs: as :func:`latent_hidden_states`, ``(B, L)``.
        prefix_rows: ``(B,)`` long, :func:`prefix_groups` of the first ``prefix_len`` columns.
        prefix_len: ``P >= 1`` shared columns; no latent slot in columns ``0..P`` (the slot reads column ``P - 1``'s
            hidden state in the row's own pass).
        prefix_pixel_values / prefix_image_grid_thw: the images of the groups' first rows only (sorted by row).
    Returns:
        ``(B, L, H)``; columns ``0..P-1`` hold zeros (no label is scored there: the first completion token is
        predicted from column ``L - C - 1 >= P``).
    Raises:
        ValueError: ``prefix_len`` outside ``[1, L)``; a latent slot in columns ``0..P``; an image token in columns
            ``P..L-1``; ``latent_inputs`` without ``latent_mask``; a decoder that cannot share
            (:func:`mirage_rl.prefix_attention.unsupported`: sliding-window layers, reentrant checkpointing).
    """
    lm = language_model(model)
    if (why := prefix_attention.unsupported(lm)) is not None:
        raise ValueError(f"a shared prompt cannot run here: {why}; set shared_prefix: false")
    B, L = input_ids.shape
    P = int(prefix_len)
    if not 1 <= P < L:
        raise ValueError(f"prefix_len must be in [1, {L - 1}], got {P}")
    if latent_mask is not None and bool(latent_mask[:, : P + 1].any()):
        raise ValueError(f"a latent slot in the shared prefix (columns 0..{P}): share fewer columns")
    image_token = backbone(model).config.image_token_id
    if bool((input_ids[:, P:] == image_token).any()):
        raise ValueError(f"image tokens after the shared prefix (column {P} on): share more columns")
    reps, index = torch.unique(prefix_rows, sorted=True, return_inverse=True)
    pos, _ = position_ids(model, input_ids, attention_mask, mm_token_type_ids, image_grid_thw)
    emb, visual = embed_inputs(model, input_ids[reps, :P], prefix_pixel_values, prefix_image_grid_thw)
    prefix = SharedPrefix.for_groups(len(lm.layers), attention_mask[reps, :P], index)
    mask = create_causal_mask(config=lm.config, inputs_embeds=emb, attention_mask=attention_mask[reps, :P],
                              past_key_values=None)  # the model's own prompt mask, as its forward builds it
    implementation = ALL_ATTENTION_FUNCTIONS.get_interface(lm.config._attn_implementation,
                                                           backbones.of(lm).eager_attention)
    with use_prefix_attention(lm):  # the prompt: the model's attention, keys and values kept in ``prefix``
        lm(inputs_embeds=emb, position_ids=pos[:, reps, :P], use_cache=False,
           **prefix_attention.decoder_mask(prefix.prompt_mask(mask, implementation)), **inject(visual))
    emb = embed_inputs(model, input_ids[:, P:]).embeds
    am, p = attention_mask[:, P:], pos[..., P:]
    if latent_inputs is not None:
        if latent_mask is None:
            raise ValueError(f"0 latent slots but {latent_inputs.shape[0]} latent vectors: pass latent_mask")
        hidden = _lm_forward(lm, teacher_forced(emb, latent_mask[:, P:], latent_inputs), p, am, prefix=prefix)
    elif latent_mask is None or not bool(latent_mask.any()):
        hidden = _lm_forward(lm, emb, p, am, prefix=prefix)
    else:
        lmask = latent_mask[:, P:]
        cols = aligned_columns(lmask)
        hidden = (_fill_cached(lm, emb, p, am, lmask, prefix) if cols is None
                  else _fill_cached_aligned(lm, emb, p, am, lmask, cols, prefix))
    return torch.cat([hidden.new_zeros(B, P, hidden.shape[-1]), hidden], 1)


def gaussian_logprob(z: torch.Tensor, h: torch.Tensor, sigma: float) -> torch.Tensor:
    """``log N(z; h, sigma^2 I)`` up to its constant (Gaussian latents, Monet VLPO arXiv 2511.21395): ``(N, H)`` ->
    ``(N,)`` float32. Rollouts and scoring both use it, so sampling-time and recomputed values agree."""
    return -((z.float() - h.float()) ** 2).sum(-1) / (2 * sigma ** 2)


def teacher_forced(inputs_embeds: torch.Tensor, latent_mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Put given vectors into the latent slots: stage 1's helper-image targets, or the Gaussian latents a rollout
    sampled.

    Args:
        inputs_embeds: ``(B, L, H)``. latent_mask: ``(B, L)`` bool with ``N * k`` True entries.
        targets: ``(N, k, H)`` (or ``(N * k, H)``), one row per latent block in reading order (row-major over the
            batch).
    Raises:
        ValueError: if the number of slots differs from the number of target vectors.
    """
    flat = targets.reshape(-1, targets.shape[-1]).to(inputs_embeds.dtype)
    if int(latent_mask.sum()) != flat.shape[0]:
        raise ValueError(f"{int(latent_mask.sum())} latent slots but {flat.shape[0]} target vectors (stage 1: every "
                         "latent block needs one helper image)")
    return inputs_embeds.masked_scatter(latent_mask[..., None], flat)
