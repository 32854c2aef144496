from .sft import MirageSFTConfig, Stage1Trainer, Stage2Trainer

__all__ = ["MirageSFTConfig", "Stage1Trainer", "Stage2Trainer"]
