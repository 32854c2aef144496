"""The tiny offline default: a Qwen2.5-VL of about a million parameters built from a config, with a byte-level BPE
tokenizer trained on the task text and an image processor that turns every VSP map into a few merged visual tokens.
It goes through exactly the code path of Qwen2.5-VL-7B (:func:`mirage_rl.modeling.add_latent_tokens`,
``save_pretrained``, :func:`mirage_rl.modeling.load_model`); only the sizes differ.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from .data.images import TINY_MAX_PIXELS, TINY_MIN_PIXELS
from .modeling import QWEN2_5_VL_CHAT_TEMPLATE, MirageProcessor, add_latent_tokens, save_pretrained

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
    tok.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
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
                num_kv_heads: int = 2, vision_hidden: int = 64, vision_depth: int = 2, token_ids: dict | None = None,
                eos_token_id: int | None = None, pad_token_id: int | None = None, rope_theta: float = 10000.0):
    """A small ``Qwen2_5_VLConfig`` (same architecture as Qwen2.5-VL-7B, other sizes).

    ``rope_theta``: base of the (multimodal) rotary embedding. mRoPE gives the image's row and column the lowest
    frequencies of each head; with a head of 32 dims and the default 10000 a column step turns the query by at most
    0.003 rad, so a small model cannot tell the columns of a map apart. The ``*_small`` recipes use 10 (column steps
    of 0.12..0.24 rad).
    """
    head_dim = hidden_size // num_heads
    half = head_dim // 2  # mrope_section must sum to head_dim / 2
    t = half // 4
    section = [t, (half - t) // 2, half - t - (half - t) // 2]
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 3,
                num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": section})
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                  num_heads=2, out_hidden_size=hidden_size, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, fullatt_block_indexes=[vision_depth - 1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **(token_ids or {}))


def create_tiny_model(output_dir: str | Path, latent_size: int | None = 4, hidden_size: int = 128,
                      num_layers: int = 4, vocab_size: int = 2048, seed: int = 0, rope_theta: float = 10000.0,
                      min_pixels: int = TINY_MIN_PIXELS, max_pixels: int = TINY_MAX_PIXELS,
                      command: str = "save_pretrained"):
    """Build, save and return ``(model, processor)`` of the tiny offline default.

    Steps: train the tokenizer on :func:`tiny_corpus`, build a Qwen2.5-VL from :func:`tiny_config`
    with random weights (seeded), add the latent tokens through :func:`add_latent_tokens` (the same
    call a 7B checkpoint goes through) and ``save_pretrained`` model and processor to ``output_dir``.
    ``latent_size=None`` leaves the latent tokens out: a checkpoint shaped like a stock Qwen2.5-VL.
    ``min_pixels``/``max_pixels``: the image processor's area bounds (pixels); a 256 x 256 VSP map becomes
    168 x 168 (6 x 6 visual tokens) with the defaults, 112 x 112 (4 x 4 tokens) with ``max_pixels=113 * 113``.

    Raises:
        ValueError: ``min_pixels`` above ``max_pixels``.
    """
    from transformers import Qwen2VLImageProcessorPil

    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels={min_pixels} is above max_pixels={max_pixels}: lower min_pixels")
    torch.manual_seed(seed)
    tok = train_tokenizer(tiny_corpus(), vocab_size=vocab_size)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    processor = MirageProcessor(image_processor=image_processor, tokenizer=tok, chat_template=QWEN2_5_VL_CHAT_TEMPLATE)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in {
        "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}.items()}
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    config = tiny_config(len(tok), hidden_size=hidden_size, num_layers=num_layers, token_ids=ids,
                         eos_token_id=im_end, pad_token_id=tok.pad_token_id, rope_theta=rope_theta)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = None, im_end, tok.pad_token_id
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [im_end, tok.pad_token_id]
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = tok.pad_token_id
    if latent_size is not None:
        add_latent_tokens(model, processor, latent_size)
    save_pretrained(model, processor, output_dir, command=command)
    return model, processor
