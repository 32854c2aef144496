"""The backbone interface: what differs between model families, behind one small class (issue 32).

The latent core (:mod:`mirage_rl.latent`), the trainers, generation, the interventions and the image cache call only
this interface; each family (:mod:`.qwen2_5_vl`, :mod:`.qwen3_vl`) is one instance of :class:`Backbone`, chosen from the
checkpoint's ``model_type`` (:func:`mirage_rl.backbones.of`). It covers

* the vision tower's output per image (:class:`ImageFeatures`: the merged visual tokens, and the DeepStack features
  where the family has them) and the ``get_image_features`` output object built back from it (the image cache);
* the position ids of a sequence (mRoPE, from ``get_rope_index``: always explicit, never the model's kept state);
* the injection of visual features into the decoder's hidden states after its first layers (DeepStack,
  :class:`VisualInjection`), which every decoder call on image tokens must pass;
* the family's eager attention function (the fallback of the shared-prefix attention);
* the processor class and the tiny-model factory (config, image processor, pixel bounds).

Shapes: ``B`` batch, ``L`` sequence length, ``H`` decoder hidden size, ``N`` image tokens in a batch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, NamedTuple

import torch

#: the processor files a saved checkpoint holds besides the tokenizer's (see :class:`NoVideoProcessorMixin`)
PROCESSOR_CONFIG = "processor_config.json"
VIDEO_PROCESSOR_CONFIG = "video_preprocessor_config.json"

# The chat template of the tiny models (Qwen2.5-VL's: system prompt added when absent, images as
# vision_start/image_pad/vision_end). A hub checkpoint keeps its own template.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['text'] is not none %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ImageFeatures(NamedTuple):
    """The vision tower's output for one image."""

    merged: torch.Tensor  #: ``(n, H)``: the merged visual tokens (what the image tokens' input embeddings become)
    deepstack: tuple[torch.Tensor, ...] = ()  #: one ``(n, H)`` per DeepStack layer (empty: the family has none)


@dataclasses.dataclass
class VisualInjection:
    """Features added to the decoder's hidden states at the image-token positions after its first layers (Qwen3-VL's
    DeepStack, arXiv 2406.04334: after decoder layer i, feature i is added there). A decoder call on columns that hold
    image tokens must receive the injection of those columns (:meth:`columns`), else it computes another model.

    Attributes:
        mask: ``(B, L)`` bool, the image-token positions.
        layers: one ``(N, H)`` tensor per injected layer, ``N = mask.sum()``, in row-major order of ``mask``.
        keywords: the decoder's argument names for ``mask`` and ``layers``.
    """

    mask: torch.Tensor
    layers: list[torch.Tensor]
    keywords: tuple[str, str]

    def columns(self, start: int, end: int) -> "VisualInjection | None":
        """The injection of columns ``start..end-1`` (None when they hold no image token)."""
        sel = self.mask[:, start:end]
        if not bool(sel.any()):
            return None
        order = self.mask.flatten().long().cumsum(0).view(self.mask.shape) - 1
        idx = order[:, start:end][sel]
        return VisualInjection(sel, [x[idx] for x in self.layers], self.keywords)

    def rows(self, index: torch.Tensor) -> "VisualInjection | None":
        """The injection of the batch rows ``index`` ``(R,)`` long, in that order (None: they hold no image token)."""
        counts = self.mask.sum(1).tolist()
        starts = [sum(counts[:i]) for i in range(len(counts))]
        picked = [torch.arange(starts[i], starts[i] + counts[i], device=self.mask.device) for i in index.tolist()]
        idx = torch.cat(picked) if picked else self.mask.new_zeros(0, dtype=torch.long)
        if idx.numel() == 0:
            return None
        return VisualInjection(self.mask[index], [x[idx] for x in self.layers], self.keywords)

    def realign(self, cols: torch.Tensor, width: int) -> "VisualInjection":
        """The injection on a layout whose column ``cols[b, j]`` holds original column ``j`` of row ``b``
        (``cols`` ``(B, L)`` long, strictly increasing per row: the row-major order of the features is kept)."""
        B, L = self.mask.shape
        mask = self.mask.new_zeros(B, width)
        mask[torch.arange(B, device=cols.device)[:, None].expand(B, L), cols] = self.mask
        return VisualInjection(mask, self.layers, self.keywords)

    def kwargs(self) -> dict:
        """The decoder's keyword arguments for this injection."""
        return {self.keywords[0]: self.mask, self.keywords[1]: list(self.layers)}


def inject(injection: VisualInjection | None, start: int | None = None, end: int | None = None) -> dict:
    """The decoder keyword arguments of ``injection`` (restricted to columns ``start..end-1`` when given); ``{}`` for
    none."""
    if injection is None:
        return {}
    if start is not None:
        injection = injection.columns(start, end)
        if injection is None:
            return {}
    return injection.kwargs()


class NoVideoProcessorMixin:
    """A Qwen-style processor without its video processor (which needs torchvision, which has no CPU build here).

    Loads any processor folder of the family (a hub checkpoint's included) for images and text; ``save_pretrained``
    writes a folder that reads as the stock processor (``processor_class`` = :attr:`stock_name`, plus a
    ``video_preprocessor_config.json`` derived from the image processor's settings), so that vLLM, which builds the
    stock processor, loads it."""

    stock_name = ""
    video_processor_type = ""
    #: the image processor class every checkpoint of the family is read with (PIL backend)
    image_processor_class = "Qwen2VLImageProcessorPil"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # `get_attributes` reads this signature: without `video_processor` no video class is looked up
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        import transformers
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        # the PIL image processor, whatever the folder names: the torchvision one needs torchvision (no CPU build
        # here), and without it transformers 5.17 makes AutoImageProcessor itself a placeholder that raises; the
        # collator, the tests and every figure use PIL's resize
        options = {k: v for k, v in kwargs.items() if k != "trust_remote_code"}
        image_processor = getattr(transformers, cls.image_processor_class).from_pretrained(path, **options)
        template = getattr(tokenizer, "chat_template", None) or QWEN_CHAT_TEMPLATE
        return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)

    def save_pretrained(self, save_directory, *args, **kwargs):
        out = super().save_pretrained(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        config = folder / PROCESSOR_CONFIG
        data = json.loads(config.read_text()) if config.is_file() else {}
        data["processor_class"] = self.stock_name
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        ip = self.image_processor
        video = {"video_processor_type": self.video_processor_type, "processor_class": self.stock_name,
                 "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                 "image_mean": list(ip.image_mean), "image_std": list(ip.image_std),
                 "rescale_factor": ip.rescale_factor, "patch_size": ip.patch_size, "merge_size": ip.merge_size,
                 "temporal_patch_size": ip.temporal_patch_size, "size": dict(ip.size)}
        (folder / VIDEO_PROCESSOR_CONFIG).write_text(json.dumps(video, indent=2, sort_keys=True) + "\n")
        return out


class Backbone:
    """One model family. Subclasses set the class attributes and override what differs; the defaults are the
    Qwen2-VL lineage's (``get_image_features`` / ``get_rope_index`` on the backbone ``model.model``)."""

    model_type: str = ""  #: the checkpoints' ``config.model_type``
    name: str = ""  #: for messages: "Qwen2.5-VL"
    example: str = ""  #: a hub checkpoint of the family, for messages and recipes
    stock_processor: str = ""  #: the stock processor class name (vLLM builds it)
    token_pixels: int = 28  #: side of one merged visual token, pixels (patch size x spatial merge)
    tiny_dir: str = ""  #: ``create-model``'s default output folder
    eager_attention: Callable | None = None  #: the family's eager attention function

    # ---- model and processor classes -----------------------------------------------------------------------------
    model_class_name: str = ""  #: the stock ``*ForConditionalGeneration`` class in ``transformers``

    @property
    def model_class(self):
        """The stock ``*ForConditionalGeneration`` class (a subclass would not reload its weights in transformers 5)."""
        import transformers

        return getattr(transformers, self.model_class_name)

    @property
    def processor_class(self):
        """The processor class (a :class:`NoVideoProcessorMixin` over the stock one)."""
        raise NotImplementedError

    # ---- vision ------------------------------------------------------------------------------------------------
    def split_encoder_output(self, out, image_grid_thw: torch.Tensor) -> list[ImageFeatures]:
        """``get_image_features``'s output as one :class:`ImageFeatures` per image (row of ``image_grid_thw``)."""
        return [ImageFeatures(f) for f in out.pooler_output]

    def encoder_output(self, features: list[ImageFeatures]):
        """The inverse of :meth:`split_encoder_output`: what ``get_image_features`` returns for these images (the image
        cache answers with it)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=tuple(f.merged for f in features))

    def image_features(self, inner, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[ImageFeatures]:
        """Every image through the backbone ``inner``'s ``get_image_features`` (the one call the image cache wraps).

        Args:
            pixel_values: ``(P, C*T*p*p)`` flattened patches. image_grid_thw: ``(N_images, 3)`` long.
        """
        out = inner.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        return self.split_encoder_output(out, image_grid_thw)

    def packed(self, features: ImageFeatures) -> torch.Tensor:
        """One image's features as one ``(n, H * (1 + D))`` tensor: the merged visual tokens, then each of the ``D``
        DeepStack features along the last dim (what vLLM takes as an image's ``image_embeds``; ``(n, H)`` without)."""
        return torch.cat([features.merged, *features.deepstack], -1) if features.deepstack else features.merged

    def injection(self, image_mask: torch.Tensor, features: list[ImageFeatures]) -> VisualInjection | None:
        """What the decoder adds at the image positions ``image_mask`` ``(B, L)`` bool after its first layers (None for
        a family without DeepStack)."""
        return None

    # ---- positions ----------------------------------------------------------------------------------------------
    def rope_index(self, inner, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   mm_token_type_ids: torch.Tensor | None, image_grid_thw: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(position_ids (3, B, L) long, deltas (B, 1))`` of a sequence with images (the family's ``get_rope_index``).

        Raises:
            ValueError: images without ``mm_token_type_ids`` (which tokens are image tokens): without them the model
                would fall back to 1-D positions, silently wrong.
        """
        if mm_token_type_ids is None:
            raise ValueError(f"{self.name}: image inputs need mm_token_type_ids (which tokens are image tokens) for "
                             "their mRoPE positions; pass the processor's mm_token_type_ids")
        return inner.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
                                    attention_mask=attention_mask)

    # ---- the tiny model ----------------------------------------------------------------------------------------------
    def tiny_pixels(self) -> tuple[int, int]:
        """``(min_pixels, max_pixels)`` of the tiny image processor: every VSP map (192..384 px square) becomes 6 x 6
        merged visual tokens."""
        side = 6 * self.token_pixels
        return (side - 4) ** 2, (side + 4) ** 2

    def tiny_config(self, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                    token_ids: dict, eos_token_id: int, pad_token_id: int, rope_theta: float):
        """A small config of the family (same architecture as the released models, other sizes)."""
        raise NotImplementedError

    def tiny_image_processor(self, min_pixels: int, max_pixels: int):
        """The tiny model's image processor (PIL backend: no torchvision)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<backbone {self.model_type}>"


def mrope_section(head_dim: int, ratio: tuple[int, int, int]) -> list[int]:
    """An mRoPE section (temporal, height, width frequency counts) summing to ``head_dim / 2`` in about ``ratio``."""
    half = head_dim // 2
    t = max(1, round(half * ratio[0] / sum(ratio)))
    h = (half - t) // 2
    return [t, h, half - t - h]
