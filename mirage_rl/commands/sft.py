"""``mirage-rl sft``: parse a recipe, check the data, load the model, train stage 1 or 2, save (thin entry point)."""

from __future__ import annotations

import logging

from trl import ModelConfig

from .. import latent
from ..collator import max_chars_for
from ..data.messages import LATENT_MARKER
from ..modeling import add_latent_tokens, load_processor
from ..outputs import output_dir_guard
from ..trainers import MirageSFTConfig, Stage1Trainer, Stage2Trainer
from ..trainers.checkpointing import resolve_resume
from .common import (
    SFTScriptArguments,
    check_image_columns,
    load_model_for,
    load_train_split,
    peft_config_for,
    require_columns,
    run_settings,
    save_final,
    split_name,
)

logger = logging.getLogger(__name__)

__all__ = ["SFTScriptArguments", "check_helper_size", "check_sft_dataset", "run_sft"]


def check_sft_dataset(ds, args: MirageSFTConfig, where: str, processor=None) -> None:
    """Check a training split before any step runs (text columns, image headers; no image is decoded).

    Checks: the columns the stage needs exist; every image's header (:func:`check_image_columns`); every ``answer``
    is a string; with latent tokens every ``answer``
    holds ``args.latent_blocks`` ``<output_image>`` markers; in stage 1 every row with a latent block has its
    ``helper_image``, and (with ``processor``) every helper image gives at least k = ``args.latent_size`` visual
    tokens after the processor's resize; with ``processor`` and ``args.max_length``, no answer is so long that its
    tokens must exceed ``max_length`` (checked without tokenizing it).
    Raises:
        ValueError: naming ``where``, the row and its ``map_id``, what is wrong and how to fix it.
    """
    from datasets import Image

    need = ["prompt", "image|images", "answer"] + (["helper_image"] if args.stage == 1 else [])
    require_columns(ds, need, where, f"stage {args.stage}")
    check_image_columns(ds, where)
    ids = ds["map_id"] if "map_id" in ds.column_names else [None] * len(ds)

    def row(i):
        return f"{where} row {i}" + (f" (map_id={ids[i]})" if ids[i] is not None else "")

    answers = ds["answer"]
    limit = max_chars_for(processor, args.max_length) if processor is not None else None
    for i, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise ValueError(f"{row(i)}: answer must be a string, got {type(answer).__name__}; fix the row and rebuild")
        if limit is not None and len(answer.encode("utf-8")) > limit:
            raise ValueError(f"{row(i)}: answer has {len(answer)} characters, more than max_length={args.max_length} "
                             "tokens can hold; shorten the row (build-data max_text_chars) or raise max_length")
    markers = [answer.count(LATENT_MARKER) for answer in answers]
    if args.latent_mode != "none" and args.latent_blocks is not None:
        for i, n in enumerate(markers):
            if n != args.latent_blocks:
                raise ValueError(f"{row(i)}: answer has {n} {LATENT_MARKER} marker(s), latent_mode "
                                 f"{args.latent_mode!r} needs {args.latent_blocks} (latent_blocks); fix the row, rebuild "
                                 "with skip_bad_rows: true, or set latent_blocks: null to allow any number")
    if args.stage == 1:
        helpers = ds.cast_column("helper_image", Image(decode=False))["helper_image"]
        for i, h in enumerate(helpers):
            if markers[i] == 0:
                continue  # no latent block: the row trains on CE alone and needs no helper image
            if h is None or (h.get("bytes") is None and h.get("path") is None):
                raise ValueError(f"{row(i)}: helper_image is missing; stage 1 teacher-forces the latent slots with the "
                                 "helper image: add it or drop the row")
            if processor is not None:
                check_helper_size(h, processor.image_processor, args.latent_size, row(i))


def check_helper_size(helper: dict, image_processor, latent_size: int, where: str) -> None:
    """Raise ``ValueError`` when the helper image (a ``datasets`` image dict, bytes or path) gives fewer visual tokens
    than the latent size k (stage 1 pools it into k vectors). Reads the image header only."""
    import io

    from PIL import Image as PILImage

    from ..data.images import visual_tokens

    src = io.BytesIO(helper["bytes"]) if helper.get("bytes") is not None else helper["path"]
    with PILImage.open(src) as im:
        w, h = im.size
    n = visual_tokens(image_processor, w, h)
    if n < latent_size:
        raise ValueError(f"{where}: helper image {w}x{h} gives {n} visual token(s) after the processor's resize, fewer "
                         f"than latent_size={latent_size}; use a smaller latent_size or a larger helper image")


def run_sft(script_args: SFTScriptArguments, training_args: MirageSFTConfig, model_args: ModelConfig,
            callbacks: list | None = None):
    """Train one SFT stage and save model + processor and ``train_log.json`` (the trainer's log history) to
    ``training_args.output_dir``; returns the trainer. ``callbacks``: extra ``TrainerCallback``s.

    Order: the output folder is checked and locked (:func:`mirage_rl.outputs.output_dir_guard`), then the data is
    checked (:func:`check_sft_dataset`) and the processor loaded, and only then the model. Training resumes from the
    last complete checkpoint in ``output_dir`` (see :func:`mirage_rl.trainers.checkpointing.resolve_resume`).
    """
    settings = run_settings("sft", script_args, training_args, model_args)
    with output_dir_guard(training_args.output_dir, "model", training_args.overwrite_output_dir, producer="sft",
                          settings=settings, replace=training_args.replace_output_dir):
        train = load_train_split(script_args)
        processor = load_processor(model_args.model_name_or_path, trust_remote_code=training_args.trust_remote_code)
        check_sft_dataset(train, training_args, split_name(script_args), processor)
        resume = resolve_resume(training_args)
        model = load_model_for(model_args, training_args.trust_remote_code)
        if training_args.train_vision_tower:
            latent.backbone(model).visual.requires_grad_(True)
        if training_args.latent_mode != "none":
            has = getattr(model.config, "latent_token_ids", None) is not None
            if not has and training_args.stage == 1:
                # stage 1 is the entry point for a stock Qwen2.5-VL checkpoint
                add_latent_tokens(model, processor, training_args.latent_size)
            elif training_args.set_latent_size and model.config.latent_size != training_args.latent_size:
                logger.warning("set_latent_size: latent size k %s -> %s (the latent tokens and embeddings are kept)",
                               model.config.latent_size, training_args.latent_size)
                model.config.latent_size = int(training_args.latent_size)
        trainer_cls = Stage1Trainer if training_args.stage == 1 else Stage2Trainer
        trainer = trainer_cls(model=model, args=training_args, train_dataset=train, processing_class=processor,
                              callbacks=callbacks, peft_config=peft_config_for(model_args, model))
        trainer.train(resume_from_checkpoint=resume)
        save_final(trainer, processor, training_args.latent_mode, training_args.output_dir, run=settings)
    return trainer
