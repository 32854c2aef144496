"""GRPO with latent-interleaved rollouts, on TRL's ``GRPOTrainer`` (the RL stage that Mirage, arXiv
2506.17218, describes but never released).

A rollout decodes with :func:`mirage_rl.generation.generate`, the loop evaluation uses: after a sampled
``<|latent_start|>`` the next k inputs are latent vectors, then ``<|latent_end|>`` is forced. Old, reference
and policy log-probs re-run the same latent computation over the whole sequence, so every text token after a
latent block is scored under the latents its policy produced. Two ``latent_objective``s:

* ``none``: a latent is the policy's own deterministic hidden state. Latent slots and the forced end carry no
  action, so they are left out of the token loss; the gradient of the text tokens after a block flows back
  through the recurrent fill (as in stage 2).
* ``gaussian`` (Monet's VLPO, arXiv 2511.21395): at sampling time each latent input is ``z = h + sigma * eps``;
  ``z`` is kept with the rollout, the slot's log-prob is ``log N(z; h_theta, sigma^2 I)`` (up to a constant that
  cancels), and it enters the importance ratio like a token's. Latents become actions the objective can
  reinforce directly, not only through the text they lead to.

TRL hooks overridden (TRL pinned to 1.16; ``tests/test_grpo.py`` checks they exist with these signatures):
``_generate_single_turn`` (the rollout), ``_generate`` (completions decoded with their latent tokens for the
reward functions), ``_generate_and_score_completions`` (latent loss mask, Gaussian latents),
``_get_per_token_logps_and_entropies`` (latent fill), ``_compute_loss`` (passes the Gaussian latents) and
``_calculate_rewards`` (stops on rewards that stay NaN); and
transformers' ``Trainer._save_checkpoint`` (complete-or-ignored checkpoints, ``trainers/checkpointing.py``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import time
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from transformers.modeling_outputs import BaseModelOutputWithPast
from trl import GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp, unwrap_model_for_generation
from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model, pad

from .. import latent, prefix_attention
from ..latent import check_decoding_mode, resolve_latent_mode
from ..limits import check_new_tokens
from ..engines import DecodeSettings, HFEngine, RolloutBatch
from ..image_cache import ImageProcessingCache, VisionFeatureCache
from ..modeling import LatentTokens, load_model
from ..patching import is_patched, original, patch_method
from .checkpointing import AtomicCheckpointMixin
from .grpo_config import MirageGRPOConfig

logger = logging.getLogger(__name__)

def _latent_backbone_forward(self, input_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None,
                             mm_token_type_ids=None, latent_mask=None, latent_inputs=None, latent_fill_method="auto",
                             latent_fused_steps="off",
                             prefix_rows=None, prefix_len=None, prefix_pixel_values=None, prefix_image_grid_thw=None,
                             **kwargs):
    """The backbone's ``forward`` (``model.model``) with latent slots: installed on the backbone instance, called by TRL's fused
    LM head (``add_fused_lm_head``) with ``latent_mask`` (and, for Gaussian latents, ``latent_inputs``), and with
    ``prefix_rows`` / ``prefix_len`` / ``prefix_pixel_values`` / ``prefix_image_grid_thw`` when rows share their
    prompt (:func:`mirage_rl.latent.shared_prefix_hidden_states`; ``pixel_values`` is then ``None`` and
    ``image_grid_thw`` every row's, for the positions). Without them it is the original forward. With
    ``latent_inputs`` the hidden states before each slot are kept in the trainer's ``RolloutState.slot_hidden``
    ``(N, H)`` (the backbone's ``_rollout_state``) for the Gaussian log-density."""
    if prefix_rows is not None:
        hidden = latent.shared_prefix_hidden_states(self, input_ids, attention_mask, image_grid_thw, mm_token_type_ids,
                                                    latent_mask, latent_inputs, prefix_rows, prefix_len,
                                                    prefix_pixel_values, prefix_image_grid_thw)
    elif latent_mask is None:
        return original(self, "forward")(input_ids=input_ids, attention_mask=attention_mask,
                                             pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                                             mm_token_type_ids=mm_token_type_ids, **kwargs)
    else:
        hidden = latent.latent_hidden_states(self, input_ids, attention_mask, pixel_values, image_grid_thw,
                                             mm_token_type_ids, latent_mask, latent_inputs, latent_fill_method,
                                             latent_fused_steps)
    state = getattr(self, "_rollout_state", None)  # the trainer's RolloutState (set by MirageGRPOTrainer)
    if latent_inputs is not None and state is not None:
        state.slot_hidden = hidden[:, :-1][latent_mask[:, 1:]]
    return BaseModelOutputWithPast(last_hidden_state=hidden)


def install_latent_forward(model) -> None:
    """Make ``model(..., latent_mask=...)`` run the latent computation inside the backbone (idempotent)."""
    bb = latent.backbone(model)
    if not is_patched(bb, "forward"):
        patch_method(bb, "forward", _latent_backbone_forward)


@dataclass
class RolloutState:
    """The per-batch rollout state that crosses TRL's hooks, owned by the trainer (``trainer.rollout_state``).

    * ``latents`` ``(B, S, H)``: the Gaussian latents of the generation batch being scored. Set by
      :meth:`MirageGRPOTrainer._generate_single_turn`, read by the old/reference log-prob calls inside TRL's
      ``_generate_and_score_completions``, cleared when that method returns (the batch then carries them as
      ``latent_values``).
    * ``loss_latents``: the micro-batch's ``latent_values`` during ``_compute_loss`` (set on entry, cleared on exit),
      read by ``_get_per_token_logps_and_entropies``.
    * ``slot_hidden`` ``(N, H)``: the hidden states before the Gaussian slots of the last latent forward, set by the
      installed backbone forward and read right after it (TRL's fused LM head returns only log-probs and entropies).
    * ``generation_time``: seconds of rollout decoding in the current generation batch (``time/generation``).
    """

    latents: torch.Tensor | None = None
    loss_latents: torch.Tensor | None = None
    slot_hidden: torch.Tensor | None = None
    generation_time: float = 0.0


@contextlib.contextmanager
def _latent_vllm(colocate: bool, latent_decoding: bool, dtype: torch.dtype):
    """While TRL builds its colocated ``vllm.LLM`` (``VLLMGeneration._init_vllm``, TRL 1.16): build it with
    :func:`mirage_rl.engines.vllm_engine.latent_llm_options` (the latent worker, whose plain linear layers let TRL's
    in-place weight sync reach the weights; the policy's dtype; eager mode; image embeddings as inputs; prefix caching
    off for latent decoding). TRL gives ``LLM(...)`` no hook for these; the name is swapped in TRL's module for the
    call only."""
    if not colocate:
        yield
        return
    from unittest import mock

    from trl.generation import vllm_generation

    from ..engines.vllm_engine import latent_llm_options, prepare_environment

    prepare_environment()
    stock = vllm_generation.LLM
    options = latent_llm_options(latent_decoding, str(dtype).removeprefix("torch."))
    with mock.patch.object(vllm_generation, "LLM", lambda **kwargs: stock(**{**kwargs, **options})):
        yield


class MirageGRPOTrainer(AtomicCheckpointMixin, GRPOTrainer):
    """``GRPOTrainer`` whose rollouts interleave latent steps (see the module docstring).

    Args: as ``GRPOTrainer``; ``model`` must be a loaded model of a supported family (:mod:`mirage_rl.backbones`;
    not a path) with latent tokens unless
    ``latent_mode`` is ``none``; ``processing_class`` its processor (the tokenizer pads on the left).
    Raises:
        ValueError: a model given as a path, a missing processor, a latent mode the checkpoint cannot run, or
            Gaussian latents without ``latent_mode: hidden``; tools at rollout time.

    State that crosses TRL's hooks (TRL's signatures leave no other way) travels as one object the trainer owns,
    ``self.rollout_state`` (:class:`RolloutState`, which documents each field's lifecycle); the installed backbone
    forward holds a reference to it. Rollouts go through the rollout-engine interface (:mod:`mirage_rl.engines`):
    ``self.hf_engine`` (the HF loop on the unwrapped policy), or with ``use_vllm`` a
    :class:`~mirage_rl.engines.vllm_engine.VLLMEngine` around TRL's colocated ``LLM``, built with the latent worker.
    """

    _tag_names = ["trl", "grpo", "mirage-rl"]

    def __init__(self, model, reward_funcs=None, args: MirageGRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, callbacks=None, optimizers=(None, None), peft_config=None):
        if isinstance(model, str):
            raise ValueError("MirageGRPOTrainer needs a loaded model (mirage_rl.modeling.load_model), not a path")
        if args is None or not isinstance(args, MirageGRPOConfig):
            raise ValueError("args must be a MirageGRPOConfig")
        where = getattr(model, "name_or_path", "model")
        self.latent_mode = resolve_latent_mode(args.latent_mode, model.config, where=where).value
        check_decoding_mode(self.latent_mode, model.config, where)  # as eval does: rollouts decode
        check_new_tokens(model.config, args.max_completion_length, option="max_completion_length")
        if args.use_vllm:
            from ..engines.vllm_engine import checkpoint_problem, vllm_device

            why = checkpoint_problem(getattr(model, "name_or_path", ""), vllm_device())
            if why is not None:
                raise ValueError(f"use_vllm: vLLM cannot load the policy's checkpoint: {why}")
        self.latent_tokens = None if self.latent_mode == "none" else LatentTokens.for_model(
            model, processing_class, where=getattr(model, "name_or_path", "model"))
        self.latent_objective = args.latent_objective
        if self.latent_objective == "gaussian" and self.latent_mode != "hidden":
            raise ValueError(f"latent_objective: gaussian samples around hidden states: it needs latent_mode: hidden, "
                             f"got {self.latent_mode!r}")
        if processing_class is None or not hasattr(processing_class, "image_processor"):
            raise ValueError("processing_class must be the model's processor (mirage_rl.modeling.load_processor)")
        processing_class.tokenizer.padding_side = "left"
        # The reference is a frozen copy of the policy with the same latent behaviour; TRL would rebuild the
        # stock class from the checkpoint path, so it builds none (beta is set to 0 during its __init__).
        beta, sync = args.beta, args.sync_ref_model
        own_ref = beta != 0.0 and not is_peft_model(model) and peft_config is None
        ref = self._reference_copy(model, args).eval().requires_grad_(False) if own_ref else None
        if own_ref:
            args.beta, args.sync_ref_model = 0.0, False
        try:
            with _latent_vllm(args.use_vllm and args.vllm_mode == "colocate", self.latent_mode != "none", model.dtype):
                super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                                 eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                                 optimizers=optimizers, peft_config=peft_config)
        finally:
            args.beta, args.sync_ref_model = beta, sync
        self.beta = beta
        if own_ref:
            self.ref_model = self._prepare_reference(ref, args)
        install_latent_forward(self.model)
        if self.ref_model is not None:
            install_latent_forward(self.accelerator.unwrap_model(self.ref_model))
        self.vision_cache = self.processing_cache = None
        if args.cache_prompt_images:
            # one feature cache for policy and reference: the reference's frozen tower is a copy of the policy's
            self.vision_cache, self.processing_cache = VisionFeatureCache(), ImageProcessingCache()
            self.vision_cache.install(self.model)
            if self.ref_model is not None:
                self.vision_cache.install(self.accelerator.unwrap_model(self.ref_model))
        requested = args.vllm_importance_sampling_correction
        if self.use_vllm and self.latent_mode == "none":  # TRL's own correction of its vLLM rollouts (default on)
            self.vllm_importance_sampling_correction = True if requested is None else bool(requested)
            self.rollout_is_correction = False
        elif self.use_vllm:  # latent rollouts in vLLM: ours, over the positions in the loss (default on)
            self.vllm_importance_sampling_correction = False
            self.rollout_is_correction = True if requested is None else bool(requested)
        else:
            not_fp32 = any(p.dtype != torch.float32 for p in self.model.parameters() if p.is_floating_point())
            self.rollout_is_correction = bool(not_fp32 or args.bf16 or args.fp16) if requested is None else bool(requested)
        extra = dict(args.generation_kwargs or {}) if not (args.use_vllm and self.latent_mode == "none") else {}
        eos = extra.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        # an extra end-of-completion id ends rollouts and TRL's completion masks alike
        self.eos_token_ids = list(self.eos_token_ids) + [i for i in eos if i not in self.eos_token_ids]
        self._suppress_extra = list(extra.get("suppress_tokens") or [])
        self._nan_reward_streak = [0] * len(self.reward_funcs)  # consecutive all-NaN generation batches per function
        self.rollout_state = RolloutState()
        for m in (self.model, self.ref_model):
            if m is not None:
                latent.backbone(self.accelerator.unwrap_model(m))._rollout_state = self.rollout_state
        self._prefix_skips: set[str] = set()  # reasons shared_prefix could not run, logged once each
        self.hf_engine = HFEngine(None, self.processing_class)
        self._vllm_engine = None  # built on the first rollout, around TRL's colocated LLM

    @staticmethod
    def _reference_copy(model, args):
        """A copy of the start policy. Under DeepSpeed ZeRO-3 the loaded parameters are shards (a deepcopy would copy
        empty tensors), so the checkpoint is loaded again, sharded the same way."""
        from transformers.integrations import is_deepspeed_zero3_enabled

        if not is_deepspeed_zero3_enabled():
            return copy.deepcopy(model)
        return load_model(model.name_or_path, dtype=model.dtype, trust_remote_code=args.trust_remote_code)

    def _prepare_reference(self, ref, args):
        if args.disable_dropout:
            disable_dropout_in_model(ref)
        add_fused_lm_head(ref, temperature=self.temperature, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32)
        if self.is_deepspeed_enabled:
            ref = prepare_deepspeed(ref, self.accelerator)
        elif self.is_fsdp_enabled:
            ref = prepare_fsdp(ref, self.accelerator)
        else:
            ref = self.accelerator.prepare_model(ref, evaluation_mode=True)
        if args.sync_ref_model:
            from trl.trainer.callbacks import SyncRefModelCallback

            self.add_callback(SyncRefModelCallback(ref_model=ref, accelerator=self.accelerator))
        return ref

    # ----------------------------------------------------------------------------------------- rollouts
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """TRL hook (``GRPOTrainer._generate_single_turn``): one latent-interleaved rollout per prompt row (the rows
        already repeat each prompt ``num_generations`` times). Row i of the global generation batch samples with its
        own generator seeded by :func:`rollout_seed` (``args.seed``, train/eval, global step, i), so rollouts do not
        depend on the number of processes or on a row's batch mates, and a resumed run samples what it would have. Returns ``(completion_ids, logprobs)``: per row the
        ids up to and including the first end-of-sequence token, and the sampling-time log-probs (0.0 at forced
        positions; the Gaussian log-density at latent slots with ``latent_objective: gaussian``). The rollout goes
        through the engine interface: the HF engine, or with ``use_vllm`` the vLLM engine (:meth:`_vllm_rollout`);
        a text-only policy (``latent_mode: none``) with ``use_vllm`` runs TRL's own vLLM generation."""
        if self.use_vllm and self.latent_mode == "none":  # a text-only policy: TRL's vLLM rollouts, unchanged
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        if self.tools or has_tool_images:
            raise ValueError("MirageGRPOTrainer does not support tools")
        device = self.accelerator.device
        tensors = [torch.tensor(ids) for ids in prompt_ids]
        batch = {"input_ids": pad(tensors, padding_value=self._tokenizer.pad_token_id, padding_side="left"),
                 "attention_mask": pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side="left")}
        for k, v in multimodal_fields.items():
            if isinstance(v, torch.Tensor):
                batch[k] = v
            elif isinstance(v, list) and v and isinstance(v[0], list):  # per-token fields: left-pad like input_ids
                batch[k] = pad([torch.tensor(x) for x in v], padding_value=0, padding_side="left")
            else:
                batch[k] = torch.as_tensor(v)
        batch = {k: v.to(device) for k, v in batch.items()}
        config = self.accelerator.unwrap_model(self.model).config  # (a wrapped model: DDP has no config)
        suppress = [i for i in (getattr(config, "image_token_id", None),
                                getattr(config, "video_token_id", None)) if i is not None]
        suppress += self._suppress_extra
        # one random stream per row of the global generation batch: N ranks sample what one process samples
        mode = "train" if self.model.training else "eval"
        first = self.accelerator.process_index * len(prompt_ids)
        settings = DecodeSettings(
            max_new_tokens=self.max_completion_length, latent_mode=self.latent_mode, do_sample=True,
            temperature=self.temperature, top_p=self.top_p, return_logprobs=True,
            seeds=[rollout_seed(self.args.seed, mode, self.state.global_step, first + i)
                   for i in range(len(prompt_ids))],
            latent_sigma=self.args.latent_sigma if self.latent_objective == "gaussian" else None,
            suppress_token_ids=suppress, eos_token_ids=list(self.eos_token_ids), length_option="max_completion_length",
            share_prompts=self.args.shared_prefix, fused_steps=self.args.latent_fused_steps)
        t0 = time.perf_counter()
        if self.use_vllm:
            out = self._vllm_rollout(RolloutBatch(batch), settings)
        else:
            with (unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                              gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                              gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)
                  as unwrapped, torch.no_grad()):
                self.hf_engine.model = unwrapped
                try:
                    out = self.hf_engine.rollout(RolloutBatch(batch), settings)
                finally:
                    self.hf_engine.model = None
        self.rollout_state.generation_time += time.perf_counter() - t0
        eos = set(self.eos_token_ids) | {self._tokenizer.pad_token_id}
        seqs, logps = out.sequences.tolist(), out.logprobs.tolist()
        slots = self._completion_slot_masks(batch["input_ids"], out.sequences)[0] if out.latents is not None else None
        completion_ids, logprobs, latents = [], [], []
        for i, row in enumerate(seqs):
            n = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
            completion_ids.append(row[:n])
            logprobs.append(logps[i][:n])
            if slots is not None:
                latents.append(out.latents[i, :n][slots[i, :n]])
        self.rollout_state.latents = _pad_latents(latents) if out.latents is not None else None
        return completion_ids, logprobs

    def _vllm_rollout(self, batch: RolloutBatch, settings: DecodeSettings):
        """A latent rollout on TRL's colocated ``LLM`` (built with the latent worker by :func:`_latent_vllm`): the
        policy's weights are synced into it first whenever the global step moved (TRL's ``sync_weights``, as TRL's own
        vLLM path does); image prompts enter as the policy's own image features."""
        from ..engines.vllm_engine import VLLMEngine

        if self.state.global_step != self._last_loaded_step:
            self.vllm_generation.sync_weights()
            self._last_loaded_step = self.state.global_step
        if self._vllm_engine is None:
            policy = self.accelerator.unwrap_model(self.model)
            self._vllm_engine = VLLMEngine(self.vllm_generation.llm, self.processing_class, self.latent_tokens,
                                           image_features=lambda pv, grid: latent.image_embeds(policy, pv, grid))
        out = self._vllm_engine.rollout(batch, settings)
        device = self.accelerator.device
        for name in ("sequences", "logprobs", "latents"):
            value = getattr(out, name)
            if value is not None:
                setattr(out, name, value.to(device))
        return out

    def _generate(self, prompts):
        """TRL hook (``GRPOTrainer._generate``): as TRL, then the completions handed to the reward functions are
        re-decoded with their latent tokens kept (TRL drops all special tokens), so ``format_reward`` sees the
        latent block as ``<|latent_start|><|latent_pad|>...<|latent_end|>``."""
        result = list(super()._generate(prompts))
        completion_ids = result[1]
        lt = self.latent_tokens
        keep = {lt.start, lt.pad, lt.end} if lt else set()
        special = set(self._tokenizer.all_special_ids) - keep
        texts = [self._tokenizer.decode([t for t in ids if t not in special], skip_special_tokens=False)
                 for ids in completion_ids]
        conversational = result[3] and isinstance(result[3][0], list)
        result[3] = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        return tuple(result)

    def _slot_masks(self, ids: torch.Tensor):
        lt = self.latent_tokens
        if lt is None:
            z = torch.zeros_like(ids, dtype=torch.bool)
            return z, z
        return latent.slot_masks(ids, lt.start, lt.pad, lt.end, lt.latent_size)

    def _completion_slot_masks(self, prompt_ids: torch.Tensor, completion_ids: torch.Tensor):
        """``(slots, forced_end)`` ``(B, C)`` of the completion, read from prompt + completion: a block whose
        ``<|latent_start|>`` ends the (left-padded) prompt has its slots at the start of the completion, where the
        scoring forward (:meth:`_get_per_token_logps_and_entropies`, which reads the whole sequence) fills them too."""
        width = prompt_ids.shape[1]
        slots, forced_end = self._slot_masks(torch.cat([prompt_ids.to(completion_ids.device), completion_ids], 1))
        return slots[:, width:], forced_end[:, width:]

    def _generate_and_score_completions(self, inputs):
        """TRL hook (``GRPOTrainer._generate_and_score_completions``): as TRL, then latent slots (unless Gaussian)
        and forced ``<|latent_end|>`` tokens are removed from the loss through TRL's ``tool_mask`` (which
        ``_compute_loss`` multiplies into the completion mask) and ``num_items_in_batch`` is recounted; Gaussian
        latents travel with the batch as ``latent_values`` ``(B, S, H)``. The prompt-image caches start empty for each
        generation batch (``cache_prompt_images``). Logs ``time/generation`` (latent
        decoding) and ``time/scoring`` (the rest: image processing, old/reference log-probs, rewards, advantages)
        in seconds, and ``latent/blocks_per_completion``."""
        self.rollout_state.latents = None
        if self.vision_cache is not None:  # a new generation batch: the last one's images are done
            self.vision_cache.clear()
        processing = (self.processing_cache.active(self.processing_class.image_processor)
                      if self.processing_cache is not None else contextlib.nullcontext())
        self.rollout_state.generation_time, t0 = 0.0, time.perf_counter()
        try:
            with processing:
                output = super()._generate_and_score_completions(inputs)
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["time/generation"].append(self.rollout_state.generation_time)
            self._metrics[mode]["time/scoring"].append(time.perf_counter() - t0 - self.rollout_state.generation_time)
            slots, forced_end = self._completion_slot_masks(output["prompt_ids"], output["completion_ids"])
            keep = ~forced_end if self.latent_objective == "gaussian" else ~(slots | forced_end)
            tool_mask = output.get("tool_mask")
            tool_mask = keep.long() if tool_mask is None else tool_mask * keep.long()
            output["tool_mask"] = tool_mask
            output["num_items_in_batch"] = self.accelerator.gather((output["completion_mask"] * tool_mask).sum()).sum()
            if self.latent_tokens is not None:
                blocks = ((output["completion_ids"] == self.latent_tokens.start).sum(1)
                          + (output["prompt_ids"][:, -1] == self.latent_tokens.start)).float()
                self._metrics[mode]["latent/blocks_per_completion"].append(self.accelerator.gather(blocks).mean().item())
            if self.rollout_state.latents is not None:
                output["latent_values"] = self.rollout_state.latents
            if self.rollout_is_correction and output.get("sampling_per_token_logps") is not None:
                self._rollout_importance_sampling(output, mode)
            return output
        finally:
            self.rollout_state.latents = None

    def _rollout_importance_sampling(self, output: dict, mode: str) -> None:
        """TRL's vLLM importance-sampling correction (``GRPOTrainer._generate_and_score_completions``, TRL 1.16),
        applied to latent rollouts: ``output["importance_sampling_ratio"]`` = ``exp(old - sampled)`` per token, or per
        sequence (summed log-ratio), over the positions in the loss (completion mask x latent ``tool_mask``), clipped
        to ``[clip_min, clip_max]`` (``*_truncate``) or set to 0 outside it (``*_mask``). ``old`` is the policy's
        recomputed log-prob (computed here, without gradient, when TRL did not). Logs the ratio's mean, min, max and
        clipped fraction and the log-prob difference."""
        args = self.args
        mask = output["completion_mask"] * output["tool_mask"]
        old = output.get("old_per_token_logps")
        if old is None:
            ids = torch.cat([output["prompt_ids"], output["completion_ids"]], 1)
            am = torch.cat([output["prompt_mask"], output["completion_mask"]], 1)
            batch = args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size
            with torch.no_grad():
                old, _, _ = self._get_per_token_logps_and_entropies(
                    self.model, ids, am, output["completion_ids"].shape[1], batch_size=batch,
                    pixel_values=output.get("pixel_values"), image_grid_thw=output.get("image_grid_thw"),
                    num_images=output.get("num_images"), mm_token_type_ids=output.get("mm_token_type_ids"))
            output["old_per_token_logps"] = old
        sampled = output["sampling_per_token_logps"]
        diff = torch.nan_to_num((old - sampled) * mask, nan=0.0)
        sequence = args.vllm_importance_sampling_mode in ("sequence_mask", "sequence_truncate")
        ratio = torch.exp(diff.sum(-1, keepdim=True) if sequence else diff)
        lo = args.vllm_importance_sampling_clip_min
        hi = args.vllm_importance_sampling_clip_max
        outside = ((ratio < lo) if lo is not None else torch.zeros_like(ratio, dtype=torch.bool)) | (
            (ratio > hi) if hi is not None else torch.zeros_like(ratio, dtype=torch.bool))
        if args.vllm_importance_sampling_mode.endswith("_truncate"):
            corrected = torch.clamp(ratio, min=lo, max=hi)
        elif args.vllm_importance_sampling_mode.endswith("_mask"):
            corrected = ratio.masked_fill(outside, 0.0)
        else:
            raise ValueError(f"unknown vllm_importance_sampling_mode {args.vllm_importance_sampling_mode!r}")
        output["importance_sampling_ratio"] = corrected
        keep = mask.bool() if not sequence else mask.bool().any(-1, keepdim=True)
        flat, out_flat = ratio[keep], outside[keep]
        gather = self.accelerator.gather
        n = gather(torch.tensor([float(flat.numel())], device=ratio.device)).sum().clamp(min=1)
        metrics = self._metrics[mode]
        metrics["sampling/importance_sampling_ratio/mean"].append((gather(flat.sum().reshape(1)).sum() / n).item())
        metrics["sampling/importance_sampling_ratio/clipped_fraction"].append(
            (gather(out_flat.sum().float().reshape(1)).sum() / n).item())
        if flat.numel():
            metrics["sampling/importance_sampling_ratio/min"].append(gather(flat.min().reshape(1)).min().item())
            metrics["sampling/importance_sampling_ratio/max"].append(gather(flat.max().reshape(1)).max().item())
        delta = (old - sampled).abs()[mask.bool()]
        if delta.numel():
            metrics["sampling/sampling_logp_difference/mean"].append(gather(delta.mean().reshape(1)).mean().item())
            metrics["sampling/sampling_logp_difference/max"].append(gather(delta.max().reshape(1)).max().item())

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL hook (``GRPOTrainer._calculate_rewards``): as TRL, then every reward function that gave no finite value
        (NaN, inf or None) for a whole generation batch is logged as a warning with its name and count; after
        ``nan_reward_patience`` such batches in a row training stops (a NaN reward trains on zero advantages).

        Raises:
            ValueError: a reward function returned no finite reward for ``nan_reward_patience`` batches in a row.
        """
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        bad = ~torch.isfinite(rewards)
        for i, name in enumerate(self.reward_func_names):
            if bool(bad[:, i].all()):
                self._nan_reward_streak[i] += 1
                logger.warning("reward function %s returned NaN/None for all %d completions of this generation batch "
                               "(%d batch(es) in a row)", name, bad.shape[0], self._nan_reward_streak[i])
            else:
                self._nan_reward_streak[i] = 0
            patience = self.args.nan_reward_patience
            if patience and self._nan_reward_streak[i] >= patience:
                raise ValueError(f"reward function {name} returned NaN or None for every completion of "
                                 f"{self._nan_reward_streak[i]} generation batches in a row ({bad.shape[0]} completions "
                                 "each): training on it is training on zero advantages; fix the function (None means "
                                 "'not applicable to this row'), or raise nan_reward_patience (0: never stop)")
        return rewards

    def _compute_loss(self, model, inputs):
        """TRL hook (``GRPOTrainer._compute_loss``): as TRL, with the micro-batch's Gaussian latents visible to
        ``_get_per_token_logps_and_entropies``, and the rollout importance-sampling ratio applied (when on) as TRL
        applies it to vLLM rollouts."""
        self.rollout_state.loss_latents = inputs.get("latent_values")
        # TRL 1.16 multiplies the per-token loss by inputs["importance_sampling_ratio"] only under use_vllm (the one
        # use of use_vllm in _compute_loss; tests/test_grpo.py pins that line): raised for the call when latent
        # rollouts carry the correction
        corrected = self.rollout_is_correction and "importance_sampling_ratio" in inputs
        use_vllm, correction = self.use_vllm, self.vllm_importance_sampling_correction
        if corrected:
            self.use_vllm, self.vllm_importance_sampling_correction = True, True
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self.rollout_state.loss_latents = None
            self.use_vllm, self.vllm_importance_sampling_correction = use_vllm, correction

    # ----------------------------------------------------------------------------------------- scoring
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, pixel_values=None,
                                           image_grid_thw=None, num_images=None, pixel_attention_mask=None,
                                           spatial_shapes=None, num_tiles=None, image_sizes=None, token_type_ids=None,
                                           mm_token_type_ids=None, image_position_ids=None):
        """TRL hook (``GRPOTrainer._get_per_token_logps_and_entropies``): per-token log-probs ``(B, C)`` float (and
        entropies) of the last ``logits_to_keep`` = C tokens, with the latent slots computed as at sampling time:
        recurrent fill (``hidden``), the pad embedding (``dummy``) or the stored Gaussian latents, whose
        log-density replaces the slot's token log-prob. Runs through ``model(...)`` (TRL's fused LM head), so
        DDP/DeepSpeed wrappers see a normal forward.

        Raises:
            ValueError: image inputs of another model family (only Qwen-style ``pixel_values`` + ``image_grid_thw``).
        """
        if any(x is not None for x in (pixel_attention_mask, spatial_shapes, num_tiles, image_sizes, token_type_ids,
                                       image_position_ids)):
            raise ValueError("MirageGRPOTrainer supports Qwen-style image inputs (pixel_values, image_grid_thw)")
        # Lines marked "TRL 1.16" follow TRL's method (trl/trainer/grpo_trainer.py) for Qwen-style image inputs; the
        # rest is the latent fill and the Gaussian slot log-density. Diff them against the next TRL when upgrading.
        batch_size = batch_size or input_ids.size(0)  # TRL 1.16
        slots, _ = self._slot_masks(input_ids)
        slots[:, : input_ids.size(1) - logits_to_keep] = False  # only the completion holds rollout latents
        values = self.rollout_state.loss_latents if self.rollout_state.loss_latents is not None else self.rollout_state.latents
        gaussian = self.latent_objective == "gaussian"
        if gaussian and bool(slots.any()) and values is None:
            raise RuntimeError("Gaussian latents of this batch are missing (internal error: latent_values not passed)")
        unwrapped = self.accelerator.unwrap_model(model)
        all_logps, all_entropies, all_aux = [], [], []  # TRL 1.16
        cum_imgs = torch.tensor([0] + list(num_images)).cumsum(0) if num_images is not None else None  # TRL 1.16
        if pixel_values is not None and image_grid_thw is not None:  # TRL 1.16: image rows per sample
            rows = torch.stack([s.sum() for s in torch.split(image_grid_thw.prod(-1), list(num_images))])
            cum_rows = torch.cat([rows.new_zeros(1), rows.cumsum(0)])
        for start in range(0, input_ids.size(0), batch_size):  # TRL 1.16: chunks of batch_size
            end = min(start + batch_size, input_ids.size(0))  # TRL 1.16
            ids, am = input_ids[start:end], attention_mask[start:end]  # TRL 1.16
            inputs = {"input_ids": ids, "attention_mask": am}  # TRL 1.16
            if pixel_values is not None and image_grid_thw is not None:  # TRL 1.16
                inputs["pixel_values"] = pixel_values[int(cum_rows[start]):int(cum_rows[end])]  # TRL 1.16
                inputs["image_grid_thw"] = image_grid_thw[int(cum_imgs[start]):int(cum_imgs[end])]  # TRL 1.16
            if mm_token_type_ids is not None:  # TRL 1.16
                inputs["mm_token_type_ids"] = mm_token_type_ids[start:end]  # TRL 1.16
            chunk_slots = slots[start:end]
            has_slots = bool(chunk_slots.any())
            if has_slots and self.latent_mode == "hidden":
                inputs["latent_mask"] = chunk_slots
                inputs["latent_fill_method"] = self.args.latent_fill
                inputs["latent_fused_steps"] = self.args.latent_fused_steps
                if gaussian:
                    v, n = values[start:end], chunk_slots.sum(1)
                    inputs["latent_inputs"] = v[torch.arange(v.shape[1], device=v.device)[None] < n[:, None]]
            if self._shares_prefix(unwrapped):
                inputs.update(self._prefix_inputs(unwrapped, inputs, input_ids.size(1) - logits_to_keep - 1))
            if compute_aux_loss:  # TRL 1.16
                inputs["output_router_logits"] = True  # TRL 1.16
            labels = ids.masked_fill(am == 0, -100)  # TRL 1.16: the fused LM head scores the completion
            labels[:, :-logits_to_keep] = -100  # TRL 1.16
            with self.accelerator.autocast():  # TRL 1.16
                outputs = model(**inputs, labels=labels, fused_lm_head=True)  # TRL 1.16
            logps = outputs.log_probs[:, -logits_to_keep:]  # TRL 1.16
            if gaussian and has_slots:
                h = self.rollout_state.slot_hidden
                lp = latent.gaussian_logprob(inputs["latent_inputs"], h, self.args.latent_sigma)
                logps = logps.masked_scatter(chunk_slots[:, -logits_to_keep:], lp.to(logps.dtype))
            all_logps.append(logps)  # TRL 1.16
            if compute_entropy:  # TRL 1.16
                all_entropies.append(outputs.entropy[:, -logits_to_keep:])  # TRL 1.16
            if compute_aux_loss:  # TRL 1.16
                all_aux.append(outputs.aux_loss)  # TRL 1.16
        logps = torch.cat(all_logps, 0)  # TRL 1.16
        entropies = torch.cat(all_entropies, 0) if compute_entropy else None  # TRL 1.16
        aux = torch.stack(all_aux).mean() if compute_aux_loss else None  # TRL 1.16
        return logps, entropies, aux  # TRL 1.16


    def _shares_prefix(self, unwrapped) -> bool:
        """Whether scoring forwards share prompts: ``args.shared_prefix``, not with ``latent_fill: multipass`` (which
        asks for full forwards), and a decoder that can (:func:`mirage_rl.prefix_attention.unsupported`: full
        attention; non-reentrant gradient checkpointing). Where it cannot, the unshared forward runs and the reason is
        logged once."""
        if not self.args.shared_prefix or self.args.latent_fill == "multipass":
            return False
        why = prefix_attention.unsupported(latent.language_model(unwrapped))
        if why is not None and why not in self._prefix_skips:
            self._prefix_skips.add(why)
            logger.warning("shared_prefix: the log-prob forwards run every rollout's prompt: %s", why)
        return why is None

    @staticmethod
    def _prefix_inputs(model, inputs: dict, prefix_len: int) -> dict:
        """The extra forward inputs that make rows with the same first ``prefix_len`` columns (ids, mask, mm token
        types, images: :func:`mirage_rl.latent.prompt_groups`) share one prompt forward: ``prefix_rows``, ``prefix_len``,
        the groups' first rows' ``prefix_pixel_values`` /
        ``prefix_image_grid_thw`` and ``pixel_values: None``; ``{}`` when no two rows share (the unshared forward
        runs)."""
        if prefix_len < 1:
            return {}
        # a row's images are in its prompt (a sampled completion may hold a stray <|vision_start|>)
        groups = latent.prompt_groups(model, inputs["input_ids"], inputs["attention_mask"], prefix_len,
                                      inputs.get("pixel_values"), inputs.get("image_grid_thw"),
                                      inputs.get("mm_token_type_ids"))
        if groups is None:
            return {}
        out = {"prefix_rows": groups.rows, "prefix_len": prefix_len}
        if groups.pixel_values is not None:
            out.update(prefix_pixel_values=groups.pixel_values, prefix_image_grid_thw=groups.image_grid_thw,
                       pixel_values=None)
        return out


def rollout_seed(seed: int, mode: str, step: int, row: int) -> int:
    """The seed of one rollout row: a 63-bit hash of (``seed``, ``mode``, global ``step``, global ``row``)."""
    digest = hashlib.blake2b(f"{seed}/{mode}/{step}/{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def _pad_latents(latents: list[torch.Tensor]) -> torch.Tensor:
    """Per-row ``(n_i, H)`` latent inputs -> ``(B, max n_i, H)`` float32, zero-padded (at least one column)."""
    width = max([1] + [x.shape[0] for x in latents])
    out = latents[0].new_zeros(len(latents), width, latents[0].shape[-1])
    for i, x in enumerate(latents):
        out[i, : x.shape[0]] = x
    return out
