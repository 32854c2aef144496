"""LoRA (peft) for every stage: the adapter config, adapter checkpoints and the merged export.

* :func:`lora_config`: TRL's ``get_peft_config(model_args)`` (recipe keys ``use_peft``, ``lora_r``, ``lora_alpha``,
  ``lora_dropout``, ``lora_target_modules``, ...) narrowed to Mirage: LoRA on the language model's linear layers only
  (the vision tower stays frozen, as in the paper), and the rows of the three latent tokens trainable in the input
  embedding and in an untied LM head (``trainable_token_indices``: new tokens start from the mean embedding and
  must be learned; a whole trainable embedding would be 545M parameters on Qwen2.5-VL-7B). In SFT only: GRPO
  keeps them fixed (TRL's fused LM head reads ``lm_head.weight`` directly and would skip the trainable rows).
* An adapter checkpoint (a stage's ``output_dir`` with ``use_peft: true``) holds ``adapter_config.json`` +
  ``adapter_model.safetensors`` (LoRA weights and the latent token rows), the processor (with the latent tokens) and
  ``mirage_adapter.json`` (latent size, latent mode). :func:`mirage_rl.modeling.load_adapter_model` rebuilds base + adapter.
* A stage that starts from an adapter checkpoint merges it into its base and, with ``use_peft``, trains a new adapter
  on top: the adapter-free model TRL uses as GRPO's reference (``beta > 0``) is then the previous stage's policy.
* :func:`mirage_rl.modeling.export_merged` (``mirage-rl export``): base + adapter(s) merged into one full checkpoint,
  loadable by ``mirage-rl eval`` and any Qwen2.5-VL tool (vLLM for text-only models).

Loading lives in :mod:`mirage_rl.modeling` (which imports this module; this module imports no part of the project but
the atomic writes).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .atomic import atomic_write_text

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_INFO = "mirage_adapter.json"
# LoRA targets: every linear layer of the decoder; the vision tower (``model.visual``) is never a target.
LANGUAGE_MODEL_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_TOWER = r".*\.visual\..*"


def is_adapter_dir(path) -> bool:
    """True when ``path`` is a local folder holding a peft adapter (``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def lora_config(model_args, model, latent_token_ids: list[int] | None):
    """The ``peft.LoraConfig`` of a recipe, or None without ``use_peft``.

    Args:
        model_args: TRL ``ModelConfig`` (``use_peft``, ``lora_*``); ``lora_target_modules`` unset means every linear
            layer of the language model.
        model: the model to wrap (its LM head tied or not decides where the latent rows are trainable).
        latent_token_ids: ids of ``<|latent_start|>``, ``<|latent_pad|>``, ``<|latent_end|>`` (None: no latent tokens).
    Raises:
        ValueError: ``lora_modules_to_save`` naming the vision tower (Mirage keeps it frozen).
    """
    from trl import get_peft_config

    config = get_peft_config(model_args)
    if config is None:
        return None
    if any("visual" in m for m in (config.modules_to_save or [])):
        raise ValueError(f"lora_modules_to_save={model_args.lora_modules_to_save}: the vision tower stays frozen in "
                         "Mirage (its features are the stage-1 targets); remove it")
    if config.target_modules is None:
        config.target_modules = LANGUAGE_MODEL_LINEARS
    config.exclude_modules = VISION_TOWER
    saved = set(config.modules_to_save or [])
    if latent_token_ids and not saved & {"embed_tokens", "lm_head"}:
        rows = sorted(latent_token_ids)
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        config.trainable_token_indices = {"embed_tokens": rows} if tied else {"embed_tokens": rows, "lm_head": rows}
    return config


def write_adapter_info(output_dir, model_config) -> None:
    """Record the latent tokens of the model an adapter trains (read back by :func:`mirage_rl.modeling.load_adapter_model`)."""
    info = {"latent_size": getattr(model_config, "latent_size", None),
            "latent_token_ids": getattr(model_config, "latent_token_ids", None),
            "latent_mode": getattr(model_config, "latent_mode", None)}
    atomic_write_text(Path(output_dir) / ADAPTER_INFO, json.dumps(info, indent=1) + "\n")
