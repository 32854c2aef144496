"""Scale-out on CPU: every stage under ``accelerate launch`` with two gloo ranks (DDP, and DeepSpeed ZeRO-2/3 through
the project's ``launch/`` configs) gives, on both ranks, the loss and gradient norm of one process trained on the
same global batch (2 ranks x B rows = 1 process x 2B rows).

Tolerance: 1e-4 relative (float32; the sums are reduced in another order across ranks: measured differences are
below 2e-6 relative). Each run logs every step (``tests/distributed/rank_logs.py`` writes every rank's log).
ZeRO-3's final save (16-bit gather, ``zero3_save_16bit_model: true``) must hold the DDP run's weights and load
in the next stage and in ``eval``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "vsp_spatial_planning"
RANK_LOGS = REPO / "tests" / "distributed" / "rank_logs.py"
REL = 1e-4
STEPS = 3

pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: str, args: list[str], logs: Path, launcher: str | None) -> list[dict]:
    """Run ``rank_logs.py CMD ARGS`` in one process (``launcher=None``) or under ``accelerate launch`` with two
    processes (``ddp``, ``zero2``, ``zero3``: ``launch/<name>.yaml`` with ``--num_processes 2 --mixed_precision no``);
    returns every rank's record (log history, world size, distributed type, ZeRO stage)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "RANK_LOG_DIR": str(logs),
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "reliability"), os.environ.get("PYTHONPATH", "")])}
    if launcher is None:
        prefix = [sys.executable]
    else:
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / f"{launcher}.yaml"),
                  "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(free_port())]
    proc = subprocess.run([*prefix, str(RANK_LOGS), cmd, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads(p.read_text()) for p in sorted(logs.glob("rank*.json"))]


def steps(record: dict) -> list[tuple[int, float, float]]:
    return [(h["step"], h["loss"], h["grad_norm"]) for h in record["log_history"] if "loss" in h]


def assert_same_steps(records: list[dict], reference: dict):
    ref = steps(reference)
    assert [s for s, _, _ in ref] == list(range(1, STEPS + 1))
    assert all(g > 0 for _, _, g in ref), "zero gradients: the comparison would be vacuous"
    for rank, record in enumerate(records):
        got = steps(record)
        assert [s for s, _, _ in got] == [s for s, _, _ in ref], f"rank {rank}"
        for (step, loss, grad), (_, ref_loss, ref_grad) in zip(got, ref):
            assert loss == pytest.approx(ref_loss, rel=REL), f"rank {rank} step {step}: loss {loss} vs {ref_loss}"
            assert grad == pytest.approx(ref_grad, rel=REL), f"rank {rank} step {step}: grad norm {grad} vs {ref_grad}"


def sft_args(stage: int, model: Path, data: Path, out: Path, batch: int) -> list[str]:
    return ["--config", str(RECIPES / f"stage{stage}_tiny.yaml"), "--model_name_or_path", str(model),
            "--dataset_path", str(data), "--output_dir", str(out), "--per_device_train_batch_size", str(batch),
            "--max_steps", str(STEPS), "--logging_steps", "1", "--save_strategy", "no", "--warmup_steps", "0",
            "--max_train_samples", "32", "--learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_dir, small_dataset_dir):
    """The single-process reference runs (global batch 4), computed once per stage."""
    cache = {}

    def get(stage: int) -> dict:
        if stage not in cache:
            root = tmp_path_factory.mktemp(f"single{stage}")
            (record,) = launch("sft", sft_args(stage, tiny_dir, small_dataset_dir, root / "out", 4), root / "logs", None)
            assert record["world_size"] == 1
            cache[stage] = (record, root / "out")
        return cache[stage]

    return get


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


# the `deepspeed` marker selects these tests; without deepspeed they skip, saying why
requires_deepspeed = pytest.mark.skipif(
    not deepspeed_available(), reason="deepspeed is not installed (pip install -e '.[deepspeed]'; `make test` installs it)")
DEEPSPEED = [pytest.mark.deepspeed, requires_deepspeed]


LAUNCHERS = ["ddp"] + [pytest.param(n, marks=DEEPSPEED) for n in ("zero2", "zero3", "zero3_offload")]


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_ranks_match_one_process(launcher, stage, single, tiny_dir, small_dataset_dir, tmp_path):
    reference, ref_out = single(stage)
    records = launch("sft", sft_args(stage, tiny_dir, small_dataset_dir, tmp_path / "out", 2), tmp_path / "logs",
                     launcher)
    assert len(records) == 2 and all(r["world_size"] == 2 for r in records)
    expected = {"ddp": None, "zero2": 2, "zero3": 3, "zero3_offload": 3}[launcher]
    assert all(r["zero_stage"] == expected for r in records), records[0]["distributed_type"]
    assert_same_steps(records, reference)
    if launcher.startswith("zero3"):  # the gathered 16-bit save holds the trained weights
        from mirage_rl.modeling import load_model

        got, ref = load_model(tmp_path / "out").state_dict(), load_model(ref_out).state_dict()
        assert got.keys() == ref.keys()
        worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
        assert worst < 1e-4, worst
        assert got["model.language_model.embed_tokens.weight"].shape[0] == json.loads(
            (tmp_path / "out" / "config.json").read_text())["text_config"]["vocab_size"]


@pytest.mark.deepspeed
@requires_deepspeed
def test_qwen3_vl_zero3_stage2_with_checkpointing_equals_one_process_and_resumes(tmp_path_factory, small_dataset_dir,
                                                                                 tmp_path):
    """Stage 2 as the 7B / 8B recipes train it, on the second backbone (issue 32): 2 ZeRO-3 ranks with (non-reentrant)
    gradient checkpointing, under which the latent fill keeps its keys in a key store and runs its one-column steps
    outside the checkpointed layers (issue 31), with DeepStack at the image tokens, have the losses and gradient norms
    of one process without checkpointing; stopped after step 2 and relaunched, the run continues to the same curve.
    (This replaced the Qwen2.5-VL form of the checkpointed test, to keep CI within 30 minutes: the key-store path is
    the same code on both; Qwen2.5-VL keeps its ZeRO-2/3 equality and resume tests.)"""
    from conftest import tiny_model_dir

    model = tiny_model_dir(tmp_path_factory, "qwen3_vl")

    def args(out, batch, max_steps=STEPS, save=False):
        a = sft_args(2, model, small_dataset_dir, out, batch)
        a[a.index("--max_steps") + 1] = str(max_steps)
        if save:
            a[a.index("--save_strategy") + 1] = "steps"
            a += ["--save_steps", "2"]
        return a + ["--lr_scheduler_type", "constant"]

    (reference,) = launch("sft", args(tmp_path / "single", 4), tmp_path / "l0", None)
    full = launch("sft", args(tmp_path / "full", 2) + ["--gradient_checkpointing", "true"], tmp_path / "l1", "zero3")
    assert all(r["zero_stage"] == 3 and r["latent_fills"] == ["keystore"] for r in full)
    assert_same_steps(full, reference)
    gc = ["--gradient_checkpointing", "true"]
    launch("sft", args(tmp_path / "part", 2, 2, save=True) + gc, tmp_path / "l2", "zero3")
    (resumed, _) = launch("sft", args(tmp_path / "part", 2, save=True) + gc + ["--replace_output_dir", "true"],
                          tmp_path / "l3", "zero3")
    assert resumed["start_step"] == 2 and len(steps(resumed)) == STEPS
    for got, ref in zip(steps(resumed), steps(full[0])):
        assert got == pytest.approx(ref, rel=1e-5)


@pytest.mark.deepspeed
@requires_deepspeed
def test_qwen3_vl_zero2_stage1_equals_one_process(tmp_path_factory, small_dataset_dir, tmp_path):
    """Stage 1 on the second backbone (issue 32) under ZeRO-2: the helper image's merged visual tokens, computed by the
    vision tower (with its DeepStack layers) on each rank, give 2 ranks the losses (CE + cosine) and gradient norms of
    one process on the same global batch. With the ZeRO-3 stage-2 test above, Qwen3-VL runs both ZeRO stages and
    both training stages on 2 ranks."""
    from conftest import tiny_model_dir

    model = tiny_model_dir(tmp_path_factory, "qwen3_vl")
    (reference,) = launch("sft", sft_args(1, model, small_dataset_dir, tmp_path / "single", 4), tmp_path / "l0", None)
    records = launch("sft", sft_args(1, model, small_dataset_dir, tmp_path / "out", 2), tmp_path / "l1", "zero2")
    assert len(records) == 2 and all(r["world_size"] == 2 and r["zero_stage"] == 2 for r in records)
    assert_same_steps(records, reference)


@pytest.mark.deepspeed
@requires_deepspeed
def test_zero3_stage1_from_a_stock_checkpoint(stock_dir, small_dataset_dir, tmp_path):
    """The 7B entry path: stage 1 adds the latent tokens (resize + mean rows) to a model loaded sharded by ZeRO-3;
    losses, gradient norms and the saved weights equal one process's."""
    (reference,) = launch("sft", sft_args(1, stock_dir, small_dataset_dir, tmp_path / "single", 4), tmp_path / "l1", None)
    records = launch("sft", sft_args(1, stock_dir, small_dataset_dir, tmp_path / "zero3", 2), tmp_path / "l2", "zero3")
    assert_same_steps(records, reference)
    from mirage_rl.modeling import LatentTokens, load_model

    got, ref = load_model(tmp_path / "zero3"), load_model(tmp_path / "single")
    assert LatentTokens.from_config(got.config) == LatentTokens.from_config(ref.config)
    assert got.get_input_embeddings().weight.shape[0] > load_model(stock_dir).get_input_embeddings().weight.shape[0]
    a, b = got.state_dict(), ref.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in b) < 1e-4


def grpo_args(model, data, out, batch: int) -> list[str]:
    return ["--config", str(RECIPES / "grpo_tiny.yaml"), "--model_name_or_path", str(model), "--dataset_path", str(data),
            "--output_dir", str(out), "--per_device_train_batch_size", str(batch), "--num_generations", "4",
            "--max_completion_length", "16", "--max_steps", str(STEPS), "--logging_steps", "1", "--save_strategy", "no",
            "--learning_rate", "1e-3", "--beta", "0.04",
            "--reward_funcs", "toy_rewards.length_reward", "--reward_weights", "1.0", "--reward_kwargs", "{}"]


@pytest.fixture(scope="module")
def single_grpo(tmp_path_factory, tiny_dir, small_dataset_dir):
    root = tmp_path_factory.mktemp("single_grpo")
    # the reference scores every rollout's prompt itself (shared_prefix false); the ranks share each group's prompt
    # (the default), so the comparison also holds shared-prefix scoring to the unshared one under DDP and ZeRO-2/3
    (record,) = launch("grpo", [*grpo_args(tiny_dir, small_dataset_dir, root / "out", 8), "--shared_prefix", "false"],
                       root / "logs", None)
    return record


@pytest.mark.parametrize("launcher", ["ddp"] + [pytest.param(n, marks=DEEPSPEED) for n in ("zero2", "zero3")])
def test_grpo_two_ranks_match_one_process(launcher, single_grpo, tiny_dir, small_dataset_dir, tmp_path):
    """Rollouts sample with one generator per row of the global batch (``rollout_seed``): 2 ranks x 4 rollouts
    sample what 1 process x 8 samples, so rewards, losses, KL (beta > 0: the frozen reference copy, reloaded sharded
    under ZeRO-3) and gradient norms agree; the ranks score with shared prompts, the one process without."""
    records = launch("grpo", grpo_args(tiny_dir, small_dataset_dir, tmp_path / "out", 4), tmp_path / "logs", launcher)
    assert len(records) == 2
    assert_same_steps(records, single_grpo)
    for key in ("reward", "kl"):
        ref = [h[key] for h in single_grpo["log_history"] if key in h]
        assert len(ref) == STEPS and any(v != 0 for v in ref), key
        for record in records:
            assert [h[key] for h in record["log_history"] if key in h] == pytest.approx(ref, rel=REL, abs=1e-7), key


@pytest.mark.deepspeed
@requires_deepspeed
def test_zero3_checkpoint_feeds_stage2_and_eval(tiny_dir, small_dataset_dir, vsp_dir, tmp_path):
    """Stage 1 under ZeRO-3 -> its final save -> stage 2 (one process) and ``mirage-rl eval`` load it."""
    stage1 = tmp_path / "stage1"
    launch("sft", sft_args(1, tiny_dir, small_dataset_dir, stage1, 2), tmp_path / "logs1", "zero3")
    config = json.loads((stage1 / "config.json").read_text())
    assert config["latent_mode"] == "hidden" and config["latent_token_ids"]
    (record,) = launch("sft", sft_args(2, stage1, small_dataset_dir, tmp_path / "stage2", 4), tmp_path / "logs2", None)
    assert all(torch.isfinite(torch.tensor([loss, grad])).all() and grad > 0 for _, loss, grad in steps(record))
    from mirage_rl.evaluation import EvalArguments, evaluate

    report = evaluate(EvalArguments(model=str(stage1), benchmark_dir=str(vsp_dir / "maze_planning"),
                                    output_dir=str(tmp_path / "eval"), limit=4, max_new_tokens=8))
    assert report["n"] == 4 and 0.0 <= report["accuracy"] <= 1.0
    assert (tmp_path / "eval" / "report.json").is_file()


@pytest.mark.deepspeed
@requires_deepspeed
def test_zero3_run_resumes_exactly_from_its_checkpoint(tiny_dir, small_dataset_dir, tmp_path):
    """A ZeRO-3 run stopped after step 2 (sharded checkpoint with its completion marker) and relaunched with the same
    command continues to the loss curve of the uninterrupted run."""

    def args(out, max_steps):
        a = sft_args(2, tiny_dir, small_dataset_dir, out, 2)
        a[a.index("--max_steps") + 1] = str(max_steps)
        a[a.index("--save_strategy") + 1] = "steps"
        return a + ["--save_steps", "2", "--lr_scheduler_type", "constant"]

    (full, _) = launch("sft", args(tmp_path / "full", 4), tmp_path / "l_full", "zero3")
    launch("sft", args(tmp_path / "part", 2), tmp_path / "l_part1", "zero3")
    from mirage_rl.trainers.checkpointing import is_complete

    assert is_complete(tmp_path / "part" / "checkpoint-2")
    # the finished 2-step run is trained on to 4 steps: that replaces its finished model, so it is said explicitly
    (resumed, _) = launch("sft", args(tmp_path / "part", 4) + ["--replace_output_dir", "true"], tmp_path / "l_part2",
                          "zero3")
    assert full["start_step"] == 0 and resumed["start_step"] == 2  # steps 3-4 only were trained again
    assert len(steps(resumed)) == len(steps(full)) == 4
    for got, ref in zip(steps(resumed), steps(full)):
        assert got == pytest.approx(ref, rel=1e-6)



def test_a_command_ends_its_process_group():
    """`mirage-rl` destroys the default process group when a command succeeds (a gloo group left to interpreter
    finalization made a ZeRO-3 rank abort at exit after its save, SIGABRT, in CI); with no group it does nothing.
    In a subprocess: accelerate's PartialState is a per-process singleton."""
    code = """
import torch, torch.distributed as dist
from mirage_rl.cli import end_process_group
end_process_group()
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
assert dist.is_initialized()
end_process_group()
print("initialized after:", dist.is_initialized())
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "initialized after: False" in proc.stdout
