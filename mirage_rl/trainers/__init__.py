"""Trainers and their configs, paired as TRL pairs them: ``sft_config`` / ``sft_trainer`` (stage 1 and 2, on
``SFTTrainer``), ``grpo_config`` / ``grpo_trainer`` (latent GRPO, on ``GRPOTrainer``); the fields both configs share
are declared once in ``latent_config``; ``checkpointing`` makes checkpoints complete or ignored."""

from .grpo_config import MirageGRPOConfig
from .grpo_trainer import MirageGRPOTrainer
from .sft_config import MirageSFTConfig
from .sft_trainer import Stage1Trainer, Stage2Trainer

__all__ = ["MirageGRPOConfig", "MirageGRPOTrainer", "MirageSFTConfig", "Stage1Trainer", "Stage2Trainer"]
