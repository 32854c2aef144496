"""The fields both Mirage configs share, declared once (:class:`LatentFields`), and the checks both run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..fused_steps import FUSED_MODES
from ..latent import FILL_METHODS, LATENT_MODES, parse_latent_mode

#: ``latent_fill`` values (:func:`mirage_rl.latent.latent_fill`)
LATENT_FILLS = FILL_METHODS


@dataclass
class LatentFields:
    """Fields of :class:`~mirage_rl.trainers.sft_config.MirageSFTConfig` and
    :class:`~mirage_rl.trainers.grpo_config.MirageGRPOConfig` (a dataclass mixin placed before the TRL config).

    Fields:
        latent_mode (``str`` or ``None``, default ``None``): what enters the latent slots, one of ``hidden`` (Mirage:
            the previous position's hidden state), ``dummy`` (the fixed ``<|latent_pad|>`` embedding: the control) or
            ``none`` (no latent block: Direct SFT) (:class:`mirage_rl.latent.LatentMode`). ``None``: SFT trains
            ``hidden``; GRPO uses the mode the checkpoint records, else ``hidden`` when it has latent tokens
            (:func:`mirage_rl.latent.resolve_latent_mode`).
        latent_fill (``str``, default ``"auto"``): how hidden latents are computed in training and scoring:
            ``cached`` (KV cache, k single-column steps per block), ``keystore`` (the same steps with the keys in a
            store: runs under non-reentrant gradient checkpointing), ``multipass`` (cache-free full forwards: runs
            under any checkpointing) or ``auto`` (the fastest that runs: cached, keystore under gradient
            checkpointing, multipass under reentrant checkpointing; the pick is logged)
            (:func:`mirage_rl.latent.latent_fill`, :func:`mirage_rl.latent.resolve_fill`).
        latent_fused_steps (``str``, default ``"off"``): the key-store fill's one-column steps compiled
            (:mod:`mirage_rl.fused_steps`): ``off``, ``compile`` (``torch.compile``) or ``cudagraphs``
            (``torch.compile(mode="reduce-overhead")``: CUDA graphs); not ``off`` makes ``auto`` pick the key store.
            Opt-in until a GPU measurement says otherwise (``docs/GPU.md``).
        overwrite_output_dir (``bool``, default ``False``): write into an ``output_dir`` holding entries no mirage-rl
            run wrote (they are kept, never deleted); without it such a folder is refused before any work
            (:mod:`mirage_rl.outputs`).
        replace_output_dir (``bool``, default ``False``): replace a finished model that another run (another
            command, or other settings) left in ``output_dir``; without it that folder is refused before any work
            (:func:`mirage_rl.outputs.check_finished`).
    """

    latent_mode: str | None = field(default=None, metadata={
        "help": f"One of {LATENT_MODES}; default: SFT hidden, GRPO the checkpoint's recorded mode."})
    latent_fill: str = field(default="auto", metadata={"help": f"One of {LATENT_FILLS}."})
    latent_fused_steps: str = field(default="off", metadata={
        "help": f"One of {FUSED_MODES}: the key-store latent fill's one-column steps compiled (opt-in)."})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "Where training starts (README, resuming): unset or auto, the last complete checkpoint-N in output_dir "
                "if there is one (a killed run restarted with the same command continues); true/last, that checkpoint, "
                "which must exist; false, from scratch; a path, that checkpoint."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Write into an output_dir holding entries no mirage-rl run wrote (they are kept, never deleted)."})
    replace_output_dir: bool = field(default=False, metadata={
        "help": "Replace the finished output another run left in output_dir (only that output's files are replaced; "
                "everything else in the folder is kept). Without it such a folder is refused, unless this is the same "
                "command with the same settings (a resume)."})

    def check_latent_fields(self) -> None:
        """Validate the shared fields (call from ``__post_init__``, after TRL's).

        Raises:
            ValueError: an unknown ``latent_mode``, ``latent_fill`` or ``latent_fused_steps`` (or fused steps with a
                fill that has no key store; ``cached`` with gradient checkpointing; ``keystore`` with reentrant
                checkpointing), or a run that trains zero steps.
        """
        if self.latent_mode is not None:
            self.latent_mode = parse_latent_mode(self.latent_mode).value
        if self.latent_fill not in LATENT_FILLS:
            raise ValueError(f"latent_fill must be one of {LATENT_FILLS}, got {self.latent_fill!r}")
        if self.latent_fused_steps not in FUSED_MODES:
            raise ValueError(f"latent_fused_steps must be one of {FUSED_MODES}, got {self.latent_fused_steps!r}")
        if self.latent_fused_steps != "off" and self.latent_fill in ("cached", "multipass"):
            raise ValueError(f"latent_fused_steps: {self.latent_fused_steps} runs on the key store: set latent_fill "
                             f"to auto or keystore (not {self.latent_fill})")
        if getattr(self, "gradient_checkpointing", False):  # what latent.resolve_fill would refuse at the first step
            kwargs = self.gradient_checkpointing_kwargs or {}
            if isinstance(kwargs, str):
                kwargs = json.loads(kwargs)
            if self.latent_fill == "cached":
                raise ValueError("latent_fill: cached cannot run with gradient_checkpointing: true (checkpointed layers "
                                 "get no KV cache): use latent_fill: auto or keystore")
            if self.latent_fill == "keystore" and kwargs.get("use_reentrant") is True:
                raise ValueError("latent_fill: keystore cannot run under reentrant gradient checkpointing "
                                 "(gradient_checkpointing_kwargs use_reentrant: true sends no gradient through the key "
                                 "store): use latent_fill: auto (multipass there) or use_reentrant: false")
        check_training_length(self)


def check_training_length(args) -> None:
    """Refuse a run that would train zero steps: ``num_train_epochs <= 0`` while ``max_steps`` is unset (``-1``).
    Without this check the untrained start model would be saved as a finished stage."""
    if args.max_steps is not None and args.max_steps > 0:
        return
    if args.num_train_epochs is None or args.num_train_epochs <= 0:
        raise ValueError(f"num_train_epochs={args.num_train_epochs} with max_steps={args.max_steps} trains nothing: set "
                         "num_train_epochs > 0 or max_steps >= 1")
