"""The latent-aware collator: the one place that lays out a batch.

Layout: ``[left pad][chat prompt with image tokens][answer ...<|latent_start|> k x <|latent_pad|>
<|latent_end|>...][<|im_end|>][right pad]``. Rows are left-padded so that the first latent slot of
every row sits in the same column (Coconut's trick): the cached latent fill then costs k single-column
steps for the whole batch. Rows with several latent blocks, or none, are valid too (the fill handles
any layout, just with more steps).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .data.images import check_pixel_budget, pixel_budget
from .data.messages import LATENT_MARKER, row_images, with_helper_input
from .latent import LatentMode, parse_latent_mode
from .modeling import LatentTokens

logger = logging.getLogger(__name__)


def max_chars_for(processor, max_length: int | None) -> int | None:
    """The most UTF-8 bytes a text can have and still fit in ``max_length`` tokens: a token covers at most as many
    bytes as the longest entry of the vocabulary, so a longer text is refused without tokenizing it (a 50 MB row
    would exhaust memory in the tokenizer). None without ``max_length``."""
    if max_length is None:
        return None
    tok = getattr(processor, "tokenizer", processor)
    if not hasattr(tok, "_mirage_max_token_bytes"):
        tok._mirage_max_token_bytes = max(len(t.encode("utf-8")) for t in tok.get_vocab()) or 1
    return max_length * tok._mirage_max_token_bytes


def answer_text(answer: str, tokens: LatentTokens | None, latent_mode: str) -> str:
    """Expand every ``<output_image>`` marker into the latent block, or drop it (``latent_mode="none"``)."""
    if parse_latent_mode(latent_mode) is LatentMode.NONE:
        return answer.replace(LATENT_MARKER, "")
    if tokens is None:
        raise ValueError("latent_mode needs latent tokens (LatentTokens) to expand the <output_image> marker")
    return answer.replace(LATENT_MARKER, tokens.block())


@dataclass
class LatentCollator:
    """Collate rows with ``prompt`` (conversational), ``image`` (or ``images``: a list, one per ``<image>`` of the
    prompt; a batch may mix rows of one and of several images) and ``answer`` (+ ``helper_image`` for stage 1).

    Args:
        processor: the model's processor (tokenizer + image processor; any backbone).
        latent_tokens: ids and k (from the model config); None only with ``latent_mode="none"``.
        latent_mode: ``"hidden"`` / ``"dummy"`` keep the latent block, ``"none"`` drops it (Direct SFT).
        stage: 1 adds ``helper_pixel_values``/``helper_image_grid_thw`` (one helper image per latent block).
        max_length: a longer row raises (no silent truncation of image tokens or the latent block).
        with_answer: False collates prompts only (for generation), with the generation prompt appended.
        reference_images: stage 1 with ``latent_target: residual``: also ``reference_pixel_values`` /
            ``reference_image_grid_thw``, the row's first input image once per helper image (what is subtracted).
        helper_as_input: the row's ``helper_image`` becomes a second input image, right after the first (its
            ``<image>`` part is added to the prompt: ``data.messages.with_helper_input``): the input upper bound,
            Direct SFT and its evaluation with the helper image seen, not imagined (``latent_mode="none"`` only).

    Returns (``__call__``) a dict of tensors: ``input_ids`` (B, L) long, ``attention_mask`` (B, L) long,
    ``mm_token_type_ids`` (B, L) int, ``pixel_values`` (P, D) float, ``image_grid_thw`` (N, 3) long,
    ``latent_mask`` (B, L) bool, and with answers ``labels`` (B, L) long (-100 on prompt, padding, latent
    slots and the forced ``<|latent_end|>``).
    """

    processor: object
    latent_tokens: LatentTokens | None
    latent_mode: str = "hidden"
    stage: int = 2
    max_length: int | None = None
    with_answer: bool = True
    reference_images: bool = False
    helper_as_input: bool = False

    def __post_init__(self):
        self.latent_mode = parse_latent_mode(self.latent_mode).value
        if self.helper_as_input and (self.latent_mode != "none" or self.stage == 1):
            raise ValueError("helper_as_input gives the helper image as an input (the input upper bound): it needs "
                             "latent_mode 'none' and stage 2")
        if self.stage == 1 and self.latent_mode == "none":
            raise ValueError("stage 1 needs latent tokens: use latent_mode 'hidden'")
        tok = self.processor.tokenizer
        self.pad_id = tok.pad_token_id
        self.max_pixels = pixel_budget(self.processor.image_processor)

    def encode(self, example: dict, index: int = 0) -> dict:
        """Tokenize one row (no padding).

        Raises:
            ValueError: naming the row (its ``map_id``/``id`` when it has one) and the key: a missing key, an
                image far larger than the processor's pixel budget, more than ``max_length`` tokens, or (stage 1)
                a helper-image count different from the number of latent blocks.
        """
        row = _row_name(example, index)
        for key in ("prompt",) + (("answer",) if self.with_answer else ()):
            if key not in example or example[key] is None:
                raise ValueError(f"{row}: missing {key!r} (expected keys prompt, image or images, answer"
                                 f"{', helper_image' if self.stage == 1 else ''})")
        try:
            images = row_images(example)
        except KeyError:
            raise ValueError(f"{row}: missing 'image' (or 'images', a list): the row's input image(s)") from None
        messages = example["prompt"]
        if self.helper_as_input:
            if example.get("helper_image") is None:
                raise ValueError(f"{row}: helper_as_input needs the row's 'helper_image' (a PIL image)")
            images = images[:1] + [example["helper_image"]] + images[1:]
            messages = with_helper_input(messages)
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        text = prompt
        if self.with_answer:
            answer = answer_text(example["answer"], self.latent_tokens, self.latent_mode)
            text = prompt + answer + "<|im_end|>"
        limit = max_chars_for(self.processor, self.max_length)
        if limit is not None and len(text.encode("utf-8")) > limit:
            raise ValueError(f"{row}: {len(text)} characters cannot fit in max_length={self.max_length} tokens (refused "
                             "before tokenizing); image tokens and the latent block are never cut: shorten the row or "
                             "raise max_length")
        for j, im in enumerate(images):
            check_pixel_budget(im, self.max_pixels, f"{row} image" + (f" {j + 1} of {len(images)}" if len(images) > 1 else ""))
        enc = self.processor(text=[text], images=[im.convert("RGB") for im in images], return_tensors="pt")
        ids = enc["input_ids"][0]
        out = {"input_ids": ids, "mm_token_type_ids": enc["mm_token_type_ids"][0],
               "pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]}
        if self.max_length is not None and len(ids) > self.max_length:
            raise ValueError(f"{row}: {len(ids)} tokens > max_length={self.max_length}; image tokens and the "
                             "latent block are never cut: raise max_length or shrink the image budget")
        lt = self.latent_tokens
        latent = (ids == lt.pad) if (lt is not None and self.latent_mode != "none") else torch.zeros_like(ids, dtype=torch.bool)
        out["latent_mask"] = latent
        if self.with_answer:
            n_prompt = self._prompt_len(ids)
            labels = ids.clone()
            labels[:n_prompt] = -100
            if lt is not None:
                labels[(ids == lt.pad) | (ids == lt.end)] = -100
            out["labels"] = labels
            n_blocks = int((ids == lt.start).sum()) if lt is not None and self.latent_mode != "none" else 0
            if self.stage == 1 and n_blocks:  # a row without a latent block trains on CE alone: no helper image
                helpers = example.get("helper_image")
                helpers = [] if helpers is None else (helpers if isinstance(helpers, list) else [helpers])
                if len(helpers) != n_blocks:
                    raise ValueError(f"{row}: {n_blocks} latent block(s) but {len(helpers)} helper image(s); "
                                     "stage 1 needs one 'helper_image' per <output_image> marker")
                for im in helpers:
                    check_pixel_budget(im, self.max_pixels, f"{row} helper_image")
                if helpers:
                    h = self.processor.image_processor(images=[im.convert("RGB") for im in helpers], return_tensors="pt")
                    out["helper_pixel_values"], out["helper_image_grid_thw"] = h["pixel_values"], h["image_grid_thw"]
                    if self.reference_images:
                        r = self.processor.image_processor(images=[images[0].convert("RGB")] * len(helpers),
                                                           return_tensors="pt")
                        if not torch.equal(r["image_grid_thw"], h["image_grid_thw"]):
                            raise ValueError(f"{row}: latent_target residual subtracts the input image from the "
                                             f"helper image, but they differ in size after the processor "
                                             f"({r['image_grid_thw'][0].tolist()} vs {h['image_grid_thw'][0].tolist()}); "
                                             "draw the helper image at the input image's size")
                        out["reference_pixel_values"], out["reference_image_grid_thw"] = r["pixel_values"], r["image_grid_thw"]
        return out

    def _prompt_len(self, ids: torch.Tensor) -> int:
        # the answer starts after the last "<|im_start|>assistant\n"
        header = self._header_ids()
        n = len(header)
        starts = (ids == header[0]).nonzero().flatten().tolist()
        for s in reversed(starts):
            if ids[s : s + n].tolist() == header:
                return s + n
        raise ValueError("no assistant header in the chat template output")

    def _header_ids(self) -> list[int]:
        if not hasattr(self, "_header"):
            self._header = self.processor.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        return self._header

    def __call__(self, examples: list[dict]) -> dict:
        rows = [self.encode(ex, i) for i, ex in enumerate(examples)]
        return self.pad(rows)

    def pad(self, rows: list[dict]) -> dict:
        """Pad encoded rows: left padding aligns the first latent slot, right padding fills the rest."""
        anchors = [int(r["latent_mask"].nonzero()[0]) if r["latent_mask"].any() else None for r in rows]
        top = max((a for a in anchors if a is not None), default=0)
        if not self.with_answer:  # prompts only: plain left padding (generation appends on the right)
            lefts = [max(len(r["input_ids"]) for r in rows) - len(r["input_ids"]) for r in rows]
        else:
            lefts = [top - a if a is not None else 0 for a in anchors]
        L = max(lp + len(r["input_ids"]) for lp, r in zip(lefts, rows))
        B = len(rows)
        batch = {
            "input_ids": torch.full((B, L), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((B, L), dtype=torch.long),
            "mm_token_type_ids": torch.zeros((B, L), dtype=rows[0]["mm_token_type_ids"].dtype),
            "latent_mask": torch.zeros((B, L), dtype=torch.bool),
        }
        if self.with_answer:
            batch["labels"] = torch.full((B, L), -100, dtype=torch.long)
        for i, (lp, r) in enumerate(zip(lefts, rows)):
            n = len(r["input_ids"])
            sl = slice(lp, lp + n)
            batch["input_ids"][i, sl] = r["input_ids"]
            batch["attention_mask"][i, sl] = 1
            batch["mm_token_type_ids"][i, sl] = r["mm_token_type_ids"]
            batch["latent_mask"][i, sl] = r["latent_mask"]
            if self.with_answer:
                batch["labels"][i, sl] = r["labels"]
        batch["pixel_values"] = torch.cat([r["pixel_values"] for r in rows])
        batch["image_grid_thw"] = torch.cat([r["image_grid_thw"] for r in rows])
        for name in ("helper", "reference"):
            if any(f"{name}_pixel_values" in r for r in rows):
                batch[f"{name}_pixel_values"] = torch.cat([r[f"{name}_pixel_values"] for r in rows if f"{name}_pixel_values" in r])
                batch[f"{name}_image_grid_thw"] = torch.cat([r[f"{name}_image_grid_thw"] for r in rows
                                                             if f"{name}_image_grid_thw" in r])
        return batch


def _row_name(example: dict, index: int) -> str:
    """``row 3 (map_id=level3/7)``: the batch index plus the row's id when the dataset has one."""
    for key in ("map_id", "id"):
        if example.get(key) is not None:
            return f"row {index} ({key}={example[key]})"
    return f"row {index}"
