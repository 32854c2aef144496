"""Output folders (issue 16, parts 1-2): saves replace only what mirage-rl wrote, foreign folders and files are refused
before any work, outputs follow the umask, and one run per folder (a lock the kernel drops on SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mirage_rl.cli import main
from mirage_rl.outputs import MANIFEST, foreign_entries, run_lock

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes" / "vsp_spatial_planning"


def sft_argv(tiny_dir, data, out, *extra):
    return ["sft", "--config", str(RECIPES / "stage2_tiny.yaml"), "--model_name_or_path", str(tiny_dir),
            "--dataset_path", str(data), "--output_dir", str(out), "--max_steps", "1", "--save_strategy", "no",
            "--per_device_train_batch_size", "2", "--disable_tqdm", "true", *extra]


# ------------------------------------------------------------------------------ 1. saves keep what is not theirs
def test_a_retrained_stage_keeps_eval_notes_and_checkpoints_beside_the_model(tiny_dir, small_dataset_dir, vsp_dir,
                                                                            tmp_path, capsys):
    out = tmp_path / "stage2"
    assert main(sft_argv(tiny_dir, small_dataset_dir, out)) == 0
    # the README's layout: eval output inside the model folder
    assert main(["eval", "--model", str(out), "--benchmark_dir", str(vsp_dir / "maze_planning"), "--output_dir",
                 str(out / "eval"), "--limit", "2", "--max_new_tokens", "4"]) == 0
    (out / "checkpoint-7").mkdir()  # a checkpoint of an earlier run (the trainer writes them beside the model)
    (out / "model-00002-of-00002.safetensors").write_bytes(b"stale")  # a stale file an earlier model save wrote
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["entries"]["model-00002-of-00002.safetensors"] = "model"
    (out / MANIFEST).write_text(json.dumps(manifest))
    before = (out / "model.safetensors").read_bytes()
    retrain = ("--learning_rate", "0.01", "--warmup_steps", "0", "--lr_scheduler_type", "constant")
    assert main(sft_argv(tiny_dir, small_dataset_dir, out, *retrain)) == 1  # other settings: refused
    assert "this run's settings differ (learning_rate: 0.001 saved, 0.01 now" in capsys.readouterr().err
    assert main(sft_argv(tiny_dir, small_dataset_dir, out, *retrain, "--replace_output_dir", "true")) == 0
    assert (out / "model.safetensors").read_bytes() != before
    assert (out / "eval" / "report.json").is_file() and (out / "checkpoint-7").is_dir()
    assert not (out / "model-00002-of-00002.safetensors").exists()  # mirage-rl's own stale file is replaced
    assert foreign_entries(out) == []


def test_a_folder_with_foreign_files_is_refused_before_any_work_and_never_emptied(tiny_dir, small_dataset_dir,
                                                                                  tmp_path, capsys):
    out = tmp_path / "outputs"  # the typo `--output_dir outputs`: a folder of the user's things
    (out / "models" / "mine").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    t0 = time.perf_counter()
    assert main(sft_argv(tiny_dir, small_dataset_dir, out)) == 1
    err = capsys.readouterr().err
    assert f"output_dir {out} holds entries that no mirage-rl run wrote there (models, notes.txt)" in err
    assert "choose another folder, or pass --overwrite_output_dir true" in err and "Traceback" not in err
    assert time.perf_counter() - t0 < 20  # refused at start-up, not after training
    assert sorted(p.name for p in out.iterdir()) == ["models", "notes.txt"]  # untouched, nothing added
    # with --overwrite_output_dir the model is written beside them; they are kept, and later runs accept them
    assert main(sft_argv(tiny_dir, small_dataset_dir, out, "--overwrite_output_dir", "true")) == 0
    assert (out / "notes.txt").read_text() == "my notes" and (out / "models" / "mine").is_dir()
    assert (out / "model.safetensors").exists()
    assert main(sft_argv(tiny_dir, small_dataset_dir, out)) == 0
    assert (out / "notes.txt").read_text() == "my notes"


@pytest.mark.parametrize("cmd", ["build-data", "eval", "create-model"])
def test_an_output_path_that_is_a_file_is_refused_before_any_work(cmd, tiny_dir, vsp_dir, tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    argv = {"build-data": ["build-data", "--train_jsonl", str(vsp_dir / "mirage_train_maps.jsonl"), "--test_dir",
                           str(vsp_dir / "maze_planning")],
            "eval": ["eval", "--model", str(tiny_dir), "--benchmark_dir", str(vsp_dir / "maze_planning")],
            "create-model": ["create-model"]}[cmd]
    t0 = time.perf_counter()
    assert main(argv + ["--output_dir", str(target)]) == 1
    err = capsys.readouterr().err
    assert f"output_dir {target} is a file, not a folder" in err
    assert time.perf_counter() - t0 < 10 and target.read_text() == "keep me"


def test_outputs_follow_the_umask(tiny_dir, small_dataset_dir, vsp_dir, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "m"
        assert main(["create-model", "--output_dir", str(out)]) == 0
        data = tmp_path / "d"
        assert main(["build-data", "--train_jsonl", str(vsp_dir / "mirage_train_maps.jsonl"), "--test_dir",
                     str(vsp_dir / "maze_planning"), "--output_dir", str(data), "--max_train_maps", "3"]) == 0
        ev = tmp_path / "e"
        assert main(["eval", "--model", str(out), "--benchmark_dir", str(vsp_dir / "maze_planning"), "--output_dir",
                     str(ev), "--limit", "2", "--max_new_tokens", "4"]) == 0
        for root in (out, data, ev):
            for p in [root, *root.rglob("*")]:
                mode = stat.S_IMODE(p.stat().st_mode)
                assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))
    finally:
        os.umask(old)


# --------------------------------------------------------------------------------- 2. one run per output folder
HOLDER = """
import sys, time
from mirage_rl.outputs import run_lock
with run_lock(sys.argv[1], "mirage-rl sft --output_dir " + sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def hold_lock(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_on_a_busy_folder_is_refused_and_the_lock_dies_with_its_run(tiny_dir, small_dataset_dir,
                                                                                 vsp_dir, tmp_path, capsys):
    """sft, eval and pipeline each refuse a folder another run holds; a SIGKILL frees it."""
    out = tmp_path / "stage2"
    proc = hold_lock(out)
    try:
        assert main(sft_argv(tiny_dir, small_dataset_dir, out)) == 1
        err = capsys.readouterr().err
        assert f"{out} is in use by another mirage-rl run (pid {proc.pid} on " in err
        assert "started 20" in err and "wait for it to end or use another output_dir" in err
        ev = tmp_path / "eval"
        busy = hold_lock(ev)
        assert main(["eval", "--model", str(tiny_dir), "--benchmark_dir", str(vsp_dir / "maze_planning"),
                     "--output_dir", str(ev), "--limit", "1"]) == 1
        assert f"{ev} is in use by another mirage-rl run (pid {busy.pid}" in capsys.readouterr().err
        busy.kill()
        root = tmp_path / "pipe"
        busy = hold_lock(root)
        assert main(["pipeline", "--recipe_dir", str(RECIPES), "--variant", "tiny", "--output_root", str(root)]) == 1
        assert f"{root} is in use by another mirage-rl run (pid {busy.pid}" in capsys.readouterr().err
        busy.kill()
    finally:
        proc.send_signal(signal.SIGKILL)  # the holder dies without cleaning up: the kernel drops its flock
        proc.wait()
    with run_lock(out):  # free again at once
        pass
    assert main(sft_argv(tiny_dir, small_dataset_dir, out)) == 0


def test_the_pipeline_and_results_roots_are_checked_too(tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    (root / "draft.md").write_text("x")
    assert main(["pipeline", "--recipe_dir", str(RECIPES), "--variant", "tiny", "--output_root", str(root)]) == 1
    assert f"pipeline summary folder {root} holds entries that no mirage-rl run wrote there (draft.md)" in \
        capsys.readouterr().err
    assert main(["results", "--config", str(RECIPES / "results_small.yaml"), "--output_root", str(root),
                 "--run", "false"]) == 1
    assert f"output_root {root} holds entries that no mirage-rl run wrote there (draft.md)" in capsys.readouterr().err
    assert sorted(p.name for p in root.iterdir()) == ["draft.md"]
    with run_lock(root):  # re-entrant within one process (a pipeline's stage inside the pipeline)
        with run_lock(root):
            pass
