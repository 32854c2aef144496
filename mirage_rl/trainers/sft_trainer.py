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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput
from trl import SFTTrainer

from .. import latent
from ..collator import LatentCollator
from ..limits import clamp_max_length
from ..modeling import LatentTokens
from ..patching import patch_method
from .checkpointing import AtomicCheckpointMixin
from .sft_config import MirageSFTConfig

logger = logging.getLogger(__name__)


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


class LatentSFTTrainer(AtomicCheckpointMixin, SFTTrainer):
    """What both SFT stages share: the latent collator, the latent forward installed on the model instance (so that
    DDP/DeepSpeed wrappers run it through their own forward), the world-size-independent loss and the token-weighted
    metrics. The two stages are siblings that differ only in :meth:`latent_forward` and their ``stage``.

    Overrides ``SFTTrainer.compute_loss`` and ``SFTTrainer.log`` (and ``Trainer._save_checkpoint`` through
    :class:`~mirage_rl.trainers.checkpointing.AtomicCheckpointMixin`); the collator is
    :class:`mirage_rl.collator.LatentCollator`.
    Raises ``ValueError`` when the config's stage is not the trainer's, the checkpoint lacks latent tokens or its
    latent size differs from the recipe.
    """

    stage: int  # set by each stage


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
        args.max_length = clamp_max_length(model.config, args.max_length)
        collator = kwargs.pop("data_collator", None) or LatentCollator(
            processing_class, tokens, args.latent_mode, stage=self.stage, max_length=args.max_length,
            reference_images=self.stage == 1 and args.latent_target == "residual", helper_as_input=args.helper_as_input)
        super().__init__(model=model, args=args, train_dataset=train_dataset, processing_class=processing_class,
                         data_collator=collator, **kwargs)
        # Trainer then counts the answer tokens of the whole global batch (every rank, every accumulation step) and
        # passes them to compute_loss as num_items_in_batch: the loss does not depend on the world size
        self.model_accepts_loss_kwargs = True
        self._metric_sums: dict[str, dict[str, float]] = {}  # logged metrics as sums over the logging window
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        patch_method(base, "forward", self._make_forward(base), bind=False)

    def _make_forward(self, base):
        def forward(**batch):
            return self.latent_forward(base, **batch)

        return forward

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

    def latent_forward(self, model, **batch) -> LatentSFTOutput:
        raise NotImplementedError


class Stage2Trainer(LatentSFTTrainer):
    """Stage 2 (recurrent latents), the dummy-latent control and Direct SFT, by ``args.latent_mode``."""

    stage = 2

    def latent_forward(self, model, input_ids, attention_mask, labels, latent_mask, pixel_values=None,
                       image_grid_thw=None, mm_token_type_ids=None, **extra) -> LatentSFTOutput:
        """Run the latent core (:func:`mirage_rl.latent.latent_hidden_states`): with ``latent_mode: hidden`` every slot is
        filled by the recurrence; ``dummy`` slots keep the ``<|latent_pad|>`` embedding, ``none`` has no slots (a plain
        forward). Returns the CE terms on the answer tokens."""
        mask = latent_mask if self.args.latent_mode == "hidden" else None
        hidden = latent.latent_hidden_states(model, input_ids, attention_mask, pixel_values, image_grid_thw,
                                             mm_token_type_ids, mask, method=self.args.latent_fill,
                                             fused=self.args.latent_fused_steps)
        ce_sum, n_correct, n = answer_ce(model, hidden, labels)
        return LatentSFTOutput(ce_sum=ce_sum, n_correct=n_correct, n_tokens=n)


class Stage1Trainer(LatentSFTTrainer):
    """Stage 1: helper-image latents teacher-forced into the slots; loss gamma * CE + (1 - cos).

    The cosine term compares the hidden state *before* each slot (position p_t - 1) with target t, so
    that at inference the hidden state fed into slot t approximates the helper image's t-th vector. A micro-batch
    without any latent block (``latent_blocks: null`` data) has no cosine term: it trains on ``gamma * CE`` alone.
    A sibling of :class:`Stage2Trainer` over :class:`LatentSFTTrainer`.
    """

    stage = 1

    def latent_forward(self, model, input_ids, attention_mask, labels, latent_mask, pixel_values=None,
                       image_grid_thw=None, mm_token_type_ids=None, helper_pixel_values=None,
                       helper_image_grid_thw=None, reference_pixel_values=None, reference_image_grid_thw=None,
                       **extra) -> LatentSFTOutput:
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
        if self.args.latent_target == "residual":  # ours (issue 21): only what the drawing adds to the input image
            if reference_pixel_values is None:
                raise ValueError("latent_target residual needs reference_pixel_values (LatentCollator(reference_images=True))")
            targets = targets - latent.helper_targets(model, reference_pixel_values, reference_image_grid_thw, k,
                                                      self.args.compress)
        # stage 1 is the latent core with the helper targets as the slots' inputs (teacher forcing)
        hidden = latent.latent_hidden_states(model, input_ids, attention_mask, pixel_values, image_grid_thw,
                                             mm_token_type_ids, latent_mask, latent_inputs=targets.reshape(-1, targets.shape[-1]))
        ce_sum, n_correct, n = answer_ce(model, hidden, labels)
        before = torch.roll(latent_mask, shifts=-1, dims=1)  # position p_t - 1 of every slot p_t
        pred = hidden[before].float()
        cos = 1.0 - F.cosine_similarity(pred, targets.reshape(-1, targets.shape[-1]).float(), dim=-1).mean()
        return LatentSFTOutput(ce_sum=ce_sum, cos_loss=cos, n_correct=n_correct, n_tokens=n, n_slots=n_slots)
