from .grpo import MirageGRPOConfig, MirageGRPOTrainer
from .sft import MirageSFTConfig, Stage1Trainer, Stage2Trainer

__all__ = ["MirageGRPOConfig", "MirageGRPOTrainer", "MirageSFTConfig", "Stage1Trainer", "Stage2Trainer"]
