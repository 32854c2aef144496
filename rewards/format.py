"""The format reward (Mirage, arXiv 2506.17218, RL stage: accuracy 1 + format 0.1)."""

from __future__ import annotations

from mirage_rl.tokens import LATENT_END, LATENT_PAD, LATENT_START

from ._text import MAX_COMPLETION_CHARS, boxed_answers, completion_text


def latent_blocks(text: str) -> tuple[int, bool, int]:
    """Count latent blocks in a completion decoded with its latent tokens.

    Returns:
        ``(blocks, well_formed, end_of_last_block)``: the number of ``<|latent_start|>``; whether every block is
        ``<|latent_start|>`` + one or more ``<|latent_pad|>`` + ``<|latent_end|>`` with no stray latent token
        outside; the character offset after the last block (0 without blocks).
    """
    blocks, pos, end = 0, 0, 0
    while True:
        i = text.find(LATENT_START, pos)
        if i == -1:
            break
        blocks += 1
        j = i + len(LATENT_START)
        pads = 0
        while text.startswith(LATENT_PAD, j):
            j += len(LATENT_PAD)
            pads += 1
        if pads == 0 or not text.startswith(LATENT_END, j):
            return blocks, False, 0
        if any(t in text[pos:i] for t in (LATENT_PAD, LATENT_END)):  # a stray latent token before this block
            return blocks, False, 0
        pos = end = j + len(LATENT_END)
    stray = any(t in text[end:] for t in (LATENT_PAD, LATENT_END))
    return blocks, not stray, end


def format_reward(completions, latent_blocks_expected: int = 1, **kwargs) -> list[float]:
    """1.0 when a completion has exactly ``latent_blocks_expected`` well-formed latent blocks, then exactly one
    ``\\boxed{...}`` answer with balanced braces after the last block; else 0.0.

    Completions must be decoded with the latent tokens kept (``MirageGRPOTrainer`` does this). Direct-SFT
    arms, which reason without a latent block, set ``latent_blocks_expected: 0``. A completion longer than
    ``MAX_COMPLETION_CHARS`` scores 0.0.
    Raises:
        ValueError: ``latent_blocks_expected`` < 0.
    """
    if latent_blocks_expected < 0:
        raise ValueError(f"format_reward: latent_blocks_expected must be >= 0, got {latent_blocks_expected}")
    out = []
    for completion in completions:
        text = completion_text(completion)
        if len(text) > MAX_COMPLETION_CHARS:
            out.append(0.0)
            continue
        blocks, ok, end = latent_blocks(text)
        boxes = boxed_answers(text[end:])
        good = (ok and blocks == latent_blocks_expected and len(boxes) == 1 and boxes[0] is not None
                and boxes[0].strip() != "" and "\\boxed{" not in text[:end])
        out.append(1.0 if good else 0.0)
    return out
