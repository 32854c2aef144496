"""``MirageGRPOConfig``: TRL's ``GRPOConfig`` plus the latent fields, with the TRL options the latent rollout honours
and those it refuses (see the class docstring)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from .latent_config import LatentFields

LATENT_OBJECTIVES = ("none", "gaussian")


@dataclass
class MirageGRPOConfig(LatentFields, GRPOConfig):
    """``GRPOConfig`` plus the latent fields (the shared ones, ``latent_mode``, ``latent_fill`` and
    ``overwrite_output_dir``, are documented in :class:`~mirage_rl.trainers.latent_config.LatentFields`; unset,
    ``latent_mode`` is the checkpoint's recorded mode, else ``hidden``).

    Fields:
        latent_objective: ``none`` or ``gaussian`` (see the module docstring).
        latent_sigma: the fixed standard deviation of Gaussian latents (hidden-state units).
        cache_prompt_images: run the image processor and the frozen vision tower once per distinct prompt image of a
            generation batch, and reuse their outputs in the rollout, old/reference log-probs and the loss
            (:mod:`mirage_rl.image_cache`).
        shared_prefix: run each group's prompt once (issue 22; ours, TRL runs it once per rollout): the rollout
            prefills each distinct prompt once (``generation.generate(share_prompts=True)``); in the old,
            reference and policy log-probs, the rows of a micro-batch whose prompts (ids, mask, images) are identical
            run the prompt (minus its last token) through the decoder once, and each row's completion attends to the
            group's prompt keys without copying them over the rows
            (:func:`mirage_rl.latent.shared_prefix_hidden_states`, :mod:`mirage_rl.prefix_attention`; same values and
            gradients). Rows of a group need not be adjacent (TRL
            shuffles a generation batch before splitting it into micro-batches); groups a micro-batch holds only part
            of share among the rows it holds. Works under non-reentrant gradient checkpointing. Skipped (the unshared
            forward runs, with a warning) with reentrant checkpointing, sliding-window layers or ``latent_fill:
            multipass``, and when no two rows of a micro-batch share a prompt.
        vllm_importance_sampling_correction: TRL's truncated / masked importance-sampling correction (same name and
            semantics, with ``vllm_importance_sampling_mode``, ``_clip_min``, ``_clip_max``), applied to latent rollouts:
            the rollout's sampling-time log-probs (cached decode) and the recomputed ones (full forward) differ in
            bf16 (up to 0.14 nats measured on CPU), and the loss is weighted by ``exp(recomputed - sampled)``, clipped
            or masked. ``None`` (default): on when the policy is not fp32 (bf16/fp16 weights, or ``bf16``/``fp16``
            mixed precision), off in fp32 (where the two agree to ~1e-5); with ``use_vllm``: on (vLLM's kernels are
            not the trainer's; TRL's default). Logged as
            ``sampling/importance_sampling_ratio/{mean,min,max,clipped_fraction}`` and
            ``sampling/sampling_logp_difference/{mean,max}``.
        nan_reward_patience: stop training when a reward function returns NaN (or None) for every completion of this
            many consecutive generation batches (each such batch is logged as a warning); 0 never stops.

    TRL options and the latent rollout (``mirage_rl.generation.generate`` replaces TRL's generation):

    * honoured: ``temperature``, ``top_p``, ``max_completion_length``, ``num_generations``, ``beta``, ``loss_type``,
      ``epsilon``/``epsilon_high``, ``importance_sampling_level``, ``mask_truncated_completions``,
      ``top_entropy_quantile``, ``entropy_coef`` (text tokens; latent slots carry no entropy), ``reward_weights``,
      ``scale_rewards``, ``steps_per_generation``, ``num_iterations``, ``sync_ref_model``, ``seed``, ``use_vllm``
      with ``vllm_mode: colocate`` (every latent mode: :mod:`mirage_rl.engines.vllm_engine`; ``server`` for
      ``latent_mode: none`` only), ``vllm_gpu_memory_utilization``, ``vllm_max_model_length``;
      ``generation_kwargs`` keys ``eos_token_id`` (extra end-of-completion ids, also in TRL's masks),
      ``suppress_tokens`` (never sampled) and ``do_sample: true``.
    * refused at start-up, with the reason: ``top_k``, ``min_p``, ``repetition_penalty``, any other
      ``generation_kwargs`` key, ``cache_implementation`` (the rollout keeps a ``DynamicCache``),
      ``use_transformers_continuous_batching``, ``vllm_mode: server`` with a latent mode; with ``latent_objective:
      gaussian`` also ``top_entropy_quantile < 1`` (slots would be ranked by a token entropy they do not have),
      ``entropy_coef`` / ``use_adaptive_entropy`` (the bonus would count the slots' token entropy) and
      ``importance_sampling_level: sequence`` (it would average Gaussian log-densities with token log-probs).
    """

    latent_objective: str = field(default="none", metadata={"help": f"One of {LATENT_OBJECTIVES}."})
    latent_sigma: float = field(default=0.1, metadata={"help": "Std of Gaussian latents (latent_objective: gaussian)."})
    cache_prompt_images: bool = field(default=True, metadata={
        "help": "Process and encode each distinct prompt image once per generation batch (mirage_rl.image_cache)."})
    shared_prefix: bool = field(default=True, metadata={
        "help": "Run each group's shared prompt once in the log-prob and loss forwards (same values and gradients)."})
    vllm_importance_sampling_correction: bool | None = field(default=None, metadata={
        "help": "Importance-sampling correction of the rollout's log-probs against the recomputed ones (TRL's option, "
                "with its vllm_importance_sampling_mode / _clip_min / _clip_max), for latent rollouts too. Default: on "
                "when the policy is not fp32 (bf16 weights or mixed precision), off in fp32; with use_vllm: on."})
    nan_reward_patience: int = field(default=3, metadata={
        "help": "Stop after a reward function returns NaN/None for every completion of this many consecutive "
                "generation batches (0: never stop, only warn)."})

    def __post_init__(self):
        if self.use_vllm:  # before TRL's own check, whose ImportError names TRL's extra, not ours
            from ..engines import require_vllm

            require_vllm("use_vllm")
            if self.vllm_mode == "server" and self.latent_mode not in (None, "none"):
                raise ValueError(f"vllm_mode: server with latent_mode: {self.latent_mode}: latent decoding runs in a "
                                 "model runner installed in the vLLM process that decodes, and TRL's vllm-serve starts "
                                 "stock workers; use vllm_mode: colocate (docs/vllm_latent_rollouts.md)")
        super().__post_init__()
        self.check_latent_fields()
        if self.latent_objective not in LATENT_OBJECTIVES:
            raise ValueError(f"latent_objective must be one of {LATENT_OBJECTIVES}, got {self.latent_objective!r}")
        if self.latent_objective == "gaussian" and not self.latent_sigma > 0:
            raise ValueError(f"latent_sigma must be > 0 for latent_objective: gaussian, got {self.latent_sigma}")
        unsupported = {"top_k": (self.top_k, (0, None)), "min_p": (self.min_p, (None, 0.0)),
                       "repetition_penalty": (self.repetition_penalty, (1.0,))}
        for name, (value, neutral) in unsupported.items():
            if value not in neutral:
                raise ValueError(f"{name}={value}: latent rollouts sample with temperature and top_p only; unset {name}")
        if self.use_transformers_continuous_batching:
            raise ValueError("use_transformers_continuous_batching: latent rollouts use mirage_rl.generation; unset it")
        if self.nan_reward_patience < 0:
            raise ValueError(f"nan_reward_patience must be >= 0 (0: never stop), got {self.nan_reward_patience}")
        if not (self.use_vllm and self.latent_mode == "none"):  # our rollout engines decode (TRL's vLLM path: none)
            if self.cache_implementation is not None:
                raise ValueError(f"cache_implementation={self.cache_implementation!r}: latent rollouts keep a "
                                 "DynamicCache (the latent fill appends one position at a time); unset it")
            unsupported = sorted(set(self.generation_kwargs or {}) - set(GENERATION_KWARGS))
            if unsupported:
                raise ValueError(f"generation_kwargs {unsupported}: latent rollouts (mirage_rl.generation) honour only "
                                 f"{list(GENERATION_KWARGS)}; set temperature, top_p and max_completion_length as "
                                 "options of their own and remove the others")
            if (self.generation_kwargs or {}).get("do_sample", True) is not True:
                raise ValueError("generation_kwargs do_sample: false: GRPO rollouts sample; remove it")
        if self.latent_objective == "gaussian":
            why = {"top_entropy_quantile": (self.top_entropy_quantile < 1.0,
                                            "it ranks positions by token entropy, which a Gaussian latent slot does "
                                            "not have, and would drop them: set 1.0"),
                   "entropy_coef": (self.entropy_coef != 0.0 or self.use_adaptive_entropy,
                                    "the entropy bonus would count the latent slots' token entropy: set 0 and "
                                    "use_adaptive_entropy: false"),
                   "importance_sampling_level": (self.importance_sampling_level == "sequence",
                                                 "a sequence ratio would average Gaussian log-densities with token "
                                                 "log-probs: use token")}
            for name, (bad, reason) in why.items():
                if bad:
                    raise ValueError(f"{name}={getattr(self, name)!r} with latent_objective: gaussian: {reason}")


#: ``generation_kwargs`` keys the latent rollout honours (see ``MirageGRPOConfig``)
GENERATION_KWARGS = ("eos_token_id", "suppress_tokens", "do_sample")
