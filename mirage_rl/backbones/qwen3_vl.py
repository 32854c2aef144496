"""Qwen3-VL (``qwen3_vl``): Qwen3-VL-8B-Instruct and its family (issue 32).

What differs from Qwen2.5-VL (checked in transformers 5.17 and 5.23, ``models/qwen3_vl/modeling_qwen3_vl.py``):

* **DeepStack.** The vision tower returns, besides the merged visual tokens, one feature per
  ``deepstack_visual_indexes`` (features of intermediate vision layers through their own mergers). After decoder layer
  i the text model adds feature i to the hidden states at the image-token positions (``visual_pos_masks``,
  ``deepstack_visual_embeds``). Every decoder call on image tokens must pass them (:meth:`Qwen3VL.injection`); latent
  slots are text positions and never receive them. Stage 1 distils the merged visual tokens alone (what an image
  token's *input* is, the space a latent slot's input lives in); the DeepStack features are residual additions inside
  the first decoder layers, with no input-space counterpart (docs/ARCHITECTURE.md, "Backbones").
* **Interleaved MRoPE.** The t/h/w frequencies are interleaved with stride 3 (``mrope_interleaved``), inside the
  rotary embedding; ``get_rope_index`` requires ``mm_token_type_ids``. ``inputs_embeds`` with an image and no
  ``position_ids`` runs silently with wrong positions: mirage-rl always passes explicit ones.
* Vision patch 16, spatial merge 2: one merged visual token is 32 x 32 px. Attention has q/k norms (inside the
  attention module: the shared-prefix attention function is unchanged).
* transformers 5.17 returns each DeepStack feature for all images at once, 5.23 split per image: both are read.
"""

from __future__ import annotations

import torch
from transformers import Qwen3VLProcessor
from transformers.models.qwen3_vl.modeling_qwen3_vl import eager_attention_forward

from .base import Backbone, ImageFeatures, NoVideoProcessorMixin, VisualInjection, mrope_section


class MirageQwen3VLProcessor(NoVideoProcessorMixin, Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without the video processor (which needs torchvision); saves a folder that reads as a stock
    ``Qwen3VLProcessor`` (:class:`~mirage_rl.backbones.base.NoVideoProcessorMixin`)."""

    stock_name = "Qwen3VLProcessor"
    video_processor_type = "Qwen3VLVideoProcessor"


class Qwen3VL(Backbone):
    model_type = "qwen3_vl"
    name = "Qwen3-VL"
    example = "Qwen/Qwen3-VL-8B-Instruct"
    stock_processor = "Qwen3VLProcessor"
    token_pixels = 32
    tiny_dir = "outputs/models/tiny-qwen3-vl"
    eager_attention = staticmethod(eager_attention_forward)
    model_class_name = "Qwen3VLForConditionalGeneration"

    @property
    def processor_class(self):
        return MirageQwen3VLProcessor

    def split_encoder_output(self, out, image_grid_thw):
        sizes = [f.shape[0] for f in out.pooler_output]
        per_layer = []
        for feat in out.deepstack_features or []:  # 5.23: per image already; 5.17: all images in one tensor
            per_layer.append(tuple(feat) if isinstance(feat, (tuple, list)) else torch.split(feat, sizes))
        return [ImageFeatures(f, tuple(layer[i] for layer in per_layer)) for i, f in enumerate(out.pooler_output)]

    def encoder_output(self, features):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        layers = len(features[0].deepstack) if features else 0
        per_layer = [tuple(f.deepstack[i] for f in features) for i in range(layers)]
        if not _deepstack_split_per_image():
            per_layer = [torch.cat(x, 0) for x in per_layer]
        return BaseModelOutputWithDeepstackFeatures(pooler_output=tuple(f.merged for f in features),
                                                   deepstack_features=per_layer)

    def injection(self, image_mask, features):
        layers = len(features[0].deepstack) if features else 0
        if not layers:
            return None
        embeds = [torch.cat([f.deepstack[i] for f in features], 0) for i in range(layers)]
        return VisualInjection(image_mask, embeds, ("visual_pos_masks", "deepstack_visual_embeds"))

    def tiny_config(self, vocab_size, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, token_ids=None,
                    eos_token_id=None, pad_token_id=None, rope_theta=10000.0, vision_hidden=64, vision_depth=3):
        """A small ``Qwen3VLConfig``. head_dim = hidden_size / num_heads (32 with the defaults: vLLM's CPU attention
        needs >= 32); DeepStack from the first two of ``vision_depth`` vision layers (Qwen3-VL-8B: 3 of 27)."""
        from transformers import Qwen3VLConfig

        head_dim = hidden_size // num_heads
        section = mrope_section(head_dim, (24, 20, 20))
        text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 3,
                    num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                    head_dim=head_dim, bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                    max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": section,
                                     "mrope_interleaved": True})
        vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                      num_heads=2, out_hidden_size=hidden_size, patch_size=16, spatial_merge_size=2,
                      temporal_patch_size=2, num_position_embeddings=256,
                      deepstack_visual_indexes=list(range(min(2, vision_depth))))
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **(token_ids or {}))

    def tiny_image_processor(self, min_pixels, max_pixels):
        from transformers import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=16, merge_size=2,
                                        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def _deepstack_split_per_image() -> bool:
    """Whether this transformers' ``Qwen3VLModel.get_image_features`` splits the DeepStack features per image (5.23)
    or returns one tensor per layer (5.17); read from its source once."""
    global _SPLIT
    if _SPLIT is None:
        import inspect

        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

        _SPLIT = "torch.split(feat" in inspect.getsource(Qwen3VLModel.get_image_features)
    return _SPLIT


_SPLIT: bool | None = None
QWEN3_VL = Qwen3VL()
