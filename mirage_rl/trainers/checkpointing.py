"""Checkpoints that are complete or ignored, and resuming from the last complete one.

``transformers.Trainer`` writes ``checkpoint-N/`` file by file and then deletes older checkpoints; a process
killed during the save leaves a half-written ``checkpoint-N`` that ``get_last_checkpoint`` would pick. Here a
checkpoint counts only when its completion marker ``mirage_checkpoint.json`` exists (written atomically after
every file of the save, model, optimizer, scheduler, RNG states and trainer state), and older checkpoints are
deleted only after the marker is written, so a kill at any moment leaves the previous complete checkpoint.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..atomic import apply_umask, atomic_write_text, recover_directory
from ..errors import is_no_space, no_space_message
# what a complete checkpoint is, and which checkpoints are a run's own, is a fact of the output folder (outputs.py)
from ..outputs import COMPLETE_MARKER, is_complete, list_checkpoints

__all__ = ["COMPLETE_MARKER", "AtomicCheckpointMixin", "is_complete", "last_complete_checkpoint", "list_checkpoints",
           "resolve_resume", "rotate_own_checkpoints"]

logger = logging.getLogger(__name__)

_FRESH = ("false", "no", "none", "never")
_LAST = ("true", "yes", "last")


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The complete checkpoint with the highest step in ``output_dir``, or None; incomplete ones are logged."""
    recover_directory(output_dir)
    complete, incomplete = list_checkpoints(output_dir)
    if incomplete:
        logger.warning("%s: ignoring incomplete checkpoint(s) %s (their save was interrupted)", output_dir,
                       [p.name for p in incomplete])
    return str(complete[-1]) if complete else None


def resolve_resume(args) -> str | None:
    """The checkpoint ``Trainer.train(resume_from_checkpoint=...)`` gets, from ``args.resume_from_checkpoint``:

    * unset (default) or ``auto``: the last complete checkpoint in ``args.output_dir`` if there is one (logged),
      else None: a killed run restarted with the same command continues where it stopped (as open-r1 does);
    * ``true`` / ``last``: the last complete checkpoint, which must exist;
    * ``false`` / ``none``: start from scratch;
    * a path: that checkpoint, which must be complete.

    Raises:
        FileNotFoundError: ``true`` with no complete checkpoint, or a path that does not exist.
        ValueError: a path to an incomplete checkpoint (naming the last complete one).
    """
    value = "auto" if args.resume_from_checkpoint is None else str(args.resume_from_checkpoint)
    if value.lower() in _FRESH:
        return None
    if value.lower() in _LAST + ("auto",):
        last = last_complete_checkpoint(args.output_dir)
        if last is None and value.lower() in _LAST:
            raise FileNotFoundError(f"resume_from_checkpoint: {value}: {args.output_dir} holds no complete checkpoint "
                                    f"(folders {PREFIX_CHECKPOINT_DIR}-N with {COMPLETE_MARKER}); drop the option to "
                                    "start from scratch")
        if last is not None:
            logger.info("resuming from %s (the last complete checkpoint in output_dir; pass "
                        "--resume_from_checkpoint false to start over)", last)
            _readable(last)
        return last
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: {value} does not exist")
    if not is_complete(path):
        last = last_complete_checkpoint(path.parent)
        raise ValueError(f"resume_from_checkpoint: {value} is incomplete (no {COMPLETE_MARKER}: its save was "
                         f"interrupted); resume from {last or 'scratch'} instead")
    return _readable(str(path))


def _readable(checkpoint: str) -> str:
    """``checkpoint`` after reading its JSON state (``trainer_state.json``, the marker): a damaged one is named in one
    line (:func:`mirage_rl.data.jsonl.read_json`) instead of failing inside ``Trainer.train``."""
    from ..data.jsonl import read_json

    for name in ("trainer_state.json", COMPLETE_MARKER):
        if (Path(checkpoint) / name).is_file():
            read_json(Path(checkpoint) / name)
    return checkpoint


def rotate_own_checkpoints(output_dir: str | os.PathLike, limit: int | None, best: str | None = None) -> None:
    """Keep the newest ``limit`` complete checkpoints of this run's (:func:`list_checkpoints`, so never a user's
    ``checkpoint-N``) and the best one; delete the older ones. The role of transformers' ``rotate_checkpoints``,
    which globs every ``checkpoint-*`` of the folder and would delete a newer-numbered one of the user's keeping
    its own."""
    if not limit or limit < 1:
        return
    complete, _ = list_checkpoints(output_dir)
    keep = {p.resolve() for p in complete[-limit:]} | ({Path(best).resolve()} if best else set())
    for p in complete:
        if p.resolve() not in keep:
            shutil.rmtree(p, ignore_errors=True)


class AtomicCheckpointMixin:
    """``Trainer`` mixin: ``checkpoint-N`` counts only once complete, and resuming really restores the weights.

    Overrides ``transformers.Trainer._save_checkpoint(model, trial)``: removes the debris of an earlier
    interrupted save of the same step, saves with rotation switched off, writes the completion marker
    (main process, after every rank has saved), then rotates (``save_total_limit``). A save that fills the disk
    removes its incomplete checkpoint and raises ``OSError(ENOSPC)`` naming the folder.

    Overrides ``transformers.Trainer._load_from_checkpoint(resume_from_checkpoint, model=None)``: transformers 5.23
    loads the checkpoint's state dict without its key conversion (Qwen2.5-VL saves ``visual.*`` / ``model.layers.*``
    and names them ``model.visual.*`` / ``model.language_model.layers.*`` in memory), non-strictly, so every weight
    is reported missing and training silently restarts from the initial weights. Here the weights are read
    through ``from_pretrained`` (which converts the keys) and copied in strictly. DeepSpeed, FSDP and PEFT
    checkpoints keep transformers' own loaders.
    """

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None):
        """Write ``output_dir/README.md``: the start model and what mirage-rl trained (overrides TRL's
        ``BaseTrainer.create_model_card(model_name, dataset_name, tags)``, whose card names the base model only when
        it is a hub id and says "fine-tuned version of [None]" for a local folder)."""
        if not self.is_world_process_zero():
            return
        args = self.args
        base = getattr(self.accelerator.unwrap_model(self.model).config, "_name_or_path", None) or "unknown"
        mode = getattr(self, "latent_mode", None) or getattr(args, "latent_mode", None) or "hidden"
        if hasattr(args, "stage"):
            what = ("Direct SFT (no latent block)" if mode == "none" else
                    f"Mirage stage {args.stage} ({'helper-image targets in the latent slots' if args.stage == 1 else 'recurrent latents'}"
                    f"{', dummy latents' if mode == 'dummy' else ''}, latent size k = {args.latent_size})")
        else:
            what = f"GRPO with latent-interleaved rollouts (latent_mode {mode}, {args.num_generations} generations per prompt, beta {args.beta})"
        lines = [f"# {model_name or Path(args.output_dir).name}", "",
                 f"Trained with mirage-rl (latent visual reasoning after Mirage, arXiv 2506.17218): {what}.",
                 "", f"- start model: `{base}`", f"- steps: {self.state.global_step} of {self.state.max_steps}",
                 f"- learning rate: {args.learning_rate}, batch size per device: {args.per_device_train_batch_size}, "
                 f"seed: {args.seed}"]
        if dataset_name:
            lines.append(f"- dataset: {dataset_name}")
        lines += ["", "The settings are recorded in `mirage_output.json` (`run`) once the final model is saved; "
                      "`train_log.json` holds the log history.", ""]
        atomic_write_text(Path(args.output_dir) / "README.md", "\n".join(lines))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.model if model is None else model
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or hasattr(model, "peft_config"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        if not any(Path(resume_from_checkpoint).glob("*.safetensors")):
            raise FileNotFoundError(f"{resume_from_checkpoint}: no *.safetensors weights to resume from")
        from ..modeling import check_safetensors

        for weights in sorted(Path(resume_from_checkpoint).glob("*.safetensors")):
            check_safetensors(weights)
        base = self.accelerator.unwrap_model(model)
        dtype = next(base.parameters()).dtype
        saved = type(base).from_pretrained(resume_from_checkpoint, dtype=dtype, use_safetensors=True)
        result = base.load_state_dict(saved.state_dict(), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise RuntimeError(f"{resume_from_checkpoint}: weights do not match the model (missing "
                               f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}); resume with the "
                               "recipe that wrote the checkpoint")
        del saved
        logger.info("resumed weights from %s", resume_from_checkpoint)

    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial=trial)
        folder = Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and folder.is_dir() and not is_complete(folder):
            shutil.rmtree(folder)
        self.accelerator.wait_for_everyone()
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        except Exception as e:
            if not is_no_space(e):
                raise
            # a full disk: the incomplete checkpoint would stay and fill it again at the next try
            if self.args.should_save:
                shutil.rmtree(folder, ignore_errors=True)
            raise OSError(errno.ENOSPC, f"{no_space_message(e, folder)} (the incomplete checkpoint {folder.name} was "
                                        "removed; the last complete checkpoint is kept)") from e
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            apply_umask(folder)
            files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
            atomic_write_text(folder / COMPLETE_MARKER, json.dumps(
                {"global_step": self.state.global_step, "files": files}, indent=1) + "\n")
            rotate_own_checkpoints(run_dir, limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()
