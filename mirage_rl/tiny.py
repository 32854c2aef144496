"""The tiny offline default: a model of about a million parameters of a supported family (Qwen2.5-VL by default,
Qwen3-VL with ``backbone="qwen3_vl"``) built from a config, with a byte-level BPE tokenizer trained on the task text and
an image processor that turns every VSP map into 6 x 6 merged visual tokens. It goes through exactly the code path of
the released 7B / 8B models (:func:`mirage_rl.modeling.add_latent_tokens`, ``save_pretrained``,
:func:`mirage_rl.modeling.load_model`); only the sizes differ. The family's specifics (config, image processor) come
from :mod:`mirage_rl.backbones`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import backbones
from .backbones.base import QWEN_CHAT_TEMPLATE
from .modeling import add_latent_tokens, save_pretrained

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]


def train_tokenizer(texts: list[str], vocab_size: int = 2048):
    """Train a byte-level BPE on ``texts`` and wrap it as a ``Qwen2Tokenizer`` with Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(QWEN_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = Qwen2Tokenizer(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         additional_special_tokens=QWEN_SPECIAL_TOKENS[1:], padding_side="left")
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def tiny_corpus() -> list[str]:
    """Task text for the tiny tokenizer: VSP prompts, plans in words and letters, and generic answers."""
    from .tasks.vsp_planning import prompts as vsp

    words = ["LEFT", "RIGHT", "UP", "DOWN", "L", "R", "U", "D"]
    plans = [", ".join(words[(i * 7 + j * 3) % 4] for j in range(i % 9 + 1)) for i in range(200)]
    letters = [",".join(words[4 + (i + j) % 4] for j in range(i % 9 + 1)) for i in range(200)]
    extra = ["\\boxed{A}", "\\boxed{B}", "\\boxed{C}", "The answer is", "<think> </think>", "Visualize the board"]
    return [vsp.TRAIN_PROMPT, vsp.TEST_PROMPT] * 20 + [f"\\boxed{{{p}}}" for p in plans + letters] + extra * 10


def tiny_config(vocab_size: int, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                num_kv_heads: int = 2, token_ids: dict | None = None, eos_token_id: int | None = None,
                pad_token_id: int | None = None, rope_theta: float = 10000.0, backbone: str = backbones.DEFAULT,
                **vision):
    """A small config of ``backbone``'s family (same architecture as its released models, other sizes):
    :meth:`mirage_rl.backbones.base.Backbone.tiny_config`.

    ``rope_theta``: base of the (multimodal) rotary embedding. mRoPE gives the image's row and column the lowest
    frequencies of each head; with a head of 32 dims and the default 10000 a column step turns the query by at most
    0.003 rad, so a small model cannot tell the columns of a map apart. The ``*_small`` recipes use 10 (column steps
    of 0.12..0.24 rad).
    """
    return backbones.get(backbone, "tiny_config").tiny_config(
        vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
        token_ids=token_ids, eos_token_id=eos_token_id, pad_token_id=pad_token_id, rope_theta=rope_theta, **vision)


def create_tiny_model(output_dir: str | Path, latent_size: int | None = 4, hidden_size: int = 128,
                      num_layers: int = 4, vocab_size: int = 2048, seed: int = 0, rope_theta: float = 10000.0,
                      min_pixels: int | None = None, max_pixels: int | None = None,
                      command: str = "save_pretrained", backbone: str = backbones.DEFAULT):
    """Build, save and return ``(model, processor)`` of the tiny offline default.

    Steps: train the tokenizer on :func:`tiny_corpus`, build a model of ``backbone``'s family from :func:`tiny_config`
    with random weights (seeded), add the latent tokens through :func:`add_latent_tokens` (the same
    call a 7B checkpoint goes through) and ``save_pretrained`` model and processor to ``output_dir``.
    ``latent_size=None`` leaves the latent tokens out: a checkpoint shaped like a stock one of the family.
    ``min_pixels``/``max_pixels``: the image processor's area bounds (pixels; default the family's
    :meth:`~mirage_rl.backbones.base.Backbone.tiny_pixels`); a 256 x 256 VSP map becomes 168 x 168 (Qwen2.5-VL) or
    192 x 192 (Qwen3-VL) px, 6 x 6 visual tokens, with the defaults; 112 x 112 (4 x 4 tokens of Qwen2.5-VL) with
    ``max_pixels=113 * 113``.

    Raises:
        ValueError: ``min_pixels`` above ``max_pixels``.
    """
    family = backbones.get(backbone, "create_tiny_model")
    lo, hi = family.tiny_pixels()
    min_pixels, max_pixels = min_pixels or lo, max_pixels or hi
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels={min_pixels} is above max_pixels={max_pixels}: lower min_pixels")
    torch.manual_seed(seed)
    tok = train_tokenizer(tiny_corpus(), vocab_size=vocab_size)
    image_processor = family.tiny_image_processor(min_pixels, max_pixels)
    processor = family.processor_class(image_processor=image_processor, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in {
        "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}.items()}
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    config = tiny_config(len(tok), hidden_size=hidden_size, num_layers=num_layers, token_ids=ids,
                         eos_token_id=im_end, pad_token_id=tok.pad_token_id, rope_theta=rope_theta, backbone=backbone)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = None, im_end, tok.pad_token_id
    model = family.model_class(config)
    model.generation_config.eos_token_id = [im_end, tok.pad_token_id]
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = tok.pad_token_id
    if latent_size is not None:
        add_latent_tokens(model, processor, latent_size)
    save_pretrained(model, processor, output_dir, command=command)
    return model, processor
