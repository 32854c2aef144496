"""Real SIGKILLs (``inject_fault.py`` in a subprocess) in the middle of training, of a checkpoint save, of the
final save, of a dataset build and of an evaluation: nothing complete is lost, and the resumed run's loss curve
equals the uninterrupted run's (same seed, same machine: tolerance 1e-6 relative; on this CPU they are
bitwise equal)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
REPO = HERE.parents[1]
RECIPES = REPO / "recipes" / "vsp_spatial_planning"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(args: list[str], fault: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    """``mirage-rl ARGS`` in a subprocess, with a SIGKILL injected at ``fault`` (see inject_fault.py)."""
    fault = fault or ("step", 10**9)
    cmd = [sys.executable, str(HERE / "inject_fault.py"), fault[0], str(fault[1]), "--", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    if fault[1] != 10**9:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def curve(output_dir: Path, keys=("loss", "grad_norm", "learning_rate")) -> list[tuple]:
    log = json.loads((output_dir / "train_log.json").read_text())
    return [(h["step"], *(h[k] for k in keys)) for h in log if "loss" in h]


def assert_same_curve(resumed, reference):
    assert [r[0] for r in resumed] == [r[0] for r in reference]
    for a, b in zip(resumed, reference):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9), (a, b)


def test_overridden_transformers_hooks_exist_with_expected_signature():
    """The private transformers methods AtomicCheckpointMixin overrides, and those inject_fault.py patches."""
    import inspect

    from transformers import Trainer
    from transformers.trainer_callback import DefaultFlowCallback
    from transformers.trainer_utils import rotate_checkpoints

    from mirage_rl.trainers.checkpointing import AtomicCheckpointMixin

    def params(f):
        return list(inspect.signature(f).parameters)

    assert params(Trainer._save_checkpoint) == params(AtomicCheckpointMixin._save_checkpoint) == ["self", "model", "trial"]
    assert (params(Trainer._load_from_checkpoint) == params(AtomicCheckpointMixin._load_from_checkpoint)
            == ["self", "resume_from_checkpoint", "model"])
    assert params(Trainer._get_output_dir) == ["self", "trial"]
    assert params(Trainer._save_optimizer_and_scheduler) == ["self", "output_dir"]
    assert params(rotate_checkpoints)[:4] == ["output_dir", "save_total_limit", "best_model_checkpoint", "use_mtime"]
    assert params(DefaultFlowCallback.on_step_end)[:4] == ["self", "args", "state", "control"]


# ------------------------------------------------------------------------------------------- SFT
def sft_args(tiny_dir, data, out):
    return ["sft", "--config", str(RECIPES / "stage2_tiny.yaml"), "--model_name_or_path", str(tiny_dir),
            "--dataset_path", str(data), "--output_dir", str(out), "--max_steps", "8", "--save_steps", "3",
            "--logging_steps", "1", "--per_device_train_batch_size", "2", "--warmup_steps", "0",
            "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def sft_reference(tiny_dir, small_dataset_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "reference"
    run(sft_args(tiny_dir, small_dataset_dir, out))
    return curve(out)


def test_sft_stage_killed_mid_training_resumes_on_the_same_loss_curve(tiny_dir, small_dataset_dir, sft_reference,
                                                                      tmp_path):
    out = tmp_path / "stage2"
    run(sft_args(tiny_dir, small_dataset_dir, out), fault=("step", 5))
    assert not (out / "config.json").exists()  # killed: no final model
    assert (out / "checkpoint-3" / "mirage_checkpoint.json").exists()
    proc = run(sft_args(tiny_dir, small_dataset_dir, out))
    assert "resuming from" in proc.stderr and "checkpoint-3" in proc.stderr
    assert_same_curve(curve(out), sft_reference)
    assert len({round(r[1], 4) for r in sft_reference}) == len(sft_reference)  # the weights did move each step
    # checkpoints survive the final save of the model into the same folder
    assert (out / "checkpoint-8" / "mirage_checkpoint.json").exists() and (out / "model.safetensors").exists()


def test_kill_during_a_checkpoint_save_keeps_the_previous_checkpoint(tiny_dir, small_dataset_dir, sft_reference,
                                                                     tmp_path):
    out = tmp_path / "stage2"
    run(sft_args(tiny_dir, small_dataset_dir, out), fault=("checkpoint", 6))
    torn = out / "checkpoint-6"
    assert (torn / "model.safetensors").exists() and not (torn / "optimizer.pt").exists()  # killed mid-save
    assert (out / "checkpoint-3" / "mirage_checkpoint.json").exists()  # rotation waits for a complete save
    proc = run(sft_args(tiny_dir, small_dataset_dir, out))
    assert "ignoring incomplete checkpoint(s) ['checkpoint-6']" in proc.stderr
    assert "resuming from" in proc.stderr and "checkpoint-3 " in proc.stderr
    assert_same_curve(curve(out), sft_reference)


def test_resume_restores_the_checkpoint_weights(tiny_dir, small_dataset_dir, tmp_path):
    """transformers 5.23 alone would resume from the initial weights (its loader skips Qwen2.5-VL's key
    conversion and only warns); AtomicCheckpointMixin._load_from_checkpoint loads them strictly."""
    import torch

    from mirage_rl.modeling import load_model, load_processor
    from mirage_rl.commands.sft import SFTScriptArguments, load_train_split
    from mirage_rl.trainers import MirageSFTConfig, Stage2Trainer

    out = tmp_path / "stage2"
    run(sft_args(tiny_dir, small_dataset_dir, out), fault=("step", 4))
    model, processor = load_model(tiny_dir), load_processor(tiny_dir)
    saved = load_model(out / "checkpoint-3")
    args = MirageSFTConfig(output_dir=str(out), use_cpu=True, bf16=False, report_to="none", save_strategy="no")
    trainer = Stage2Trainer(model=model, args=args, processing_class=processor,
                            train_dataset=load_train_split(SFTScriptArguments(dataset_path=str(small_dataset_dir))))
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[name], saved.state_dict()[name])
    trainer._load_from_checkpoint(str(out / "checkpoint-3"))
    for key, value in saved.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# ------------------------------------------------------------------------------------------ GRPO
def grpo_args(tiny_dir, data, out):
    return ["grpo", "--config", str(RECIPES / "grpo_tiny.yaml"), "--model_name_or_path", str(tiny_dir),
            "--dataset_path", str(data), "--output_dir", str(out), "--max_steps", "6", "--save_steps", "2",
            "--logging_steps", "1", "--num_generations", "4", "--per_device_train_batch_size", "4",
            "--max_completion_length", "16", "--learning_rate", "1e-3", "--disable_tqdm", "true",
            "--reward_funcs", "toy_rewards.length_reward", "--reward_weights", "1.0", "--reward_kwargs", "{}"]


def test_grpo_killed_mid_training_resumes_on_the_same_curve(tiny_dir, small_dataset_dir, tmp_path):
    keys = ("loss", "grad_norm", "reward", "completions/mean_length")
    reference = tmp_path / "reference"
    run(grpo_args(tiny_dir, small_dataset_dir, reference))
    out = tmp_path / "grpo"
    run(grpo_args(tiny_dir, small_dataset_dir, out), fault=("step", 3))
    assert (out / "checkpoint-2" / "mirage_checkpoint.json").exists() and not (out / "config.json").exists()
    proc = run(grpo_args(tiny_dir, small_dataset_dir, out))
    assert "resuming from" in proc.stderr
    expected = curve(reference, keys)
    assert_same_curve(curve(out, keys), expected)
    assert any(r[2] > 0 for r in expected[2:])  # steps after the kill point change the weights


# ---------------------------------------------------------------------------- atomic final outputs
def test_kill_during_the_final_model_save_leaves_the_previous_model(tmp_path):
    out = tmp_path / "model"
    run(["create-model", "--output_dir", str(out), "--seed", "0"])
    before = (out / "model.safetensors").read_bytes()
    run(["create-model", "--output_dir", str(out), "--seed", "1", "--replace_output_dir", "true"], fault=("final-save", 1))
    assert (out / "model.safetensors").read_bytes() == before
    debris = list(tmp_path.glob(".model.tmp-*"))
    assert debris and any(p.name == "model.safetensors" for p in debris[0].iterdir())  # the torn write
    from mirage_rl.modeling import load_model

    load_model(out)  # loads the previous model and removes the debris
    assert not list(tmp_path.glob(".model.tmp-*"))


def test_kill_between_the_renames_is_repaired(tmp_path):
    from mirage_rl.atomic import atomic_directory, recover_directory

    out = tmp_path / "ckpt"
    with atomic_directory(out, "model") as tmp:
        (tmp / "weights").write_text("v1")
    (out / "checkpoint-3").mkdir()  # written by the trainer beside the final save: kept by every later save
    out.rename(tmp_path / ".ckpt.old-999")  # the state right after the first rename
    recover_directory(out)
    assert (out / "weights").read_text() == "v1" and (out / "checkpoint-3").is_dir()
    with atomic_directory(out, "model") as tmp:
        (tmp / "weights").write_text("v2")
    assert (out / "weights").read_text() == "v2" and (out / "checkpoint-3").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_kill_during_a_dataset_build_leaves_the_previous_dataset(vsp_dir, tmp_path):
    from datasets import load_from_disk

    out = tmp_path / "data"
    base = ["build-data", "--train_jsonl", str(vsp_dir / "mirage_train_maps.jsonl"), "--test_dir",
            str(vsp_dir / "maze_planning"), "--output_dir", str(out), "--num_generated", "0"]
    run(base + ["--max_train_maps", "5"])
    run(base + ["--max_train_maps", "9", "--replace_output_dir", "true"], fault=("dataset", 1))
    assert list(tmp_path.glob(".data.tmp-*"))  # the killed build's files, never renamed into place
    assert len(load_from_disk(str(out))["train"]) == 5
    assert json.loads((out / "build_report.json").read_text())["train"] == 5


# --------------------------------------------------------------------------------------- evaluation
def eval_args(tiny_dir, vsp_dir, out, *extra):
    return ["eval", "--model", str(tiny_dir), "--benchmark_dir", str(vsp_dir / "maze_planning"), "--output_dir",
            str(out), "--limit", "12", "--batch_size", "4", "--max_new_tokens", "8", *extra]


def test_killed_eval_continues_from_its_per_sample_journal(tiny_dir, vsp_dir, tmp_path):
    reference = tmp_path / "reference"
    run(eval_args(tiny_dir, vsp_dir, reference))
    out = tmp_path / "eval"
    run(eval_args(tiny_dir, vsp_dir, out), fault=("eval-batch", 3))
    journal = (out / "samples.partial.jsonl").read_text().splitlines()
    assert len(journal) == 1 + 8 and not (out / "report.json").exists()  # header + 2 batches
    proc = run(eval_args(tiny_dir, vsp_dir, out))
    assert "8 of 12 maps already done" in proc.stderr
    assert (out / "samples.jsonl").read_text() == (reference / "samples.jsonl").read_text()
    report, ref = json.loads((out / "report.json").read_text()), json.loads((reference / "report.json").read_text())
    assert report["resumed_at"] == 8 and ref["resumed_at"] == 0
    assert {k: v for k, v in report.items() if k != "resumed_at"} == {k: v for k, v in ref.items() if k != "resumed_at"}
    assert not (out / "samples.partial.jsonl").exists()


def test_eval_journal_of_other_settings_is_not_mixed_in(tiny_dir, vsp_dir, tmp_path):
    from mirage_rl.evaluation import EvalArguments, evaluate

    out = tmp_path / "eval"
    run(eval_args(tiny_dir, vsp_dir, out), fault=("eval-batch", 2))
    args = EvalArguments(model=str(tiny_dir), benchmark_dir=str(vsp_dir / "maze_planning"), output_dir=str(out),
                         limit=12, batch_size=4, max_new_tokens=9)
    with pytest.raises(ValueError, match=r"samples.partial.jsonl: a journal of an interrupted evaluation with other "
                                         r"settings \(\['max_new_tokens'\] differ: max_new_tokens: 8 there, 9 now\); delete it"):
        evaluate(args)
    args.resume = False
    assert evaluate(args)["resumed_at"] == 0
