"""``mirage-rl grpo``: parse a recipe, load the stage-2 checkpoint and the data, train GRPO with latent rollouts,
save the policy, its training log and a reward curve (thin entry point)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig

from ..atomic import atomic_save_figure
from ..outputs import output_dir_guard, record
from ..trainers import MirageGRPOConfig, MirageGRPOTrainer
from ..trainers.checkpointing import resolve_resume
from .common import SFTScriptArguments, load_model_and_processor, load_train_split, peft_config_for, require_columns
from .common import check_image_columns, run_settings, save_final, split_name

logger = logging.getLogger(__name__)

# Columns the SFT stages need and GRPO does not: dropped so that reward functions do not decode helper images.
SFT_ONLY_COLUMNS = ("helper_image", "answer")


@dataclass
class GRPOScriptArguments(SFTScriptArguments):
    """Data and reward arguments of a GRPO recipe.

    ``reward_kwargs`` maps a reward name to its options (``{plan_success_reward: {rule: strict}}``); on the
    command line it is a JSON string.
    """

    reward_funcs: list[str] = field(default_factory=lambda: ["plan_success_reward", "format_reward"],
                                    metadata={"help": "Shipped reward names (rewards.REWARD_FUNCS) or dotted paths."})
    reward_kwargs: dict | str | None = field(default=None, metadata={"help": "{reward_name: {option: value}}."})

    def __post_init__(self):
        if isinstance(self.reward_kwargs, str):
            try:
                self.reward_kwargs = json.loads(self.reward_kwargs)
            except json.JSONDecodeError as e:
                raise ValueError(f"reward_kwargs must be a JSON object, got {self.reward_kwargs!r}: {e}") from e


def run_grpo(script_args: GRPOScriptArguments, training_args: MirageGRPOConfig, model_args: ModelConfig,
             callbacks: list | None = None):
    """Train GRPO and save model + processor, ``train_log.json`` and ``reward_curve.png`` to
    ``training_args.output_dir``; returns the trainer. ``callbacks``: extra ``TrainerCallback``s.

    With ``use_peft`` GRPO trains LoRA only: the latent token rows (learned in stages 1-2) stay fixed, because TRL's
    fused LM head reads ``lm_head.weight`` directly, which would skip peft's trainable-token rows in the log-probs.

    Raises:
        ValueError: an unknown reward name (listing the known ones, before the model is loaded) or a checkpoint
            without latent tokens when the latent mode needs them (``MirageGRPOTrainer``, before any training).
    """
    import rewards

    settings = run_settings("grpo", script_args, training_args, model_args)
    with output_dir_guard(training_args.output_dir, "model", training_args.overwrite_output_dir, producer="grpo",
                          settings=settings, replace=training_args.replace_output_dir):
        reward_funcs = rewards.load_reward_funcs(script_args.reward_funcs, script_args.reward_kwargs)
        if training_args.reward_weights is not None and len(training_args.reward_weights) != len(reward_funcs):
            raise ValueError(f"reward_weights has {len(training_args.reward_weights)} values for "
                             f"{len(reward_funcs)} reward_funcs {script_args.reward_funcs}")
        train = load_train_split(script_args)
        require_columns(train, ["prompt", "image|images"], split_name(script_args), "GRPO")
        check_image_columns(train, split_name(script_args))
        train = train.remove_columns([c for c in SFT_ONLY_COLUMNS if c in train.column_names])
        resume = resolve_resume(training_args)
        model, processor = load_model_and_processor(model_args, training_args.trust_remote_code)
        trainer = MirageGRPOTrainer(model=model, reward_funcs=reward_funcs, args=training_args, train_dataset=train,
                                    processing_class=processor, callbacks=callbacks,
                                    peft_config=peft_config_for(model_args, model, latent_rows=False))
        trainer.train(resume_from_checkpoint=resume)
        save_final(trainer, processor, trainer.latent_mode, training_args.output_dir, run=settings)
        if trainer.accelerator.is_main_process:
            out = Path(training_args.output_dir)
            history = trainer.state.log_history
            plot_rewards(history, out / "reward_curve.png",
                         title=f"GRPO run {out.name} (from {Path(model_args.model_name_or_path).name})")
            record(out, ["reward_curve.png"], "model")
            logger.info("GRPO time split (s/step): %s", json.dumps(time_split(history)))
    return trainer


def time_split(history: list[dict]) -> dict:
    """Mean seconds per optimizer step spent in generation (latent rollouts), scoring (log-probs of the old and
    reference policies, rewards, advantages) and optimisation (the rest of the step: loss, backward, update), over
    the logged steps. Valid with ``steps_per_generation == gradient_accumulation_steps == 1``."""
    rows = [h for h in history if "time/generation" in h and "step_time" in h]
    if not rows:
        return {}
    gen = sum(h["time/generation"] for h in rows) / len(rows)
    score = sum(h["time/scoring"] for h in rows) / len(rows)
    step = sum(h["step_time"] for h in rows) / len(rows)
    return {"step_s": round(step, 4), "generation_s": round(gen, 4), "scoring_s": round(score, 4),
            "optimisation_s": round(step - gen - score, 4), "logged_steps": len(rows)}


def plot_rewards(history: list[dict], path: str | os.PathLike, title: str = "GRPO") -> None:
    """Mean total reward and each reward function's mean per logged step (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [h for h in history if "reward" in h and "step" in h]
    if not rows:
        return
    from matplotlib.ticker import MaxNLocator

    steps = [h["step"] for h in rows]
    marker = "o" if len(rows) < 20 else None  # a single logged step is a point, not an invisible line
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["reward"] for h in rows], label="reward (weighted sum)", lw=2, marker=marker)
    for key in sorted({k for h in rows for k in h if k.startswith("rewards/") and k.endswith("/mean")}):
        ax.plot(steps, [h.get(key, float("nan")) for h in rows], label=key.split("/")[1], lw=1, marker=marker,
                markersize=3)
    # optimizer steps are whole numbers: a few logged steps are the ticks themselves, more get whole-number ticks
    if len(set(steps)) <= 10:
        ax.set_xticks(sorted(set(steps)))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path)
