"""The steps every training command shares: the data arguments and split, the model and processor, the LoRA config,
the settings recorded with a saved stage, and the final save (``mirage-rl sft`` and ``mirage-rl grpo``)."""

from __future__ import annotations

import errno
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import ModelConfig

from ..atomic import atomic_write_text, commit_directory, make_temp_dir, recover_directory, temp_sibling
from ..errors import is_no_space, no_space_message
from ..lora import is_adapter_dir, lora_config, write_adapter_info
from ..modeling import load_model, load_processor, weights_identity

logger = logging.getLogger(__name__)


@dataclass
class SFTScriptArguments:
    """Data arguments of a training recipe (SFT; GRPO extends them with its rewards)."""

    dataset_path: str = field(default="outputs/data/vsp_spatial_planning",
                              metadata={"help": "A `datasets` folder written by `mirage-rl build-data`."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N rows only."})


def split_name(script_args: SFTScriptArguments) -> str:
    """``path[split]``: how errors name the training split."""
    return f"{script_args.dataset_path}[{script_args.dataset_split}]"


def require_columns(ds, need: list[str], where: str, who: str) -> None:
    """Raise ``ValueError`` naming ``where`` and the missing columns when ``ds`` lacks one of ``need`` (an entry
    ``"image|images"`` is satisfied by either column)."""
    missing = [c for c in need if not any(alt in ds.column_names for alt in c.split("|"))]
    if missing:
        raise ValueError(f"{where}: no column(s) {missing} (has {ds.column_names}); {who} needs {need}: "
                         "build the dataset with `mirage-rl build-data`")


def check_image_columns(ds, where: str) -> None:
    """Read the header of every input image (``image`` / ``images``) and helper image of a training split (no image
    is decoded: about 50 us each) and refuse, naming the row, one that is not an image or whose size
    :func:`~mirage_rl.data.images.size_problem` refuses, before any step runs (the collator would meet it mid-run).

    Raises:
        ValueError: naming ``where``, the row (and its ``map_id``), the column and what is wrong.
    """
    import io
    import warnings

    from datasets import Image, Sequence
    from PIL import Image as PILImage

    from ..data.images import size_problem

    ids = ds["map_id"] if "map_id" in ds.column_names else [None] * len(ds)
    for column in ("image", "images", "helper_image"):
        if column not in ds.column_names:
            continue
        raw = ds.cast_column(column, Sequence(Image(decode=False)) if column == "images" else Image(decode=False))
        for i, cell in enumerate(raw[column]):
            for j, image in enumerate(cell if column == "images" else [cell]):
                if image is None or (image.get("bytes") is None and image.get("path") is None):
                    continue  # a missing helper image is the stage's own check
                label = f"{where} row {i}" + (f" (map_id={ids[i]})" if ids[i] is not None else "") + \
                    f" {column}" + (f"[{j}]" if column == "images" else "")
                src = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image["path"]
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
                        with PILImage.open(src) as im:
                            w, h = im.size
                except Exception as e:  # PIL raises several types for a file that is not an image
                    raise ValueError(f"{label}: not a readable image ({type(e).__name__}: {e}); rebuild the dataset "
                                     "with `mirage-rl build-data`") from None
                problem = size_problem(w, h)
                if problem is not None:
                    raise ValueError(f"{label}: {problem}; then rebuild the dataset")


def load_train_split(script_args: SFTScriptArguments):
    """Load the training split; raises ``ValueError`` naming the path when it is missing or empty."""
    from ..data.disk import load_dataset_folder

    ds = load_dataset_folder(script_args.dataset_path)
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


def load_model_for(model_args: ModelConfig, trust_remote_code: bool = False):
    """The model of a recipe (``model_args.dtype``, default float32; vision tower frozen)."""
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    return load_model(model_args.model_name_or_path, dtype=dtype or torch.float32,
                      trust_remote_code=trust_remote_code, attn_implementation=model_args.attn_implementation)


def load_model_and_processor(model_args: ModelConfig, trust_remote_code: bool = False):
    """The model (:func:`load_model_for`) and processor of a recipe; the processor is loaded first (it is cheap, and
    a folder without tokenizer files fails before the weights are read)."""
    processor = load_processor(model_args.model_name_or_path, trust_remote_code=trust_remote_code)
    return load_model_for(model_args, trust_remote_code), processor


#: the training settings recorded with a saved stage (``mirage_output.json`` ``run``) and compared by ``pipeline``
RUN_KEYS = {"sft": ("stage", "latent_mode", "latent_size", "compress", "latent_target", "gamma", "max_steps", "num_train_epochs",
                    "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "seed"),
            "grpo": ("latent_mode", "latent_objective", "max_steps", "num_train_epochs", "learning_rate",
                     "per_device_train_batch_size", "gradient_accumulation_steps", "num_generations", "beta",
                     "reward_weights", "seed")}


def dataset_identity(script_args: SFTScriptArguments) -> dict:
    """The training split's path, split, row limit and ``datasets`` fingerprint (changes when it is rebuilt)."""
    import json as _json

    state = Path(script_args.dataset_path) / script_args.dataset_split / "state.json"
    try:
        fingerprint = _json.loads(state.read_text()).get("_fingerprint")
    except (OSError, ValueError):
        fingerprint = None
    return {"path": str(script_args.dataset_path), "split": script_args.dataset_split,
            "max_train_samples": script_args.max_train_samples, "fingerprint": fingerprint}


def run_settings(command: str, script_args, training_args, model_args) -> dict:
    """What decides the weights a stage saves: the start model (path and weights files), the dataset
    (:func:`dataset_identity`), the training settings of ``RUN_KEYS`` and, for GRPO, the reward functions."""
    out = {"command": command, "model": str(model_args.model_name_or_path),
           "model_weights": weights_identity(model_args.model_name_or_path), "dataset": dataset_identity(script_args),
           **{k: getattr(training_args, k, None) for k in RUN_KEYS[command]}}
    if out.get("latent_target") == "helper":  # the default, recorded only when it differs (older saves lack the key)
        out.pop("latent_target")
    if command == "grpo":
        out["reward_funcs"] = list(script_args.reward_funcs)
        out["reward_kwargs"] = script_args.reward_kwargs
    return json.loads(json.dumps(out, default=str))


def peft_config_for(model_args: ModelConfig, model, latent_rows: bool = True):
    """The recipe's LoRA config (``use_peft: true``) for ``model`` (None otherwise), with the latent token rows
    trainable when ``latent_rows``."""
    ids = getattr(model.config, "latent_token_ids", None) if latent_rows else None
    return lora_config(model_args, model, list(ids.values()) if ids else None)


def save_final(trainer, processor, latent_mode: str, output_dir: str, run: dict | None = None) -> None:
    """Save the trained model + processor (recording ``latent_mode`` in its config, so that evaluation decodes the
    way it was trained) and ``train_log.json`` (the trainer's log history) to ``output_dir``, atomically; only what an
    earlier model save wrote there is replaced (``checkpoint-*``, ``eval/`` and a user's files are kept), and ``run``
    (:func:`run_settings`) is recorded in its ``mirage_output.json``.

    Collective: call it on every rank. The weights go through ``Trainer.save_model``, which gathers them under
    DeepSpeed ZeRO-3 (``zero3_save_16bit_model: true`` in the launch config; without it ZeRO-3 saves shards
    that ``from_pretrained`` cannot read, so this raises ``ValueError``) and writes only the adapter of a PEFT
    model (with ``mirage_adapter.json``: latent size and mode). Every rank writes into the same temp folder; the main
    process renames it into place.

    Raises:
        OSError: the disk filled up (the message says so and names the folder; the incomplete save is removed).
    """
    acc = trainer.accelerator
    tmp = temp_sibling(output_dir, "final")
    if acc.is_main_process:
        recover_directory(output_dir)  # also removes a temp folder left by an interrupted save
        make_temp_dir(output_dir, "final")
    acc.wait_for_everyone()
    model = acc.unwrap_model(trainer.model)
    model.config.latent_mode = latent_mode
    try:
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
            commit_directory(tmp, output_dir, "model", run=run, command=run["command"] if run else None)
    except Exception as e:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_no_space(e):
            raise OSError(errno.ENOSPC, f"{no_space_message(e, output_dir)} (the incomplete final save was removed; "
                                        "the last complete checkpoint is kept)") from e
        raise
    acc.wait_for_everyone()
