"""Stage-1 and stage-2 SFT trainers (Mirage, arXiv 2506.17218, section 3.2), on TRL's ``SFTTrainer``.

* :class:`Stage2Trainer` (also Direct SFT with ``latent_mode: none`` and the dummy-latent control with
  ``latent_mode: dummy``): loss = CE on the answer tokens; with ``latent_mode: hidden`` every latent
  slot's input is the model's own previous hidden state (recurrent fill, :func:`mirage_rl.latent.latent_fill`).
* :class:`Stage1Trainer`: the latent slots are teacher-forced with the helper image's pooled visual
  embeddings; loss = gamma * CE + mean_t (1 - cos(h_{slot_t - 1}, target_t)).

Both override only ``compute_loss`` (TRL ``SFTTrainer.compute_loss``) and install a ``forward`` on the
model instance so that DDP/DeepSpeed wrappers run the latent computation through their own forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput
from trl import SFTConfig, SFTTrainer

from .. import latent
from ..collator import LatentCollator
from ..latent import COMPRESS_MODES, LATENT_MODES, parse_latent_mode
from ..modeling import LatentTokens
from .checkpointing import AtomicCheckpointMixin

logger = logging.getLogger(__name__)


@dataclass
class MirageSFTConfig(SFTConfig):
    """``SFTConfig`` plus the latent fields. Defaults that differ from TRL's are the ones the latent
    collator needs (``remove_unused_columns=False``, ``skip_prepare_dataset``, ``max_length=None``).

    Fields:
        stage: 1 (teacher-forced helper-image latents + cosine loss) or 2 (recurrent latents, CE only).
        latent_size: k, latent slots per block. Must equal the checkpoint's ``config.latent_size``.
        latent_mode: ``hidden`` (Mirage), ``dummy`` (slots keep the fixed ``<|latent_pad|>`` embedding:
            the control) or ``none`` (no latent block: Direct SFT).
        compress: how stage 1 pools the helper image into k vectors: ``average`` or ``grid``.
        gamma: weight of the CE term in stage 1 (paper: 0.1).
        latent_fill: ``auto`` / ``cached`` / ``multipass`` (see :func:`mirage_rl.latent.latent_fill`).
        latent_blocks: latent blocks (``<output_image>`` markers) every answer must hold (``None``: any number).
        max_length: the most tokens of a row (default 8192); a longer row raises, naming it (never truncated).
            Checked before tokenizing: a row with more UTF-8 bytes than ``max_length`` tokens can cover is refused
            at start-up.
        overwrite_output_dir: write into an ``output_dir`` that holds entries no mirage-rl run wrote (they are kept,
            never deleted); without it such a folder is refused before any work (``mirage_rl.outputs``).

    ``__post_init__`` refuses settings that would train on nonsense: ``num_train_epochs <= 0`` without
    ``max_steps``, ``gamma < 0``, an unknown ``latent_fill``, ``max_length < 1``, ``latent_blocks < 0``.
    """

    stage: int = field(default=2, metadata={"help": "Mirage stage: 1 or 2."})
    latent_size: int = field(default=4, metadata={"help": "Latent size k (slots per latent block)."})
    latent_mode: str = field(default="hidden", metadata={"help": f"One of {LATENT_MODES}."})
    compress: str = field(default="average", metadata={"help": f"Stage-1 pooling, one of {COMPRESS_MODES}."})
    gamma: float = field(default=0.1, metadata={"help": "Stage-1 weight of the CE loss (paper: 0.1)."})
    latent_fill: str = field(default="auto", metadata={"help": "auto, cached or multipass."})
    latent_blocks: int | None = field(default=1, metadata={
        "help": "<output_image> markers (latent blocks) every answer must hold; checked before training. "
                "null: any number."})
    train_vision_tower: bool = field(default=False, metadata={
        "help": "Train the vision tower too (for from-scratch models; Mirage keeps a pretrained one frozen). "
                "Stage 1 needs it frozen: its targets come from the same tower."})
    max_length: int | None = field(default=8192, metadata={
        "help": "Most tokens per row; longer rows raise (never truncated), huge ones before they are tokenized."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Write into an output_dir holding entries no mirage-rl run wrote (they are kept, never deleted)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must be False: the collator reads the raw columns."})

    def __post_init__(self):
        if self.dataset_kwargs is None:
            self.dataset_kwargs = {}
        self.dataset_kwargs.setdefault("skip_prepare_dataset", True)
        super().__post_init__()
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        self.latent_mode = parse_latent_mode(self.latent_mode).value
        if self.stage == 1 and self.latent_mode != "hidden":
            raise ValueError("stage 1 teacher-forces helper-image latents: set latent_mode: hidden (or use stage: 2 "
                             "for the Direct SFT / dummy-latent baselines)")
        if self.compress not in COMPRESS_MODES:
            raise ValueError(f"compress must be one of {COMPRESS_MODES}, got {self.compress!r}")
        if self.latent_size < 1:
            raise ValueError(f"latent_size must be >= 1, got {self.latent_size}")
        if self.train_vision_tower and self.stage == 1:
            raise ValueError("train_vision_tower with stage 1: the helper-image targets come from the vision tower, "
                             "which would learn to collapse them; train it in stage 2 only")
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must be False: the latent collator needs the raw dataset columns")
        check_training_length(self)
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0 (the stage-1 weight of the CE loss; paper: 0.1), got {self.gamma}")
        if self.latent_fill not in LATENT_FILLS:
            raise ValueError(f"latent_fill must be one of {LATENT_FILLS}, got {self.latent_fill!r}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be >= 1 (tokens per row), got {self.max_length}")
        if self.latent_blocks is not None and self.latent_blocks < 0:
            raise ValueError(f"latent_blocks must be >= 0 or null, got {self.latent_blocks}")


#: ``latent_fill`` values (:func:`mirage_rl.latent.latent_fill`)
LATENT_FILLS = ("auto", "cached", "multipass")


def check_training_length(args) -> None:
    """Refuse a run that would train zero steps: ``num_train_epochs <= 0`` while ``max_steps`` is unset (``-1``).
    Without this check the untrained start model would be saved as a finished stage."""
    if args.max_steps is not None and args.max_steps > 0:
        return
    if args.num_train_epochs is None or args.num_train_epochs <= 0:
        raise ValueError(f"num_train_epochs={args.num_train_epochs} with max_steps={args.max_steps} trains nothing: set "
                         "num_train_epochs > 0 or max_steps >= 1")


@dataclass
class LatentSFTOutput(ModelOutput):
    """What the installed forward returns: the loss terms, which ``compute_loss`` combines. ``ce_sum``: CE summed
    over the answer tokens (normalised there by the tokens of the whole global batch); ``cos_loss``: stage 1's
    mean (1 - cos) over the latent slots."""

    ce_sum: torch.Tensor | None = None
    cos_loss: torch.Tensor | None = None
    n_correct: torch.Tensor | None = None
    n_tokens: torch.Tensor | None = None
    n_slots: torch.Tensor | None = None


def answer_ce(model, hidden: torch.Tensor, labels: torch.Tensor):
    """Next-token CE on the label positions only (logits are never built for the prompt).

    Args: hidden ``(B, L, H)``, labels ``(B, L)`` with -100 where ignored.
    Returns: ``(summed CE, number of correct top-1 predictions, number of label tokens)``; the number of label
    tokens counts ``labels[:, 1:] != -100``, as ``Trainer`` counts ``num_items_in_batch``.
    """
    target = labels[:, 1:]
    keep = target != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()
    tgt = target[keep]
    n = keep.sum()
    if logits.shape[0] == 0:
        zero = hidden.sum() * 0.0
        return zero, n, n
    ce = F.cross_entropy(logits, tgt, reduction="sum")
    return ce, (logits.argmax(-1) == tgt).sum(), n


class Stage2Trainer(AtomicCheckpointMixin, SFTTrainer):
    """Stage 2 (recurrent latents), the dummy-latent control and Direct SFT, by ``args.latent_mode``.

    Overrides ``SFTTrainer.compute_loss`` (and ``Trainer._save_checkpoint`` through
    :class:`~mirage_rl.trainers.checkpointing.AtomicCheckpointMixin`); the collator is
    :class:`mirage_rl.collator.LatentCollator`.
    Raises ``ValueError`` when the checkpoint lacks latent tokens or its latent size differs from the recipe.
    """

    stage = 2

    def __init__(self, model, args: MirageSFTConfig, train_dataset=None, processing_class=None, **kwargs):
        if args.stage != self.stage:
            raise ValueError(f"{type(self).__name__} runs stage {self.stage}, the config says stage {args.stage}")
        tokens = None
        if args.latent_mode != "none":
            tokens = LatentTokens.for_model(model, processing_class, where=getattr(model, "name_or_path", "model"))
            if tokens.latent_size != args.latent_size:
                raise ValueError(f"latent_size={args.latent_size} in the recipe but {tokens.latent_size} in the checkpoint "
                                 f"{getattr(model, 'name_or_path', '')}: set latent_size: {tokens.latent_size}")
        self.latent_tokens = tokens
        collator = kwargs.pop("data_collator", None) or LatentCollator(
            processing_class, tokens, args.latent_mode, stage=self.stage, max_length=args.max_length)
        super().__init__(model=model, args=args, train_dataset=train_dataset, processing_class=processing_class,
                         data_collator=collator, **kwargs)
        # Trainer then counts the answer tokens of the whole global batch (every rank, every accumulation step) and
        # passes them to compute_loss as num_items_in_batch: the loss does not depend on the world size
        self.model_accepts_loss_kwargs = True
        self._metric_sums: dict[str, dict[str, float]] = {}  # logged metrics as sums over the logging window
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        base.forward = self._make_forward(base)

    def _make_forward(self, base):
        def forward(**batch):
            return self.latent_forward(base, **batch)

        return forward

    def latent_forward(self, model, input_ids, attention_mask, labels, latent_mask, pixel_values=None,
                       image_grid_thw=None, mm_token_type_ids=None, **extra) -> LatentSFTOutput:
        """Run the latent core (:func:`mirage_rl.latent.latent_hidden_states`): with ``latent_mode: hidden`` every slot is
        filled by the recurrence; ``dummy`` slots keep the ``<|latent_pad|>`` embedding, ``none`` has no slots (a plain
        forward). Returns the CE terms on the answer tokens."""
        mask = latent_mask if self.args.latent_mode == "hidden" else None
        hidden = latent.latent_hidden_states(model, input_ids, attention_mask, pixel_values, image_grid_thw,
                                             mm_token_type_ids, mask, method=self.args.latent_fill)
        ce_sum, n_correct, n = answer_ce(model, hidden, labels)
        return LatentSFTOutput(ce_sum=ce_sum, n_correct=n_correct, n_tokens=n)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Run the installed latent forward; log ``ce_loss`` (+ ``cos_loss``), ``mean_token_accuracy`` and
        ``num_tokens``. Overrides ``SFTTrainer.compute_loss``.

        With ``num_items_in_batch`` (the answer tokens of the global batch: every rank and accumulation step, which
        ``Trainer`` counts because ``model_accepts_loss_kwargs`` is True) the CE is the sum over this micro-batch's
        tokens divided by it, times the number of processes (DDP and DeepSpeed average gradients over ranks), as
        TRL's ``SFTTrainer.compute_loss`` does: one step on N ranks equals one step on one process with the same
        global batch. The stage-1 cosine term is a per-micro-batch mean over latent slots, divided by the
        accumulation steps; it equals the global mean when every micro-batch holds as many slots (one latent
        block per answer, ``latent_blocks: 1``, and equal micro-batch sizes). Stage 1's loss is
        ``gamma * CE + cos``. Without ``num_items_in_batch`` (evaluation) both terms are micro-batch means.
        """
        out = model(**inputs)
        if num_items_in_batch is None:
            ce, cos_weight = out.ce_sum / out.n_tokens.clamp(min=1), 1.0
        else:
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            ce = out.ce_sum / torch.as_tensor(num_items_in_batch).clamp(min=1) * scale
            cos_weight = 1.0 / self.current_gradient_accumulation_steps
        loss = ce if out.cos_loss is None else self.args.gamma * ce + out.cos_loss * cos_weight
        mode = "train" if self.model.training else "eval"
        gather = self.accelerator.gather_for_metrics
        # token-weighted over the logging window (every rank, every accumulation step): the metrics are sums here and
        # ratios in log(), so ce_loss is the mean CE per answer token, as the loss is
        sums = self._metric_sums.setdefault(mode, {})
        for key, value in (("ce_sum", out.ce_sum), ("n_correct", out.n_correct), ("n_tokens", out.n_tokens)):
            sums[key] = sums.get(key, 0.0) + gather(value.detach().float().reshape(1)).sum().item()
        if out.cos_loss is not None:
            slots = out.n_slots.float().reshape(1)
            sums["cos_sum"] = sums.get("cos_sum", 0.0) + gather(out.cos_loss.detach().float().reshape(1) * slots).sum().item()
            sums["n_slots"] = sums.get("n_slots", 0.0) + gather(slots).sum().item()
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict, start_time=None) -> None:
        """Overrides ``SFTTrainer.log``: ``ce_loss``, ``mean_token_accuracy`` and ``cos_loss`` are ratios of the
        sums over the logging window (CE and correct tokens per answer token, cosine loss per latent slot), not means
        of per-micro-batch means, which weigh a short micro-batch like a long one under gradient accumulation."""
        mode = "train" if self.model.training else "eval"
        sums = self._metric_sums.pop(mode, {})
        if sums.get("n_tokens"):
            self._metrics[mode]["ce_loss"] = [sums["ce_sum"] / sums["n_tokens"]]
            self._metrics[mode]["mean_token_accuracy"] = [sums["n_correct"] / sums["n_tokens"]]
        if sums.get("n_slots"):
            self._metrics[mode]["cos_loss"] = [sums["cos_sum"] / sums["n_slots"]]
        super().log(logs, start_time)


class Stage1Trainer(Stage2Trainer):
    """Stage 1: helper-image latents teacher-forced into the slots; loss gamma * CE + (1 - cos).

    The cosine term compares the hidden state *before* each slot (position p_t - 1) with target t, so
    that at inference the hidden state fed into slot t approximates the helper image's t-th vector. A micro-batch
    without any latent block (``latent_blocks: null`` data) has no cosine term: it trains on ``gamma * CE`` alone.
    Overrides ``SFTTrainer.compute_loss`` (through :meth:`Stage2Trainer.compute_loss`).
    """

    stage = 1

    def latent_forward(self, model, input_ids, attention_mask, labels, latent_mask, pixel_values=None,
                       image_grid_thw=None, mm_token_type_ids=None, helper_pixel_values=None,
                       helper_image_grid_thw=None, **extra) -> LatentSFTOutput:
        n_slots = latent_mask.sum()
        if not bool(latent_mask.any()):  # no row of this micro-batch has a latent block (latent_blocks: null): CE only
            hidden = latent.latent_hidden_states(model, input_ids, attention_mask, pixel_values, image_grid_thw,
                                                 mm_token_type_ids)
            ce_sum, n_correct, n = answer_ce(model, hidden, labels)
            return LatentSFTOutput(ce_sum=ce_sum, cos_loss=hidden.sum() * 0.0, n_correct=n_correct, n_tokens=n,
                                   n_slots=n_slots)
        if helper_pixel_values is None:
            raise ValueError("stage 1 needs helper images: the batch has latent blocks but no helper_pixel_values "
                             "(does the dataset have a 'helper_image' column?)")
        k = self.latent_tokens.latent_size
        targets = latent.helper_targets(model, helper_pixel_values, helper_image_grid_thw, k, self.args.compress)
        # stage 1 is the latent core with the helper targets as the slots' inputs (teacher forcing)
        hidden = latent.latent_hidden_states(model, input_ids, attention_mask, pixel_values, image_grid_thw,
                                             mm_token_type_ids, latent_mask, latent_inputs=targets.reshape(-1, targets.shape[-1]))
        ce_sum, n_correct, n = answer_ce(model, hidden, labels)
        before = torch.roll(latent_mask, shifts=-1, dims=1)  # position p_t - 1 of every slot p_t
        pred = hidden[before].float()
        cos = 1.0 - F.cosine_similarity(pred, targets.reshape(-1, targets.shape[-1]).float(), dim=-1).mean()
        return LatentSFTOutput(ce_sum=ce_sum, cos_loss=cos, n_correct=n_correct, n_tokens=n, n_slots=n_slots)
