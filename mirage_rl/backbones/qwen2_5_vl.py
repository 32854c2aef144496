"""Qwen2.5-VL (``qwen2_5_vl``): the family of Mirage's paper (Qwen2.5-VL-7B-Instruct).

Vision: patch 14, spatial merge 2 (one merged visual token is 28 x 28 px), no DeepStack. Positions: mRoPE with
contiguous frequency blocks (``mrope_section``, e.g. [16, 24, 24] of a 128-dim head).
"""

from __future__ import annotations

from transformers import Qwen2_5_VLProcessor
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward

from .base import QWEN_CHAT_TEMPLATE, Backbone, NoVideoProcessorMixin, mrope_section


class MirageProcessor(NoVideoProcessorMixin, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the video processor (which needs torchvision).

    Loads any Qwen2.5-VL processor folder (e.g. ``Qwen/Qwen2.5-VL-7B-Instruct``) for images and text; saves a folder
    that reads as a stock ``Qwen2_5_VLProcessor`` (:class:`~mirage_rl.backbones.base.NoVideoProcessorMixin`)."""

    stock_name = "Qwen2_5_VLProcessor"
    video_processor_type = "Qwen2VLVideoProcessor"


class Qwen25VL(Backbone):
    model_type = "qwen2_5_vl"
    name = "Qwen2.5-VL"
    example = "Qwen/Qwen2.5-VL-7B-Instruct"
    stock_processor = "Qwen2_5_VLProcessor"
    token_pixels = 28
    tiny_dir = "outputs/models/tiny-qwen2.5-vl"
    eager_attention = staticmethod(eager_attention_forward)
    model_class_name = "Qwen2_5_VLForConditionalGeneration"

    @property
    def processor_class(self):
        return MirageProcessor

    def tiny_pixels(self) -> tuple[int, int]:
        from ..data.images import TINY_MAX_PIXELS, TINY_MIN_PIXELS

        return TINY_MIN_PIXELS, TINY_MAX_PIXELS  # 168 x 168 px = 6 x 6 merged tokens

    def tiny_config(self, vocab_size, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, token_ids=None,
                    eos_token_id=None, pad_token_id=None, rope_theta=10000.0, vision_hidden=64, vision_depth=2):
        from transformers import Qwen2_5_VLConfig

        section = mrope_section(hidden_size // num_heads, (16, 24, 24))
        text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 3,
                    num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                    bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                    max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": section})
        vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                      num_heads=2, out_hidden_size=hidden_size, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=112, fullatt_block_indexes=[vision_depth - 1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **(token_ids or {}))

    def tiny_image_processor(self, min_pixels, max_pixels):
        from transformers import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


QWEN2_5_VL = Qwen25VL()
CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE
