"""Run ``mirage-rl sft|grpo`` (test helper, started by ``accelerate launch`` or plain ``python``) and write every
rank's log history to ``$RANK_LOG_DIR/rank{R}.json``: ``Trainer`` logs the loss (averaged over ranks) and
the gradient norm (computed on each rank after the all-reduce) on every process, so the test can compare ranks.

    RANK_LOG_DIR=DIR accelerate launch ... tests/distributed/rank_logs.py sft --config RECIPE [--key value ...]
"""

import json
import os
import sys
from pathlib import Path

from accelerate.state import AcceleratorState
from transformers import TrainerCallback
from trl import ModelConfig

from mirage_rl.recipe import parse


class RankLog(TrainerCallback):
    start_step = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step = state.global_step  # > 0 when the run resumed from a checkpoint

    def on_train_end(self, args, state, control, **kwargs):
        out = Path(os.environ["RANK_LOG_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        acc = AcceleratorState()
        zero = acc.deepspeed_plugin.zero_stage if acc.deepspeed_plugin is not None else None
        from mirage_rl import latent

        (out / f"rank{args.process_index}.json").write_text(json.dumps(
            {"world_size": args.world_size, "start_step": self.start_step, "distributed_type": str(acc.distributed_type), "zero_stage": zero,
             "log_history": state.log_history, "latent_fills": sorted(m for m, _ in latent._fills_logged)}, indent=1))


def main():
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "sft":
        from mirage_rl.commands.sft import SFTScriptArguments, run_sft
        from mirage_rl.trainers import MirageSFTConfig

        run_sft(*parse((SFTScriptArguments, MirageSFTConfig, ModelConfig), rest), callbacks=[RankLog()])
    elif cmd == "grpo":
        from mirage_rl.commands.grpo import GRPOScriptArguments, run_grpo
        from mirage_rl.trainers import MirageGRPOConfig

        run_grpo(*parse((GRPOScriptArguments, MirageGRPOConfig, ModelConfig), rest), callbacks=[RankLog()])
    else:
        raise SystemExit(f"unknown command {cmd!r}: sft or grpo")
    from mirage_rl.cli import end_process_group

    end_process_group()  # as `mirage-rl` does at the end of a command


if __name__ == "__main__":
    main()
