"""LoRA (peft) for every stage: the adapter config, adapter checkpoints and the merged export.

* :func:`lora_config`: TRL's ``get_peft_config(model_args)`` (recipe keys ``use_peft``, ``lora_r``, ``lora_alpha``,
  ``lora_dropout``, ``lora_target_modules``, ...) narrowed to Mirage: LoRA on the language model's linear layers only
  (the vision tower stays frozen, as in the paper), and the rows of the three latent tokens trainable in the input
  embedding and in an untied LM head (``trainable_token_indices``: new tokens start from the mean embedding and
  must be learned; a whole trainable embedding would be 545M parameters on Qwen2.5-VL-7B). In SFT only: GRPO
  keeps them fixed (TRL's fused LM head reads ``lm_head.weight`` directly and would skip the trainable rows).
* An adapter checkpoint (a stage's ``output_dir`` with ``use_peft: true``) holds ``adapter_config.json`` +
  ``adapter_model.safetensors`` (LoRA weights and the latent token rows), the processor (with the latent tokens) and
  ``mirage_adapter.json`` (latent size, latent mode). :func:`load_adapter_model` rebuilds base + adapter.
* A stage that starts from an adapter checkpoint merges it into its base and, with ``use_peft``, trains a new adapter
  on top: the adapter-free model TRL uses as GRPO's reference (``beta > 0``) is then the previous stage's policy.
* :func:`export_merged` (``mirage-rl export``): base + adapter(s) merged into one full checkpoint, loadable by
  ``mirage-rl eval`` and any Qwen2.5-VL tool (vLLM for text-only models).
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
    """Record the latent tokens of the model an adapter trains (read back by :func:`load_adapter_model`)."""
    info = {"latent_size": getattr(model_config, "latent_size", None),
            "latent_token_ids": getattr(model_config, "latent_token_ids", None),
            "latent_mode": getattr(model_config, "latent_mode", None)}
    atomic_write_text(Path(output_dir) / ADAPTER_INFO, json.dumps(info, indent=1) + "\n")


def load_adapter_model(path, dtype, trust_remote_code: bool = False, attn_implementation: str | None = None):
    """Base model + the adapter in ``path``, merged: a plain ``Qwen2_5_VLForConditionalGeneration`` whose
    ``name_or_path`` is ``path`` (so that an adapter trained on top records ``path`` as its base).

    The base (``adapter_config.json``'s ``base_model_name_or_path``) may itself be an adapter folder: it is loaded the
    same way first. The latent tokens are added to the base as the adapter's processor and ``mirage_adapter.json``
    describe them, then the adapter's rows overwrite them.

    Raises:
        FileNotFoundError: the base model named in ``adapter_config.json`` cannot be found (says how to fix it).
        ValueError: the adapter's processor and ``mirage_adapter.json`` disagree on the latent tokens.
    """
    from peft import PeftModel

    from .modeling import add_latent_tokens, load_model, load_processor

    path = Path(path)
    cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    base_path = cfg.get("base_model_name_or_path")
    if not base_path:
        raise FileNotFoundError(f"{path / ADAPTER_CONFIG}: no base_model_name_or_path; set it to the model the adapter "
                                "was trained on")
    try:
        base = load_model(base_path, dtype=dtype, trust_remote_code=trust_remote_code,
                          attn_implementation=attn_implementation)
    except OSError as e:  # FileNotFoundError included; also a hub id that cannot be reached
        raise FileNotFoundError(f"{path}: cannot load its base model {base_path} (adapter_config.json, "
                                f"base_model_name_or_path): {e}; edit that key to where the base model is") from e
    info_file = path / ADAPTER_INFO
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    if info.get("latent_size"):
        processor = load_processor(path, trust_remote_code=trust_remote_code)
        tokens = add_latent_tokens(base, processor, int(info["latent_size"]))
        want = info.get("latent_token_ids")
        if want and want != {"start": tokens.start, "pad": tokens.pad, "end": tokens.end}:
            raise ValueError(f"{info_file}: latent_token_ids {want} but the adapter's tokenizer gives {tokens}; save "
                             "the adapter and its processor together")
    if info.get("latent_mode"):
        base.config.latent_mode = info["latent_mode"]
    model = PeftModel.from_pretrained(base, str(path), is_trainable=False).merge_and_unload()
    model.name_or_path = str(path)
    model.config._name_or_path = str(path)
    return model


def export_merged(adapter_dir, output_dir, dtype=None, trust_remote_code: bool = False) -> None:
    """Merge the adapter(s) of ``adapter_dir`` into its base and save a full checkpoint (safetensors + processor)
    to ``output_dir``, atomically. Raises ``FileNotFoundError`` when ``adapter_dir`` holds no adapter."""
    import torch

    from .modeling import load_processor, save_pretrained

    if not is_adapter_dir(adapter_dir):
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_CONFIG}; `mirage-rl export` merges a LoRA adapter "
                                "(a stage trained with use_peft: true)")
    model = load_adapter_model(adapter_dir, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code)
    model.name_or_path = model.config._name_or_path = str(output_dir)
    save_pretrained(model, load_processor(adapter_dir, trust_remote_code=trust_remote_code), output_dir)
