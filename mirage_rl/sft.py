"""``mirage-rl sft``: parse a recipe, load data and model, train stage 1 or 2, save (thin entry point)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from trl import ModelConfig

from . import latent
from .modeling import LatentTokens, add_latent_tokens, load_model, load_processor, save_pretrained
from .trainers import MirageSFTConfig, Stage1Trainer, Stage2Trainer

logger = logging.getLogger(__name__)


@dataclass
class SFTScriptArguments:
    """Data arguments of an SFT recipe."""

    dataset_path: str = field(default="outputs/data/vsp_spatial_planning",
                              metadata={"help": "A `datasets` folder written by `mirage-rl build-data`."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N rows only."})


def load_train_split(script_args: SFTScriptArguments):
    """Load the training split; raises ``ValueError`` naming the path when it is missing or empty."""
    from datasets import load_from_disk

    try:
        ds = load_from_disk(script_args.dataset_path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{script_args.dataset_path}: no dataset there; run `mirage-rl build-data` first") from e
    if hasattr(ds, "keys"):
        if script_args.dataset_split not in ds:
            raise ValueError(f"{script_args.dataset_path}: no split {script_args.dataset_split!r} (has {list(ds)})")
        ds = ds[script_args.dataset_split]
    if script_args.max_train_samples is not None:
        ds = ds.select(range(min(script_args.max_train_samples, len(ds))))
    if len(ds) == 0:
        raise ValueError(f"{script_args.dataset_path}[{script_args.dataset_split}] is empty")
    return ds


def load_model_and_processor(model_args: ModelConfig):
    """The model (``model_args.dtype``, default float32; vision tower frozen) and processor of a recipe."""
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    model = load_model(model_args.model_name_or_path, dtype=dtype or torch.float32,
                       trust_remote_code=getattr(model_args, "trust_remote_code", False),
                       attn_implementation=model_args.attn_implementation)
    return model, load_processor(model_args.model_name_or_path)


def run_sft(script_args: SFTScriptArguments, training_args: MirageSFTConfig, model_args: ModelConfig):
    """Train one SFT stage and save model + processor to ``training_args.output_dir``; returns the trainer."""
    model, processor = load_model_and_processor(model_args)
    if training_args.train_vision_tower:
        latent.backbone(model).visual.requires_grad_(True)
    if training_args.latent_mode != "none":
        has = getattr(model.config, "latent_token_ids", None) is not None
        if not has and training_args.stage == 1:
            # stage 1 is the entry point for a stock Qwen2.5-VL checkpoint
            add_latent_tokens(model, processor, training_args.latent_size)
        LatentTokens.from_config(model.config, where=model_args.model_name_or_path)
    train = load_train_split(script_args)
    trainer_cls = Stage1Trainer if training_args.stage == 1 else Stage2Trainer
    trainer = trainer_cls(model=model, args=training_args, train_dataset=train, processing_class=processor)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if trainer.accelerator.is_main_process:
        final = trainer.accelerator.unwrap_model(trainer.model)
        # evaluation decodes the way the checkpoint was trained (hidden, dummy or none) unless told otherwise
        final.config.latent_mode = training_args.latent_mode
        save_pretrained(final, processor, training_args.output_dir)
    return trainer
