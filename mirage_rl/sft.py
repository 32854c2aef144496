"""``mirage-rl sft``: parse a recipe, load data and model, train stage 1 or 2, save (thin entry point)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch
from trl import ModelConfig

from . import latent
from .atomic import atomic_write_text, commit_directory, recover_directory, temp_sibling
from .data.vsp import LATENT_MARKER
from .lora import is_adapter_dir, lora_config, write_adapter_info
from .modeling import add_latent_tokens, load_model, load_processor
from .trainers import MirageSFTConfig, Stage1Trainer, Stage2Trainer
from .trainers.checkpointing import resolve_resume

logger = logging.getLogger(__name__)


@dataclass
class SFTScriptArguments:
    """Data arguments of an SFT recipe."""

    dataset_path: str = field(default="outputs/data/vsp_spatial_planning",
                              metadata={"help": "A `datasets` folder written by `mirage-rl build-data`."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N rows only."})


def split_name(script_args: SFTScriptArguments) -> str:
    """``path[split]``: how errors name the training split."""
    return f"{script_args.dataset_path}[{script_args.dataset_split}]"


def require_columns(ds, need: list[str], where: str, who: str) -> None:
    """Raise ``ValueError`` naming ``where`` and the missing columns when ``ds`` lacks one of ``need``."""
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        raise ValueError(f"{where}: no column(s) {missing} (has {ds.column_names}); {who} needs {need}: "
                         "build the dataset with `mirage-rl build-data`")


def load_train_split(script_args: SFTScriptArguments):
    """Load the training split; raises ``ValueError`` naming the path when it is missing or empty."""
    from datasets import load_from_disk

    recover_directory(script_args.dataset_path, keep=())
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
        raise ValueError(f"{split_name(script_args)} is empty: rebuild it with "
                         "`mirage-rl build-data` (its build_report.json lists skipped rows)")
    return ds


def check_sft_dataset(ds, args: MirageSFTConfig, where: str) -> None:
    """Check a training split before any step runs (text columns only; images were decoded by the builder).

    Checks: the columns the stage needs exist; with latent tokens every ``answer`` holds ``args.latent_blocks``
    ``<output_image>`` markers; in stage 1 no ``helper_image`` is missing.
    Raises:
        ValueError: naming ``where``, the row and its ``map_id``, what is wrong and how to fix it.
    """
    from datasets import Image

    need = ["prompt", "image", "answer"] + (["helper_image"] if args.stage == 1 else [])
    require_columns(ds, need, where, f"stage {args.stage}")
    ids = ds["map_id"] if "map_id" in ds.column_names else [None] * len(ds)

    def row(i):
        return f"{where} row {i}" + (f" (map_id={ids[i]})" if ids[i] is not None else "")

    if args.latent_mode != "none" and args.latent_blocks is not None:
        for i, answer in enumerate(ds["answer"]):
            n = (answer or "").count(LATENT_MARKER)
            if n != args.latent_blocks:
                raise ValueError(f"{row(i)}: answer has {n} {LATENT_MARKER} marker(s), latent_mode "
                                 f"{args.latent_mode!r} needs {args.latent_blocks} (latent_blocks); fix the row, rebuild "
                                 "with skip_bad_rows: true, or set latent_blocks: null to allow any number")
    if args.stage == 1:
        helpers = ds.cast_column("helper_image", Image(decode=False))["helper_image"]
        for i, h in enumerate(helpers):
            if h is None or (h.get("bytes") is None and h.get("path") is None):
                raise ValueError(f"{row(i)}: helper_image is missing; stage 1 teacher-forces the latent slots with the "
                                 "helper image: add it or drop the row")


def load_model_and_processor(model_args: ModelConfig, trust_remote_code: bool = False):
    """The model (``model_args.dtype``, default float32; vision tower frozen) and processor of a recipe."""
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    model = load_model(model_args.model_name_or_path, dtype=dtype or torch.float32,
                       trust_remote_code=trust_remote_code, attn_implementation=model_args.attn_implementation)
    return model, load_processor(model_args.model_name_or_path, trust_remote_code=trust_remote_code)


def run_sft(script_args: SFTScriptArguments, training_args: MirageSFTConfig, model_args: ModelConfig,
            callbacks: list | None = None):
    """Train one SFT stage and save model + processor and ``train_log.json`` (the trainer's log history) to
    ``training_args.output_dir``; returns the trainer. ``callbacks``: extra ``TrainerCallback``s.

    The data is checked (:func:`check_sft_dataset`) before the model is loaded. Training resumes from the last
    complete checkpoint in ``output_dir`` (see :func:`mirage_rl.trainers.checkpointing.resolve_resume`).
    """
    train = load_train_split(script_args)
    check_sft_dataset(train, training_args, split_name(script_args))
    resume = resolve_resume(training_args)
    model, processor = load_model_and_processor(model_args, training_args.trust_remote_code)
    if training_args.train_vision_tower:
        latent.backbone(model).visual.requires_grad_(True)
    if training_args.latent_mode != "none":
        has = getattr(model.config, "latent_token_ids", None) is not None
        if not has and training_args.stage == 1:
            # stage 1 is the entry point for a stock Qwen2.5-VL checkpoint
            add_latent_tokens(model, processor, training_args.latent_size)
    trainer_cls = Stage1Trainer if training_args.stage == 1 else Stage2Trainer
    trainer = trainer_cls(model=model, args=training_args, train_dataset=train, processing_class=processor,
                          callbacks=callbacks, peft_config=peft_config_for(model_args, model))
    trainer.train(resume_from_checkpoint=resume)
    save_final(trainer, processor, training_args.latent_mode, training_args.output_dir)
    return trainer


def peft_config_for(model_args: ModelConfig, model, latent_rows: bool = True):
    """The recipe's LoRA config (``use_peft: true``) for ``model`` (None otherwise), with the latent token rows
    trainable when ``latent_rows``."""
    ids = getattr(model.config, "latent_token_ids", None) if latent_rows else None
    return lora_config(model_args, model, list(ids.values()) if ids else None)


def save_final(trainer, processor, latent_mode: str, output_dir: str) -> None:
    """Save the trained model + processor (recording ``latent_mode`` in its config, so that evaluation decodes the
    way it was trained) and ``train_log.json`` (the trainer's log history) to ``output_dir``, atomically; the
    ``checkpoint-*`` folders already there are kept.

    Collective: call it on every rank. The weights go through ``Trainer.save_model``, which gathers them under
    DeepSpeed ZeRO-3 (``zero3_save_16bit_model: true`` in the launch config; without it ZeRO-3 saves shards
    that ``from_pretrained`` cannot read, so this raises ``ValueError``) and writes only the adapter of a PEFT
    model (with ``mirage_adapter.json``: latent size and mode). Every rank writes into the same temp folder; the main
    process renames it into place.
    """
    acc = trainer.accelerator
    tmp = temp_sibling(output_dir, "final")
    if acc.is_main_process:
        recover_directory(output_dir)  # also removes a temp folder left by an interrupted save
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    model = acc.unwrap_model(trainer.model)
    model.config.latent_mode = latent_mode
    trainer.save_model(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        if not any(tmp.glob("*.safetensors")):
            raise ValueError(f"{output_dir}: the final save wrote no *.safetensors (DeepSpeed ZeRO-3 without "
                             "zero3_save_16bit_model: true in the launch config?); use launch/zero3.yaml")
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle: never needed to load the model
        if is_adapter_dir(tmp):
            write_adapter_info(tmp, model.config)
        processor.save_pretrained(tmp)
        atomic_write_text(tmp / "train_log.json", json.dumps(trainer.state.log_history, indent=1) + "\n")
        commit_directory(tmp, output_dir, keep=("checkpoint-*",))
    acc.wait_for_everyone()
