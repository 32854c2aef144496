"""Reliability, third round (issue 29): a test per class of defect, plus every case the hostile tester named.

1. no command destroys a finished output or leaves a folder that lies about itself;
2. every length a user can type is bounded by what the model and the memory hold;
3. corrupt inputs get one line naming the file;
4. a reward plugin that breaks TRL's contract is named, with what it returned;
5. a measurement that cannot measure says so;
6. commands do not crash on their own defaults, and every fix a message advises works;
7. what a user sees (plots, model card, warnings, help);
8. first contact (threads on a busy machine, cached data builds, help and option typos, packaging, README).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mirage_rl.cli import main

HERE = Path(__file__).parent
REPO = HERE.parents[1]
RECIPES = REPO / "recipes" / "vsp_spatial_planning"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    line = err[-1]
    assert "Traceback" not in "\n".join(err)
    return line


def sft_argv(model, data, out, *extra, recipe="stage2_tiny.yaml"):
    return ["sft", "--config", str(RECIPES / recipe), "--model_name_or_path", str(model), "--dataset_path", str(data),
            "--output_dir", str(out), "--max_steps", "1", "--save_strategy", "no", "--per_device_train_batch_size",
            "2", "--disable_tqdm", "true", *extra]


def grpo_argv(model, data, out, *extra):
    return ["grpo", "--config", str(RECIPES / "grpo_tiny.yaml"), "--model_name_or_path", str(model),
            "--dataset_path", str(data), "--output_dir", str(out), "--max_steps", "1", "--save_strategy", "no",
            "--logging_steps", "1", "--num_generations", "2", "--per_device_train_batch_size", "2",
            "--max_completion_length", "8", "--disable_tqdm", "true", "--reward_kwargs", "{}", *extra]


@pytest.fixture(scope="module")
def stage2_dir(tmp_path_factory, tiny_dir, small_dataset_dir):
    """A finished stage (one SFT step) to be protected."""
    out = tmp_path_factory.mktemp("stages") / "stage2"
    assert main(sft_argv(tiny_dir, small_dataset_dir, out)) == 0
    return out


@pytest.fixture(scope="module")
def direct_sft_dir(tmp_path_factory, tiny_dir, small_dataset_dir):
    """A Direct-SFT checkpoint: trained with latent_mode none."""
    out = tmp_path_factory.mktemp("stages") / "direct_sft"
    assert main(sft_argv(tiny_dir, small_dataset_dir, out, recipe="direct_sft_tiny.yaml")) == 0
    return out


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*.lock*"))
    return dst


# ------------------------------------------------------------------------------ 1. finished outputs are never replaced
def test_create_model_refuses_a_finished_stage_and_the_folder_keeps_telling_the_truth(stage2_dir, tmp_path, capsys):
    out = copy_tree(stage2_dir, tmp_path / "stage2")
    weights, manifest = (out / "model.safetensors").read_bytes(), (out / "mirage_output.json").read_text()
    assert main(["create-model", "--output_dir", str(out)]) == 1
    line = one_line(capsys)
    assert f"output_dir {out} holds a finished model written by `mirage-rl sft`" in line
    assert "`mirage-rl create-model` would replace it" in line and "--replace_output_dir true" in line
    assert (out / "model.safetensors").read_bytes() == weights and (out / "train_log.json").is_file()
    assert (out / "mirage_output.json").read_text() == manifest
    # the advised fix works, and the manifest then describes the new weights only
    assert main(["create-model", "--output_dir", str(out), "--seed", "5", "--replace_output_dir", "true"]) == 0
    after = json.loads((out / "mirage_output.json").read_text())
    assert "run" not in after and after["finished"]["model"]["command"] == "create-model"
    assert not (out / "train_log.json").exists()  # the old run's log described weights that are gone
    assert (out / "model.safetensors").read_bytes() != weights


@pytest.mark.parametrize("command", ["sft", "create-model", "export"])
def test_no_producing_command_replaces_another_commands_finished_model(command, stage2_dir, tiny_dir,
                                                                      small_dataset_dir, tmp_path, capsys):
    """The class: whichever command would write a model there, a finished model of another command (or of other
    settings) is refused before any work."""
    out = tmp_path / "model"
    assert main(["create-model", "--output_dir", str(out), "--seed", "3"]) == 0
    before = (out / "model.safetensors").read_bytes()
    argv = {"sft": sft_argv(tiny_dir, small_dataset_dir, out),
            "create-model": ["create-model", "--output_dir", str(out), "--seed", "4"],
            "export": ["export", "--adapter_dir", str(stage2_dir), "--output_dir", str(out)]}[command]
    assert main(argv) == 1
    line = one_line(capsys)
    assert "holds a finished model written by `mirage-rl create-model`" in line
    assert ("seed: 3 saved, 4 now" in line) if command == "create-model" else (f"`mirage-rl {command}` would" in line)
    assert (out / "model.safetensors").read_bytes() == before


def test_the_output_folder_knows_transformers_checkpoint_names():
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from mirage_rl.outputs import _CHECKPOINT, PATTERNS

    assert _CHECKPOINT.match(f"{PREFIX_CHECKPOINT_DIR}-12") and f"{PREFIX_CHECKPOINT_DIR}-*" in PATTERNS["model"]


@pytest.mark.distributed
def test_a_refused_distributed_run_stops_every_rank_with_the_same_line(tiny_dir, small_dataset_dir, tmp_path):
    import socket

    out = tmp_path / "model"
    assert main(["create-model", "--output_dir", str(out)]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "ddp.yaml"),
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), "-m", "mirage_rl", *sft_argv(tiny_dir, small_dataset_dir, out)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    # each rank that reaches the check stops with the same line (the launcher may stop the other rank first, before
    # it prints); no rank goes on into training to die in a collective
    lines = [x for x in proc.stderr.splitlines() if x.startswith("mirage-rl sft: error: ")]
    assert 1 <= len(lines) <= 2 and len(set(lines)) == 1
    assert "holds a finished model written by `mirage-rl create-model`" in lines[0]
    # (the launcher's own ChildFailedError report follows any non-zero rank; no rank prints a traceback of its own)
    assert "Connection closed by peer" not in proc.stderr
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr


def test_a_user_checkpoint_beside_a_run_is_neither_called_incomplete_nor_outlives_the_runs_own(
        tiny_dir, small_dataset_dir, tmp_path, caplog):
    out = tmp_path / "run"
    (out / "checkpoint-999").mkdir(parents=True)
    (out / "checkpoint-999" / "mine.txt").write_text("the user's")
    argv = sft_argv(tiny_dir, small_dataset_dir, out, "--overwrite_output_dir", "true", "--max_steps", "2",
                    "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "1")
    caplog.set_level(logging.INFO)
    assert main(argv) == 0
    assert (out / "checkpoint-999" / "mine.txt").read_text() == "the user's"
    assert (out / "checkpoint-2" / "mirage_checkpoint.json").is_file()  # the run's last checkpoint survives rotation
    assert not (out / "checkpoint-1").exists()
    assert not any("incomplete" in r.message for r in caplog.records)
    from mirage_rl.trainers.checkpointing import last_complete_checkpoint

    assert last_complete_checkpoint(out) == str(out / "checkpoint-2")


def test_build_data_refuses_to_replace_a_dataset_of_other_settings_and_reuses_one_of_the_same(vsp_dir, tmp_path,
                                                                                            capsys, monkeypatch):
    out = tmp_path / "data"
    base = ["build-data", "--train_jsonl", str(vsp_dir / "mirage_train_maps.jsonl"), "--test_dir",
            str(vsp_dir / "maze_planning"), "--output_dir", str(out), "--num_generated", "0"]
    assert main(base + ["--max_train_maps", "8"]) == 0
    capsys.readouterr()
    rows = (out / "build_report.json").read_text()
    assert main(base + ["--max_train_maps", "993"]) == 1
    line = one_line(capsys)
    assert "holds a finished dataset written by `mirage-rl build-data`" in line
    assert "max_train_maps: 8 saved, 993 now" in line
    assert (out / "build_report.json").read_text() == rows
    # the same settings again: reused, nothing rendered (class 8: a second `make demo` does not re-render)
    import mirage_rl.data.build as build

    monkeypatch.setattr(build, "build_task_dataset", lambda args: pytest.fail("rendered again"))
    assert main(base + ["--max_train_maps", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["reused"] is True


def test_eval_refuses_to_replace_another_models_report(tiny_dir, stage2_dir, vsp_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--benchmark_dir", str(vsp_dir / "maze_planning"), "--output_dir", str(out), "--limit", "2",
            "--max_new_tokens", "4"]
    assert main(argv + ["--model", str(tiny_dir)]) == 0
    report = (out / "report.json").read_text()
    capsys.readouterr()
    assert main(argv + ["--model", str(stage2_dir)]) == 1
    assert "holds a finished evaluation written by `mirage-rl eval`" in one_line(capsys)
    assert (out / "report.json").read_text() == report
    assert main(argv + ["--model", str(tiny_dir)]) == 0  # the same evaluation again is allowed


def test_folders_written_before_finished_was_recorded_are_read_from_their_manifest(tmp_path):
    from mirage_rl.outputs import finished_output

    trained, created = tmp_path / "trained", tmp_path / "created"
    for folder, manifest in ((trained, {"entries": {"config.json": "model"}, "run": {"command": "sft", "seed": 1}}),
                             (created, {"entries": {"config.json": "model"},
                                        "history": [{"command": "save_pretrained", "group": "model"}]})):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "mirage_output.json").write_text(json.dumps(manifest))
    assert finished_output(trained, "model") == {"command": "sft", "settings": {"command": "sft", "seed": 1},
                                                 "finished": None}
    assert finished_output(created, "model")["command"] == "create-model"
    assert finished_output(created, "dataset") is None


def test_a_model_never_goes_into_a_dataset_folder(small_dataset_dir, tmp_path, capsys):
    data = copy_tree(small_dataset_dir, tmp_path / "data")
    (data / "mirage_output.json").write_text(json.dumps({**json.loads((data / "mirage_output.json").read_text()),
                                                         "finished": {"dataset": {"command": "build-data"}}}))
    assert main(["create-model", "--output_dir", str(data)]) == 1
    assert "holds a finished dataset written by `mirage-rl build-data`; a model does not go into the same folder" \
        in one_line(capsys)
    assert not (data / "model.safetensors").exists()


# ------------------------------------------------------------------------------ 2. bounded work
def test_eval_refuses_a_runaway_max_new_tokens_at_start_up(tiny_dir, vsp_dir, tmp_path, capsys):
    t0 = time.perf_counter()
    assert main(["eval", "--model", str(tiny_dir), "--benchmark_dir", str(vsp_dir / "maze_planning"), "--output_dir",
                 str(tmp_path / "e"), "--limit", "2", "--max_new_tokens", "1000000000"]) == 1
    line = one_line(capsys)
    assert "max_new_tokens=1000000000" in line and "max_position_embeddings (4096)" in line
    assert time.perf_counter() - t0 < 60


def test_grpo_refuses_a_completion_length_beyond_the_model(tiny_dir, small_dataset_dir, tmp_path, capsys):
    assert main(grpo_argv(tiny_dir, small_dataset_dir, tmp_path / "g", "--max_completion_length", "100000")) == 1
    line = one_line(capsys)
    assert "max_completion_length=100000" in line and "set max_completion_length to at most 4096" in line
    assert not (tmp_path / "g" / "model.safetensors").exists()


def test_every_length_is_checked_against_positions_and_memory(tiny):
    from types import SimpleNamespace

    from mirage_rl.limits import check_new_tokens, clamp_max_length

    model, _ = tiny
    check_new_tokens(model.config, 100, prompt_tokens=200, batch=8)  # fits
    with pytest.raises(ValueError, match=r"with a prompt of 4000 tokens .* set max_new_tokens to at most 96"):
        check_new_tokens(model.config, 100, prompt_tokens=4000)
    assert clamp_max_length(model.config, 8192) == 4096 and clamp_max_length(model.config, 512) == 512
    huge = SimpleNamespace(max_position_embeddings=10**9, num_hidden_layers=80, num_attention_heads=64,
                           num_key_value_heads=8, head_dim=128, hidden_size=8192)
    with pytest.raises(ValueError, match=r"the KV cache of 64 row\(s\) .* GiB free; set max_completion_length"):
        check_new_tokens(huge, 10**6, batch=64, option="max_completion_length")


@pytest.mark.parametrize("argv, expected", [
    (["create-model", "--hidden_size", "100000"], "create-model with hidden_size=100000"),
    (["build-data", "--num_generated", "1000000000"], "build-data with num_generated=1000000000"),
])
def test_sizes_that_are_allocated_whole_are_checked_against_the_free_memory(argv, expected, tmp_path, capsys):
    t0 = time.perf_counter()
    assert main([*argv, "--output_dir", str(tmp_path / "out")]) == 1
    line = one_line(capsys)
    assert expected in line and "GiB free" in line
    assert time.perf_counter() - t0 < 30 and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ 3. corrupt inputs: one line, the file
@pytest.mark.parametrize("damaged", ["config.json", "tokenizer_config.json", "mirage_output.json"])
def test_a_damaged_json_file_of_a_model_folder_is_named(damaged, stage2_dir, vsp_dir, tmp_path, capsys):
    model = copy_tree(stage2_dir, tmp_path / "model")
    (model / damaged).write_text((model / damaged).read_text()[:40])  # cut short
    argv = ["eval", "--model", str(model), "--benchmark_dir", str(vsp_dir / "maze_planning"), "--output_dir",
            str(tmp_path / "e"), "--limit", "1", "--max_new_tokens", "4"]
    code = main(argv)
    if damaged == "mirage_output.json":  # the manifest is only bookkeeping: the model still loads and evaluates
        assert code == 0
        return
    assert code == 1
    line = one_line(capsys)
    assert f"{model / damaged}: not valid JSON" in line and "the file is damaged" in line
def test_a_truncated_arrow_shard_is_named(tiny_dir, small_dataset_dir, tmp_path, capsys):
    data = copy_tree(small_dataset_dir, tmp_path / "data")
    shard = sorted((data / "train").glob("data-*.arrow"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 3)
    assert main(sft_argv(tiny_dir, data, tmp_path / "out")) == 1
    line = one_line(capsys)
    assert f"dataset_path {data} is damaged: {shard} cannot be read" in line and "mirage-rl build-data" in line


@pytest.mark.parametrize("content, expected", [(b"", "no table rows"), (bytes(range(256)) * 4, "not UTF-8 text")])
def test_a_broken_benchmark_table_is_named(content, expected, tiny_dir, vsp_dir, tmp_path, capsys):
    bench = tmp_path / "bench"
    copy_tree(vsp_dir / "maze_planning" / "level3", bench / "level3")
    table = bench / "level3" / "table" / "0.txt"
    table.write_bytes(content)
    assert main(["eval", "--model", str(tiny_dir), "--benchmark_dir", str(bench), "--output_dir",
                 str(tmp_path / "e"), "--limit", "2", "--max_new_tokens", "4"]) == 1
    line = one_line(capsys)
    assert str(table) in line and expected in line
    assert "expected a list of rows, got list" not in line


def test_a_huge_photo_in_a_jigsaw_folder_is_refused_by_its_size(vsp_dir, tmp_path, capsys):
    from PIL import Image

    src = vsp_dir.parent / "photos"
    photos = copy_tree(src, tmp_path / "photos")
    Image.new("L", (10000, 10000)).save(photos / "huge.png")
    manifest = photos / "manifest.jsonl"
    manifest.write_text(manifest.read_text() + json.dumps({"file": "huge.png", "split": "train",
                                                           "crop_margin_px": 0}) + "\n")
    assert main(["build-data", "--config", str(REPO / "data" / "jigsaw_small.yaml"), "--photos_dir", str(photos),
                 "--output_dir", str(tmp_path / "data")]) == 1
    line = one_line(capsys)
    assert "huge.png: image is 10000x10000 = 100 megapixels" in line and "resize it offline" in line


def test_a_tiny_image_in_a_training_set_is_refused_before_the_first_step(tiny_dir, vsp_dir, tmp_path, capsys):
    from PIL import Image

    rows = tmp_path / "rows.jsonl"
    Image.new("RGB", (192, 192), (200, 220, 255)).save(tmp_path / "map.png")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    row = {"text_input": "<image> go", "image_input": "map.png", "image_output": "map.png",
           "text_output": "Look. <output_image> \\boxed{R}"}
    rows.write_text(json.dumps(row) + "\n" + json.dumps({**row, "image_input": "dot.png"}) + "\n")
    assert main(["build-data", "--source", "mirage_jsonl", "--jsonl", str(rows), "--output_dir",
                 str(tmp_path / "data")]) == 1
    assert "dot.png: image is 1x1 pixels, smaller than 28 px on a side" in one_line(capsys)


def test_a_damaged_image_or_checkpoint_state_in_a_training_folder_is_named(tiny_dir, small_dataset_dir, tmp_path,
                                                                        capsys):
    from datasets import load_from_disk

    data = tmp_path / "data"
    ds = load_from_disk(str(small_dataset_dir))
    ds["train"] = ds["train"].map(lambda r, i: {"image": {"bytes": b"not a png", "path": None}} if i == 3 else {},
                                  with_indices=True, keep_in_memory=True)  # no cache file in the shared fixture
    ds.save_to_disk(str(data))
    assert main(sft_argv(tiny_dir, data, tmp_path / "s")) == 1
    assert "row 3" in (line := one_line(capsys)) and "image: not a readable image" in line
    out = tmp_path / "s2"
    assert main(sft_argv(tiny_dir, small_dataset_dir, out, "--save_strategy", "steps", "--save_steps", "1")) == 0
    (out / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": ')
    assert main(sft_argv(tiny_dir, small_dataset_dir, out, "--save_strategy", "steps", "--save_steps", "1",
                         "--resume_from_checkpoint", str(out / "checkpoint-1"))) == 1
    assert f"{out / 'checkpoint-1' / 'trainer_state.json'}: not valid JSON" in one_line(capsys)


def test_a_tiny_image_is_refused_below_the_documented_minimum(tiny, tmp_path):
    from PIL import Image

    from mirage_rl.collator import LatentCollator
    from mirage_rl.data.images import MIN_IMAGE_SIDE, open_image
    from mirage_rl.data.messages import to_messages

    model, processor = tiny
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(path)
    with pytest.raises(ValueError, match=rf"dot.png: image is 1x1 pixels, smaller than {MIN_IMAGE_SIDE} px"):
        open_image(path)
    collate = LatentCollator(processor, None, "none", with_answer=False)
    with pytest.raises(ValueError, match=rf"image is 1x1 pixels, smaller than {MIN_IMAGE_SIDE} px on a side"):
        collate([{"prompt": to_messages("<image> go"), "image": Image.new("RGB", (1, 1))}])


def test_eval_of_an_interrupted_training_run_names_it_and_the_resume_command(tiny_dir, small_dataset_dir, tmp_path,
                                                                             capsys):
    out = tmp_path / "sft"
    argv = sft_argv(tiny_dir, small_dataset_dir, out, "--max_steps", "3", "--save_strategy", "steps", "--save_steps",
                    "1")
    cmd = [sys.executable, str(HERE / "inject_fault.py"), "step", "2", "--", *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode < 0 and (out / "checkpoint-1" / "mirage_checkpoint.json").is_file()
    assert main(["eval", "--model", str(out), "--output_dir", str(tmp_path / "e"), "--limit", "1"]) == 1
    line = one_line(capsys)
    assert f"{out} holds no finished model: the run `mirage-rl sft --config" in line
    assert "was interrupted; its last complete checkpoint is checkpoint-1: resume it by running that command again" \
        in line and f"--model {out / 'checkpoint-1'}" in line
    assert "tokenizer files missing" not in line


# ------------------------------------------------------------------------------ 4. reward plugin contracts
@pytest.mark.parametrize("plugin, expected", [
    ("string_reward", "expected a float (or None) per completion; completion 0 got a str: 'good'"),
    ("one_value_reward", "expected 4 rewards, one per completion; got 1: [1.0]"),
    ("raising_reward", "raised KeyError"),
])
def test_a_reward_plugin_that_breaks_the_contract_is_named_in_one_line(plugin, expected, tiny_dir, small_dataset_dir,
                                                                       tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    assert main(grpo_argv(tiny_dir, small_dataset_dir, tmp_path / "g", "--num_generations", "4",
                          "--per_device_train_batch_size", "4", "--reward_funcs", f"toy_rewards.{plugin}",
                          "--reward_weights", "1.0")) == 1
    line = one_line(capsys)
    assert line.startswith(f"mirage-rl grpo: error: reward function toy_rewards.{plugin} (step 0, a batch of 4 "
                           "completions)") and expected in line
    if plugin == "raising_reward":  # the plugin's own frame, not TRL's
        assert f"{HERE / 'toy_rewards.py'}:" in line and "return [table[len(c)] for c in completions]" in line
        assert "grpo_trainer.py" not in line


# ------------------------------------------------------------------------------ 5. a measurement that cannot measure
def test_interventions_and_geometry_over_degenerate_items_are_marked_not_measured(tiny_dir, vsp_dir, tmp_path,
                                                                                  capsys):
    from PIL import Image

    out = tmp_path / "e"
    assert main(["eval", "--model", str(tiny_dir), "--benchmark_dir", str(vsp_dir / "maze_planning"), "--output_dir",
                 str(out), "--limit", "1", "--max_new_tokens", "8", "--latent_intervention", "none", "swap",
                 "zero"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    for name in ("swap", "zero"):
        entry = report["interventions"][name]
        assert entry["measured"] is False and entry["paired"] is None and "at least 2" in entry["not_measured"]
        assert f"intervention {name}: NOT MEASURED" in printed
    assert report["latent_geometry"]["measured"] is False and "latent geometry: NOT MEASURED" in printed
    assert Image.open(out / "interventions.png").size[0] > 0


def test_swap_with_every_item_alone_in_its_level_is_not_measured():
    from mirage_rl.intervention_eval import unmeasured_reason

    assert "alone in its level" in unmeasured_reason("swap", items=4, opened=4, fixed=4)
    assert unmeasured_reason("swap", items=4, opened=4, fixed=1) is None
    assert "no item opened a latent block" in unmeasured_reason("zero", items=4, opened=0, fixed=0)
    assert unmeasured_reason("skip", items=4, opened=0, fixed=0) is None


@pytest.mark.parametrize("command", ["grpo", "eval"])
def test_latents_from_a_direct_sft_checkpoint_are_refused_by_grpo_and_eval_alike(command, direct_sft_dir,
                                                                                 small_dataset_dir, vsp_dir, tmp_path,
                                                                                 capsys):
    argv = (grpo_argv(direct_sft_dir, small_dataset_dir, tmp_path / "g", "--latent_mode", "hidden",
                      "--reward_funcs", "format_reward", "--reward_weights", "1.0")
            if command == "grpo" else
            ["eval", "--model", str(direct_sft_dir), "--benchmark_dir", str(vsp_dir / "maze_planning"),
             "--output_dir", str(tmp_path / "e"), "--limit", "1", "--latent_mode", "hidden"])
    assert main(argv) == 1
    line = one_line(capsys)
    assert "the checkpoint was trained with latent_mode none" in line and "latent slots were never trained" in line


# ------------------------------------------------------------------------------ 6. defaults, and advised fixes work
def test_results_no_run_on_a_fresh_output_root_says_what_to_do(tmp_path, capsys):
    assert main(["results", "--config", str(RECIPES / "results_small.yaml"), "--output_root",
                 str(tmp_path / "fresh"), "--no_run"]) == 1
    line = one_line(capsys)
    assert "--no_run rebuilds the report from the finished steps" in line and "has none" in line


def test_results_defaults_are_a_runnable_comparison(monkeypatch):
    from mirage_rl.recipe import parse
    from mirage_rl.results import ResultsArguments
    from mirage_rl.results.plan import plan

    monkeypatch.chdir(REPO)  # the defaults are relative to the repository, as `make results` runs them
    (args,) = parse((ResultsArguments,), [])  # before the fix: "arm mirage_alt_helper needs alt_data_config"
    steps = plan(args, base=Path("outputs/base/seeing-tiny-x"))  # every run's recipe is found (FileNotFoundError)
    configs = [s.argv[s.argv.index("--config") + 1] for s in steps if "--config" in s.argv]
    assert configs and all(Path(c).is_file() for c in configs)
    assert any(s.key == "seed0/stage2_alt_helper" for s in steps) and not any(
        s.key == "seed1/stage2_alt_helper" for s in steps)  # mirage_alt_helper runs on the first seed only
    assert f"<!-- results:begin {args.report_block}" in Path(args.report).read_text()


def test_the_fix_the_output_root_refusal_advises_works(tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    argv = ["results", "--config", str(RECIPES / "results_small.yaml"), "--output_root", str(root), "--no_run"]
    assert main(argv) == 1
    assert "pass --overwrite_output_dir true" in one_line(capsys)
    assert main(argv + ["--overwrite_output_dir", "true"]) == 1
    line = one_line(capsys)
    assert "not used by the HfArgumentParser" not in line and "--no_run rebuilds the report" in line


def _command_options() -> set[str]:
    from trl import ModelConfig

    from mirage_rl.base_model import BaseModelArguments
    from mirage_rl.cli import ExportArguments
    from mirage_rl.commands.create_model import CreateModelArguments
    from mirage_rl.commands.grpo import GRPOScriptArguments
    from mirage_rl.commands.sft import SFTScriptArguments
    from mirage_rl.data.build import BuildDataArguments
    from mirage_rl.evaluation import EvalArguments
    from mirage_rl.pipeline import PipelineArguments
    from mirage_rl.results import ResultsArguments
    from mirage_rl.trainers import MirageGRPOConfig, MirageSFTConfig

    import dataclasses

    names = {"help", "config", "debug"}
    for cls in (BaseModelArguments, ExportArguments, CreateModelArguments, GRPOScriptArguments, SFTScriptArguments,
                BuildDataArguments, EvalArguments, PipelineArguments, ResultsArguments, MirageGRPOConfig,
                MirageSFTConfig, ModelConfig):
        for f in dataclasses.fields(cls):
            names.add(f.name)
            if f.type in (bool, "bool") and f.default is True:
                names.add(f"no_{f.name}")
    return names


def test_every_option_a_message_advises_exists():
    """The class of 'a message advises a flag the command does not have': every `--option` named in a string of
    mirage_rl/ or rewards/ is an option of some command."""
    import ast

    known = _command_options()
    advised = set()
    for path in [*(REPO / "mirage_rl").rglob("*.py"), *(REPO / "rewards").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        def name(call):
            return getattr(call.func, "id", None) or getattr(call.func, "attr", "")

        # every error built (raised or returned) and every log line
        messages = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
                    and (name(n).endswith("Error") or name(n) in ("warning", "info", "error"))]
        for node in messages:
            for const in ast.walk(node):
                if isinstance(const, ast.Constant) and isinstance(const.value, str):
                    for m in re.finditer(r"--([a-z][a-z0-9_]*[a-z0-9])\b", const.value):
                        advised.add((m.group(1), f"{path.name}:{const.lineno}"))
    assert len(advised) > 10  # the scan sees the messages
    unknown = sorted((opt, where) for opt, where in advised if opt not in known)
    assert not unknown, unknown


def test_every_guarded_command_takes_the_flags_its_refusals_advise():
    """Every command whose output folder is guarded accepts --overwrite_output_dir, and every producing command
    --replace_output_dir (the two fixes OutputDirError advises)."""
    import dataclasses

    from mirage_rl.base_model import BaseModelArguments
    from mirage_rl.cli import ExportArguments
    from mirage_rl.commands.create_model import CreateModelArguments
    from mirage_rl.data.build import BuildDataArguments
    from mirage_rl.evaluation import EvalArguments
    from mirage_rl.pipeline import PipelineArguments
    from mirage_rl.results import ResultsArguments
    from mirage_rl.trainers import MirageGRPOConfig, MirageSFTConfig

    for cls in (BaseModelArguments, ExportArguments, CreateModelArguments, BuildDataArguments, EvalArguments,
                PipelineArguments, ResultsArguments, MirageGRPOConfig, MirageSFTConfig):
        names = {f.name for f in dataclasses.fields(cls)}
        assert "overwrite_output_dir" in names, cls
        if cls not in (BaseModelArguments, PipelineArguments, ResultsArguments):
            assert "replace_output_dir" in names, cls


# ------------------------------------------------------------------------------ 7. what a user sees
def _captured_figure(monkeypatch, module):
    figs = []
    monkeypatch.setattr(module, "atomic_save_figure", lambda fig, path, dpi=120: figs.append(fig))
    return figs


def test_accuracy_zero_draws_labelled_zero_bars(monkeypatch, tmp_path):
    import mirage_rl.evaluation as evaluation

    figs = _captured_figure(monkeypatch, evaluation)
    from mirage_rl.tasks import get_task

    level = {"n": 5, **{k: 0.0 for k, _ in get_task("plan").metrics}}
    evaluation.plot_by_level({"task": "plan", "by_level": {"3": level, "4": level}}, tmp_path / "p.png", "t")
    texts = [t.get_text() for t in figs[0].axes[0].texts]
    assert texts.count("0.00") == 4  # two metrics x two levels, each a visible zero


def test_the_reward_curve_names_the_run_has_whole_step_ticks_and_shows_a_single_point(monkeypatch, tmp_path):
    import mirage_rl.commands.grpo as grpo

    figs = _captured_figure(monkeypatch, grpo)
    grpo.plot_rewards([{"reward": 0.5, "step": 1, "rewards/format_reward/mean": 0.5}], tmp_path / "r.png",
                      title="GRPO run g10 (from s2)")
    ax = figs[0].axes[0]
    assert ax.get_title() == "GRPO run g10 (from s2)" and ax.lines[0].get_marker() == "o"
    figs[0].canvas.draw()
    assert list(ax.get_xticks()) == [1.0]  # not 0.945, 0.960, ...
    grpo.plot_rewards([{"reward": s / 40, "step": s} for s in range(1, 40, 3)], tmp_path / "r.png")
    figs[-1].canvas.draw()
    assert all(float(t).is_integer() for t in figs[-1].axes[0].get_xticks())


def test_the_model_card_names_the_start_model_and_what_mirage_rl_did(tiny_dir, small_dataset_dir, tmp_path):
    out = tmp_path / "s"
    assert main(sft_argv(tiny_dir, small_dataset_dir, out, "--save_strategy", "steps", "--save_steps", "1")) == 0
    card = (out / "README.md").read_text()
    assert "[None]" not in card and "huggingface.co/None" not in card
    assert f"start model: `{tiny_dir}`" in card and "Mirage stage 2" in card


@pytest.mark.parametrize("command", ["sft", "grpo"])
def test_a_user_error_is_not_buried_under_library_warnings(command, tiny_dir, small_dataset_dir, tmp_path):
    argv = (sft_argv(tiny_dir, tmp_path / "missing", tmp_path / "out") if command == "sft" else  # fails at start-up
            grpo_argv(tiny_dir, small_dataset_dir, tmp_path / "g", "--reward_funcs", "toy_rewards.raising_reward",
                      "--reward_weights", "1.0"))  # fails after the first rollouts
    env = {**ENV, "PYTHONPATH": str(HERE)}
    proc = subprocess.run([sys.executable, "-m", "mirage_rl", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"mirage-rl {command}: error: ")
    assert "Setting accelerator to CPU" not in proc.stderr + proc.stdout
    assert "FutureWarning" not in proc.stderr and "Traceback" not in proc.stderr


def test_help_names_the_command_lists_config_and_says_each_thing_once(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: mirage-rl eval ") and "--config RECIPE.yaml" in out
    assert "(default: all). (default: None)" not in out
    no_resume = out[out.index("--no_resume, --no-resume"):].split("\n  --")[0]
    assert "Turn --resume off." in no_resume and "Continue a killed run" not in no_resume
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    out = capsys.readouterr().out
    resume = out[out.index("\n  --resume_from_checkpoint RESUME"):].split("\n  --")[1]
    assert "Not directly used by" not in resume and "last complete checkpoint-N" in " ".join(resume.split())


def test_the_readme_create_model_line_states_the_real_defaults():
    from mirage_rl.commands.create_model import CreateModelArguments

    line = next(x for x in (REPO / "README.md").read_text().splitlines()
                if x.startswith("mirage-rl create-model") and "options and defaults" in x)
    from mirage_rl import backbones

    d = CreateModelArguments()
    assert f"--backbone {d.backbone}" in line and f"--max_pixels {backbones.get(d.backbone).tiny_pixels()[1]}" in line
    assert f"--rope_theta {d.rope_theta:g}" in line
    assert f"--latent_size {d.latent_size}" in line and f"--hidden_size {d.hidden_size}" in line


# ------------------------------------------------------------------------------ 8. first contact
def test_threads_follow_the_free_cores_and_sleep_on_a_busy_machine(monkeypatch):
    from mirage_rl import cli

    busy = cli.busy_cores(0.05)  # the real measurement: a share of this machine's cores
    assert busy is None or 0.0 <= busy <= os.cpu_count()
    for var in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cli, "busy_cores", lambda: 1.97)  # another job keeps both cores busy
    cli.choose_threads()
    assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(cli, "busy_cores", lambda: 0.05)
    cli.choose_threads()  # the user's setting wins
    assert os.environ["OMP_NUM_THREADS"] == "2" and "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.delenv("OMP_NUM_THREADS")
    cli.choose_threads()  # an idle machine: every core, threads that spin as usual
    assert os.environ["OMP_NUM_THREADS"] == "2" and "OMP_WAIT_POLICY" not in os.environ


def test_an_unknown_option_gets_the_closest_one(capsys):
    assert main(["sft", "--config", str(RECIPES / "stage1_tiny.yaml"), "--max_stepz", "3"]) == 2
    line = one_line(capsys)
    assert "unknown option --max_stepz (did you mean --max_steps?)" in line and "mirage-rl sft --help" in line


def test_the_makefile_names_the_summary_the_demo_writes():
    out = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True).stdout
    assert "summary in outputs/demo/pipeline_summary.md" in out and "outputs/vsp_spatial_planning/demo" not in out
    makefile = (REPO / "Makefile").read_text()
    assert "\ntest bench" in makefile and "OMP_NUM_THREADS ?= 2" not in makefile.split("\ntest bench")[0]


def test_the_package_licence_is_an_spdx_string():
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"


def test_the_readme_says_what_data_the_demo_needs_and_where_to_get_it():
    text = (REPO / "README.md").read_text()
    quickstart = text[text.index("## Quickstart"):text.index("\n## ", text.index("## Quickstart") + 5)]
    assert "UCSB-NLP-Chang/Visual-Spatial-Planning" in quickstart and "maze_planning/level" in quickstart
