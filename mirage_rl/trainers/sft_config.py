"""``MirageSFTConfig``: TRL's ``SFTConfig`` plus the Mirage fields (stage, latent size k, pooling, gamma, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from ..latent import COMPRESS_MODES
from .latent_config import LatentFields


#: stage-1 target kinds (``latent_target``)
LATENT_TARGETS = ("helper", "residual")


@dataclass
class MirageSFTConfig(LatentFields, SFTConfig):
    """``SFTConfig`` plus the latent fields (the shared ones, ``latent_mode``, ``latent_fill`` and
    ``overwrite_output_dir``, are documented in :class:`~mirage_rl.trainers.latent_config.LatentFields`). Defaults that differ from TRL's are the ones the latent
    collator needs (``remove_unused_columns=False``, ``skip_prepare_dataset``, ``max_length=None``).

    Fields:
        stage: 1 (teacher-forced helper-image latents + cosine loss) or 2 (recurrent latents, CE only).
        latent_size: k, latent slots per block. Must equal the checkpoint's ``config.latent_size``.
        latent_mode: as in ``LatentFields``; unset means ``hidden``.
        compress: how stage 1 pools the helper image into k vectors: ``average`` or ``grid``.
        latent_target: ``helper`` (the paper: the pooled helper image) or ``residual`` (ours, issue 21: the pooled
            helper image minus the pooled input image of the same row, so that only what the drawing adds remains;
            on VSP planning's test maps this raises the map-specific share of the targets from 0.13 to 0.89,
            ``bench/target_informativeness.py``). Needs one input image per row of the same size as the helper.
        helper_as_input: give each row's helper image as a second input image (right after the first) and train
            without a latent block: the input upper bound of docs/RESULTS.md (the paper's "helper image as input"
            row; needs ``latent_mode: none``, stage 2).
        set_latent_size: stage 1 only: when the checkpoint records another latent size, set it to ``latent_size``
            (the three latent tokens and their embeddings stay; only the number of ``<|latent_pad|>`` slots per block
            changes). For a checkpoint whose latent slots were never trained, e.g. the seeing tiny base (k = 4) of
            ``make results`` used for the k = 16 grid-target arm; without it a different latent size raises.
        gamma: weight of the CE term in stage 1 (paper: 0.1).
        latent_blocks: latent blocks (``<output_image>`` markers) every answer must hold (``None``: any number).
        max_length: the most tokens of a row (default 8192); a longer row raises, naming it (never truncated).
            Checked before tokenizing: a row with more UTF-8 bytes than ``max_length`` tokens can cover is refused
            at start-up.

    ``__post_init__`` refuses settings that would train on nonsense: ``num_train_epochs <= 0`` without
    ``max_steps``, ``gamma < 0``, an unknown ``latent_fill`` or ``latent_fused_steps`` (or one that cannot run with the
    gradient checkpointing asked for), ``max_length < 1``, ``latent_blocks < 0``.
    """

    stage: int = field(default=2, metadata={"help": "Mirage stage: 1 or 2."})
    latent_size: int = field(default=4, metadata={"help": "Latent size k (slots per latent block)."})
    compress: str = field(default="average", metadata={"help": f"Stage-1 pooling, one of {COMPRESS_MODES}."})
    latent_target: str = field(default="helper", metadata={
        "help": "Stage-1 targets: helper (the paper: the pooled helper image) or residual (ours: the pooled helper "
                "image minus the pooled input image, only what the drawing adds)."})
    gamma: float = field(default=0.1, metadata={"help": "Stage-1 weight of the CE loss (paper: 0.1)."})
    set_latent_size: bool = field(default=False, metadata={
        "help": "Stage 1: set the checkpoint's latent size k to latent_size (for a base whose latent slots were never "
                "trained); otherwise a different k raises."})
    helper_as_input: bool = field(default=False, metadata={
        "help": "Input upper bound: the helper image as a second input image, no latent block (latent_mode none)."})
    latent_blocks: int | None = field(default=1, metadata={
        "help": "<output_image> markers (latent blocks) every answer must hold; checked before training. "
                "null: any number."})
    train_vision_tower: bool = field(default=False, metadata={
        "help": "Train the vision tower too (for from-scratch models; Mirage keeps a pretrained one frozen). "
                "Stage 1 needs it frozen: its targets come from the same tower."})
    max_length: int | None = field(default=8192, metadata={
        "help": "Most tokens per row; longer rows raise (never truncated), huge ones before they are tokenized."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must be False: the collator reads the raw columns."})

    def __post_init__(self):
        if self.dataset_kwargs is None:
            self.dataset_kwargs = {}
        self.dataset_kwargs.setdefault("skip_prepare_dataset", True)
        super().__post_init__()
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        self.check_latent_fields()
        self.latent_mode = self.latent_mode or "hidden"
        if self.stage == 1 and self.latent_mode != "hidden":
            raise ValueError("stage 1 teacher-forces helper-image latents: set latent_mode: hidden (or use stage: 2 "
                             "for the Direct SFT / dummy-latent baselines)")
        if self.compress not in COMPRESS_MODES:
            raise ValueError(f"compress must be one of {COMPRESS_MODES}, got {self.compress!r}")
        if self.latent_target not in LATENT_TARGETS:
            raise ValueError(f"latent_target must be one of {LATENT_TARGETS}, got {self.latent_target!r}")
        if self.helper_as_input and (self.latent_mode != "none" or self.stage != 2):
            raise ValueError("helper_as_input (the input upper bound) trains without latents: set latent_mode: none "
                             "and stage: 2")
        if self.latent_size < 1:
            raise ValueError(f"latent_size must be >= 1, got {self.latent_size}")
        if self.set_latent_size and self.stage != 1:
            raise ValueError("set_latent_size changes k of a checkpoint whose latent slots were never trained: stage 1 "
                             "only (stage 2 keeps the k its stage 1 trained)")
        if self.train_vision_tower and self.stage == 1:
            raise ValueError("train_vision_tower with stage 1: the helper-image targets come from the vision tower, "
                             "which would learn to collapse them; train it in stage 2 only")
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must be False: the latent collator needs the raw dataset columns")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0 (the stage-1 weight of the CE loss; paper: 0.1), got {self.gamma}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be >= 1 (tokens per row), got {self.max_length}")
        if self.latent_blocks is not None and self.latent_blocks < 0:
            raise ValueError(f"latent_blocks must be >= 0 or null, got {self.latent_blocks}")
