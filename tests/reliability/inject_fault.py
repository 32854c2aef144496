"""Run ``mirage-rl`` with a real SIGKILL injected at a chosen point (test helper, used in a subprocess).

    python tests/reliability/inject_fault.py FAULT N -- <mirage-rl arguments>

FAULT:
  step        killed right after optimizer step N (before that step is logged or checkpointed)
  checkpoint  killed while saving checkpoint-N: its model weights are written, optimizer/RNG/state not
  final-save  killed while the final model is written (N-th call of ``save_pretrained``; weights half written)
  dataset     killed while a dataset is saved: after the N-th split's files are written, before the rename
  eval-batch  killed while decoding the N-th evaluation batch (the earlier batches are in the journal)
"""

import os
import signal
import sys


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    fault, n = sys.argv[1], int(sys.argv[2])
    argv = sys.argv[sys.argv.index("--") + 1:]
    if fault == "step":
        from transformers.trainer_callback import DefaultFlowCallback

        original = DefaultFlowCallback.on_step_end

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == n:
                die()
            return original(self, args, state, control, **kwargs)

        DefaultFlowCallback.on_step_end = on_step_end
    elif fault == "checkpoint":
        from transformers import Trainer

        original = Trainer._save_optimizer_and_scheduler

        def save_optimizer(self, output_dir):
            if self.state.global_step == n:
                die()
            return original(self, output_dir)

        Trainer._save_optimizer_and_scheduler = save_optimizer
    elif fault == "final-save":
        import transformers.modeling_utils as modeling_utils

        original = modeling_utils.safe_save_file
        calls = [0]

        def save_file(tensors, filename, metadata=None):
            calls[0] += 1
            if calls[0] == n:
                with open(filename, "wb") as f:
                    f.write(b"\0" * 1024)  # a torn weights file
                die()
            return original(tensors, filename, metadata=metadata)

        modeling_utils.safe_save_file = save_file
    elif fault == "dataset":
        from datasets import Dataset

        original = Dataset.save_to_disk
        calls = [0]

        def save_to_disk(self, *args, **kwargs):
            original(self, *args, **kwargs)
            calls[0] += 1
            if calls[0] == n:
                die()

        Dataset.save_to_disk = save_to_disk
    elif fault == "eval-batch":  # the n-th decoded batch of an evaluation, whatever the engine
        from mirage_rl.engines import HFEngine

        original = HFEngine.rollout
        calls = [0]

        def rollout(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                die()
            return original(self, *args, **kwargs)

        HFEngine.rollout = rollout
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    from mirage_rl.cli import main as cli

    sys.exit(cli(argv))


if __name__ == "__main__":
    main()
