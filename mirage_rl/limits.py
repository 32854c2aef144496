"""Bounded work: every length a user can set is checked against what the model and the machine can hold, before the
work starts (issue 29, class 2).

* :func:`check_new_tokens`: decoding (``eval``'s ``max_new_tokens``, GRPO's ``max_completion_length``, the latent
  interventions): prompt + new tokens must fit the model's positions (``max_position_embeddings`` of the text
  model), and the KV cache of the whole batch at that length must fit the memory that is free. Refused with one line.
* :func:`clamp_max_length`: SFT's ``max_length`` (a cap on a row, never a size that is allocated): above the model's
  positions it is lowered to them, with a message.
* :func:`check_memory`: any other size a user types that is allocated whole (``create-model``'s sizes,
  ``build-data``'s generated rows), against the free memory.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

#: the share of the free memory a KV cache may take (the model, activations and the allocator need the rest)
MEMORY_SHARE = 0.5


def position_limit(config) -> int | None:
    """The most positions the model's text decoder was built for (``max_position_embeddings``), or None."""
    text = getattr(config, "text_config", None) or config
    limit = getattr(text, "max_position_embeddings", None)
    return int(limit) if limit else None


def kv_bytes_per_token(config, dtype_bytes: int = 4) -> int:
    """Bytes of the KV cache per token and row: 2 (keys, values) x layers x key-value heads x head dim x dtype bytes."""
    text = getattr(config, "text_config", None) or config
    heads = getattr(text, "num_attention_heads", 1)
    kv = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv * head_dim * dtype_bytes


def free_memory_bytes(device=None) -> int | None:
    """Free memory where the cache would live: the CUDA device's free memory, else ``MemAvailable`` of
    ``/proc/meminfo``; None when it cannot be read."""
    import torch

    if device is not None and getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_new_tokens(config, max_new_tokens: int, prompt_tokens: int = 0, batch: int = 1, option: str =
                     "max_new_tokens", dtype_bytes: int = 4, device=None) -> None:
    """Refuse a decode that cannot fit: ``prompt_tokens + max_new_tokens`` above the model's positions, or a KV cache
    of ``batch`` rows at that length above :data:`MEMORY_SHARE` of the free memory.

    Raises:
        ValueError: one line naming ``option``, the figures and the largest value that fits.
    """
    limit = position_limit(config)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        fit = max(limit - prompt_tokens, 0)
        raise ValueError(f"{option}={max_new_tokens}: with a prompt of {prompt_tokens} tokens that needs "
                         f"{prompt_tokens + max_new_tokens} positions, more than the model's max_position_embeddings "
                         f"({limit}); set {option} to at most {fit}")
    free = free_memory_bytes(device)
    need = kv_bytes_per_token(config, dtype_bytes) * (prompt_tokens + max_new_tokens) * batch
    if free is not None and need > MEMORY_SHARE * free:
        per_row = kv_bytes_per_token(config, dtype_bytes) * batch
        fit = max(int(MEMORY_SHARE * free // per_row) - prompt_tokens, 0)
        raise ValueError(f"{option}={max_new_tokens}: the KV cache of {batch} row(s) at {prompt_tokens + max_new_tokens} "
                         f"tokens needs {need / 2**30:.1f} GiB, more than half of the {free / 2**30:.1f} GiB free; set "
                         f"{option} to at most {fit} or decode fewer rows at once")


def clamp_max_length(config, max_length: int | None, option: str = "max_length") -> int | None:
    """SFT's row cap: above the model's positions it is lowered to them (logged); returns the value to use."""
    limit = position_limit(config)
    if limit is not None and max_length is not None and max_length > limit:
        logger.info("%s=%d is more than the model's max_position_embeddings (%d): a row is capped at %d tokens",
                    option, max_length, limit, limit)
        return limit
    return max_length


def check_memory(need_bytes: float, what: str, fix: str, device=None) -> None:
    """Refuse work that would allocate ``need_bytes`` (an estimate) when that is more than :data:`MEMORY_SHARE` of the
    free memory.

    Raises:
        ValueError: one line naming ``what``, the estimate, the free memory and ``fix``.
    """
    free = free_memory_bytes(device)
    if free is not None and need_bytes > MEMORY_SHARE * free:
        raise ValueError(f"{what} needs about {need_bytes / 2**30:.1f} GiB, more than half of the {free / 2**30:.1f} "
                         f"GiB free; {fix}")
