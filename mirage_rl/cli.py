"""The ``mirage-rl`` command: ``build-data``, ``create-model``, ``sft``, ``grpo``, ``eval``, ``pipeline``, ``results``.

Every sub-command is parsed by ``trl.TrlParser`` after :func:`mirage_rl.recipe.check_recipe`: ``--config
file.yaml`` sets values, the command line overrides them. Errors (:mod:`mirage_rl.errors`): a user error (a bad
option, recipe, file, row or output folder) prints one line ``mirage-rl CMD: error: ...`` without a traceback and
exits 2 (options and recipes) or 1 (everything found later); ``--debug`` anywhere on the command line, or
``MIRAGE_RL_DEBUG=1``, shows the traceback. Internal errors keep their traceback.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import outputs, recipe
from .errors import is_no_space, is_user_error, no_space_message
from .recipe import RecipeError, parse

USAGE = """usage: mirage-rl <command> [--config FILE.yaml] [--key value ...]

commands:
  build-data    render the VSP training set (Mirage train maps + generated maps) to a datasets folder
  create-model  build a tiny offline model (--backbone qwen2_5_vl|qwen3_vl; tokenizer, image processor, latent tokens)
  base-model    build (once, then cached) the seeing tiny base: create-model + perception pretraining
  sft           train Mirage stage 1 or stage 2 (or Direct SFT / dummy latents) from a recipe
  grpo          GRPO with latent-interleaved rollouts and reward plugins, from a recipe
  eval          evaluate a checkpoint on a VSP folder (report.json, samples.jsonl, plot)
  pipeline      stage 1 -> stage 2 -> GRPO -> eval from one recipe folder, with a summary table
  results       the controlled comparison of docs/RESULTS.md (data, base model, arms x seeds, eval, report)
  export        merge a LoRA adapter (a stage trained with use_peft: true) into a full checkpoint

`mirage-rl <command> --help` lists a command's options; --debug shows the traceback of an error.
"""

#: what ``mirage-rl CMD`` without arguments prints, for the commands that need a recipe or a model
COMMAND_USAGE = {
    "sft": "usage: mirage-rl sft --config RECIPE.yaml [--key value ...]\n"
           "  train Mirage stage 1 or 2 (or Direct SFT / dummy latents), e.g.\n"
           "  mirage-rl sft --config recipes/vsp_spatial_planning/stage1_tiny.yaml",
    "grpo": "usage: mirage-rl grpo --config RECIPE.yaml [--key value ...]\n"
            "  GRPO with latent-interleaved rollouts, e.g.\n"
            "  mirage-rl grpo --config recipes/vsp_spatial_planning/grpo_tiny.yaml",
    "eval": "usage: mirage-rl eval --model MODEL_DIR [--benchmark_dir DIR] [--output_dir DIR] [--key value ...]\n"
            "  evaluate a checkpoint on a VSP folder, e.g.\n"
            "  mirage-rl eval --model outputs/demo/grpo --output_dir outputs/demo/grpo/eval",
    "export": "usage: mirage-rl export --adapter_dir ADAPTER_DIR --output_dir DIR [--dtype bfloat16]\n"
              "  merge a LoRA adapter into a full checkpoint",
}


@dataclass
class ExportArguments:
    """Arguments of ``mirage-rl export``."""

    adapter_dir: str = field(metadata={"help": "A stage's output_dir trained with use_peft: true."})
    output_dir: str = field(metadata={"help": "Where the merged full checkpoint (safetensors + processor) goes."})
    dtype: str = field(default="float32", metadata={"help": "Weights dtype of the export: float32 or bfloat16."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code shipped with the base checkpoint."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Write into an output_dir holding entries no mirage-rl run wrote (they are kept, never deleted)."})
    replace_output_dir: bool = field(default=False, metadata={
        "help": "Replace the finished output another run left in output_dir (only that output's files are replaced; "
                "everything else in the folder is kept). Without it such a folder is refused, unless this is the same "
                "command with the same settings (a resume)."})


def end_process_group() -> None:
    """Destroy the default process group at the end of a successful command (``accelerate launch`` ranks).

    Without it, gloo's worker threads outlive interpreter finalization and a rank can abort at exit
    (``terminate called without an active exception``, SIGABRT) after the work and its save finished; see
    pytorch/pytorch#190489 and torch's *Shutdown* docs (pytorch/pytorch#122358). Called on success only: a rank
    that raised leaves the group to the launcher, as torchtitan does (pytorch/torchtitan#1342). Uses
    ``accelerate.PartialState.destroy_process_group`` (what ``Accelerator.end_training`` calls); a no-op when no
    group was started (one process).

    Before it, every rank waits for the others (the main rank writes the final model and its manifest after the last
    collective, while the other ranks would already be tearing down), and Python's garbage is collected, so that
    objects holding collective work are freed while the interpreter is fully alive (pytorch/pytorch#179291
    describes gloo work freed during finalization aborting the process; mosaicml/streaming#186 synchronizes before
    destroying for the same reason). The abort was seen again once in CI after the destroy alone (a ZeRO-3 rank,
    after its checkpoint save) and not in 51 repeats of that run here, so this ordering is hardening, not a
    reproduced fix."""
    torch = sys.modules.get("torch")  # a command that never imported torch started no group
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        import gc

        from accelerate.state import PartialState

        state = PartialState()
        state.wait_for_everyone()
        gc.collect()
        state.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MIRAGE_RL_DEBUG", "").lower() in ("1", "true", "yes")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    outputs.COMMAND_LINE = shlex.join(["mirage-rl", *argv])
    recipe.PROG = f"mirage-rl {cmd}"
    if not rest and cmd in COMMAND_USAGE:
        print(f"{COMMAND_USAGE[cmd]}\n  `mirage-rl {cmd} --help` lists every option", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_known_noise()
    choose_threads()

    try:
        code = _run(cmd, rest)
    except Exception as e:
        if debug or not is_user_error(e):
            raise  # an internal error (or --debug): the traceback is the report
        print(f"mirage-rl {cmd}: error: {user_message(e)}", file=sys.stderr)
        return 2 if isinstance(e, RecipeError) else 1
    end_process_group()
    return code


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.starts)


def quiet_known_noise() -> None:
    """Keep off the console the library warnings a user can do nothing about: DeepSpeed's "Setting accelerator to
    CPU" on a CPU machine (its own logger, set up when deepspeed is imported: the filter is added before), and
    transformers' FutureWarnings that ``gradient_checkpointing`` / ``is_gradient_checkpointing`` are aliases of
    ``activation_checkpointing`` (TRL's configs and ``unwrap_model_for_generation`` use the old names themselves)."""
    import warnings

    ds = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropMessages) for f in ds.filters):
        ds.addFilter(_DropMessages("Setting accelerator to CPU"))
    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing\w*` is deprecated", category=FutureWarning)


def busy_cores(interval: float = 0.25) -> float | None:
    """How many cores other processes keep busy right now: the non-idle share of ``/proc/stat``'s CPU time over
    ``interval`` seconds times the cores (a 1-minute load average would still count the command that just ended);
    None where ``/proc/stat`` cannot be read."""
    import time

    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / (total1 - total0))


def choose_threads() -> None:
    """Size the OpenMP thread pool to the cores that are free when the command starts, unless the user set
    ``OMP_NUM_THREADS``: ``max(1, round(cores - busy cores))`` (:func:`busy_cores`); on a machine more than half busy
    also ``OMP_WAIT_POLICY=PASSIVE``, so that waiting threads sleep instead of spinning against the other jobs
    (spinning, oversubscribed threads made a step 10-20x slower once the load passed the core count). Runs before
    torch is imported, which reads both variables once; logged."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    cores = os.cpu_count() or 1
    busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0.0
    threads = max(1, min(cores, round(cores - busy)))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if busy > cores / 2:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.getLogger(__name__).info("threads: %d of %d cores (%.1f busy with other work; set OMP_NUM_THREADS to "
                                     "choose)", threads, cores, busy)


def user_message(e: BaseException) -> str:
    """The one line a user error prints (a full disk is said in those words, with the path)."""
    if is_no_space(e):
        return e.strerror if isinstance(e, OSError) and e.strerror and "no space" in e.strerror else no_space_message(e)
    return str(e).strip().replace("\n", " ")


COMMANDS = ("build-data", "create-model", "sft", "grpo", "eval", "pipeline", "results", "export", "base-model")


def _run(cmd: str, rest: list[str]) -> int:
    if cmd == "build-data":
        from .data.build import BuildDataArguments, build_dataset

        (args,) = parse((BuildDataArguments,), rest)
        _, counts = build_dataset(args)
        print(json.dumps({"output_dir": args.output_dir, **counts}))
    elif cmd == "create-model":
        from .commands.create_model import CreateModelArguments, run_create_model

        (args,) = parse((CreateModelArguments,), rest)
        print(json.dumps(run_create_model(args)))
    elif cmd == "base-model":
        from .base_model import BaseModelArguments, build_base

        (args,) = parse((BaseModelArguments,), rest)
        record = build_base(args)
        cache = Path(args.cache_dir)
        print(json.dumps({"base": str(cache / f"{args.name}-{record['key']}"), "alias": str(cache / args.name),
                          "built_min": round(record["wall_s"]["total"] / 60, 1),
                          "perception_table_exact": {lv: s["table_exact"]
                                                     for lv, s in record["perception"]["by_level"].items()}}))
    elif cmd == "sft":
        from trl import ModelConfig

        from .commands.sft import SFTScriptArguments, run_sft
        from .trainers import MirageSFTConfig

        script_args, training_args, model_args = parse((SFTScriptArguments, MirageSFTConfig, ModelConfig), rest)
        run_sft(script_args, training_args, model_args)
    elif cmd == "grpo":
        from trl import ModelConfig

        from .commands.grpo import GRPOScriptArguments, run_grpo
        from .trainers import MirageGRPOConfig

        script_args, training_args, model_args = parse((GRPOScriptArguments, MirageGRPOConfig, ModelConfig), rest)
        run_grpo(script_args, training_args, model_args)
    elif cmd == "pipeline":
        from .pipeline import PipelineArguments, run_pipeline

        (args,) = parse((PipelineArguments,), rest)
        run_pipeline(args)
    elif cmd == "results":
        from .results import ResultsArguments, run_results

        (args,) = parse((ResultsArguments,), rest)
        run_results(args)
    elif cmd == "eval":
        from .evaluation import EvalArguments, evaluate, format_table

        (args,) = parse((EvalArguments,), rest)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RecipeError("eval runs in one process (every rank would decode and write the same report): run "
                              "`mirage-rl eval` without accelerate launch / torchrun")
        report = evaluate(args)
        print(format_table(report))
        for name, entry in (report.get("interventions") or {}).items():
            if not entry.get("measured", True):
                print(f"intervention {name}: NOT MEASURED ({entry['not_measured']})")
        geo = report.get("latent_geometry") or {}
        if geo.get("measured") is False:
            print(f"latent geometry: NOT MEASURED ({geo['not_measured']})")
        print(f"wrote {args.output_dir}/report.json, samples.jsonl, accuracy_by_level.png")
    elif cmd == "export":
        import torch

        from .modeling import export_merged
        from .outputs import output_dir_guard

        (args,) = parse((ExportArguments,), rest)
        if args.dtype not in ("float32", "bfloat16", "float16"):
            raise RecipeError(f"dtype: {args.dtype!r} is not float32, bfloat16 or float16")
        from .modeling import weights_identity

        settings = {"adapter_dir": args.adapter_dir, "adapter": weights_identity(args.adapter_dir), "dtype": args.dtype}
        with output_dir_guard(args.output_dir, "model", args.overwrite_output_dir, producer="export",
                              settings=settings, replace=args.replace_output_dir):
            export_merged(args.adapter_dir, args.output_dir, dtype=getattr(torch, args.dtype),
                          trust_remote_code=args.trust_remote_code)
        print(json.dumps({"adapter_dir": args.adapter_dir, "output_dir": args.output_dir, "dtype": args.dtype}))
    else:
        raise RecipeError(f"unknown command {cmd!r}; commands: {', '.join(COMMANDS)} (`mirage-rl --help`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
