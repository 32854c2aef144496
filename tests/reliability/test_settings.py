"""Settings that are wrong but were accepted (issue 16, part 4): each is refused at start-up with a message naming the
option and its valid range, or (NaN rewards, stale pipeline stages) stopped with a message that says why."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from mirage_rl.cli import main

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes" / "vsp_spatial_planning"


@pytest.mark.parametrize("cmd,extra,message", [
    ("sft", ["--num_train_epochs", "0"], "num_train_epochs=0.0 with max_steps=-1 trains nothing: set num_train_epochs "
                                         "> 0 or max_steps >= 1"),
    ("grpo", ["--num_train_epochs", "0"], "num_train_epochs=0.0 with max_steps=-1 trains nothing"),
    ("sft", ["--gamma", "-0.1"], "gamma must be >= 0 (the stage-1 weight of the CE loss; paper: 0.1), got -0.1"),
    ("sft", ["--latent_fill", "cache"],
     "latent_fill must be one of ('auto', 'cached', 'keystore', 'multipass'), got 'cache'"),
    ("sft", ["--latent_fused_steps", "on"], "latent_fused_steps must be one of ('off', 'compile', 'cudagraphs'), got 'on'"),
    ("sft", ["--latent_fill", "cached", "--gradient_checkpointing", "true"],
     "latent_fill: cached cannot run with gradient_checkpointing: true (checkpointed layers get no KV cache)"),
    ("grpo", ["--latent_fill", "multipass", "--latent_fused_steps", "compile"],
     "latent_fused_steps: compile runs on the key store: set latent_fill to auto or keystore (not multipass)"),
])
def test_settings_that_train_on_nonsense_are_refused_at_start_up(cmd, extra, message, tmp_path, capsys):
    recipe = RECIPES / ("stage1_tiny.yaml" if cmd == "sft" else "grpo_tiny.yaml")
    out = tmp_path / "out"
    assert main([cmd, "--config", str(recipe), "--output_dir", str(out), "--max_steps", "-1", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mirage-rl {cmd}: error: ") and message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("limit", ["0", "-395"])
def test_eval_limit_below_one_is_refused_and_leaves_no_journal(limit, tiny_dir, vsp_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_dir), "--benchmark_dir", str(vsp_dir / "maze_planning"),
                 "--output_dir", str(out), "--limit", limit]) == 2
    assert f"limit must be >= 1 (the first N maps) or unset (all maps), got {limit}" in capsys.readouterr().err
    assert not out.exists()


def test_an_eval_journal_blocks_only_when_a_setting_that_changes_samples_differs(tiny_dir, vsp_dir, tmp_path):
    from mirage_rl.evaluation import JOURNAL, EvalArguments, evaluate, run_identity
    from mirage_rl.outputs import claim

    bench = str(vsp_dir / "maze_planning")
    ref = evaluate(EvalArguments(model=str(tiny_dir), benchmark_dir=bench, output_dir=str(tmp_path / "ref"), limit=8,
                                 batch_size=2, max_new_tokens=6))
    samples = [json.loads(x) for x in (tmp_path / "ref" / "samples.jsonl").read_text().splitlines()]
    out = tmp_path / "eval"
    claim(out, "eval")  # what a killed eval leaves: its claimed folder and its journal
    # an interrupted run of --limit 4 (4 samples done): a run of --limit 8 continues it (limit changes no sample)
    args = EvalArguments(model=str(tiny_dir), benchmark_dir=bench, output_dir=str(out), limit=8, batch_size=2,
                         max_new_tokens=6)
    header = {"run": run_identity(EvalArguments(**{**vars(args), "limit": 4}), "hidden")}
    (out / JOURNAL).write_text("".join(json.dumps(r) + "\n" for r in [header, *samples[:4]]))
    report = evaluate(args)
    assert report["resumed_at"] == 4 and report["accuracy"] == ref["accuracy"]
    # a journal of other settings without any sample (a run that crashed at once) is not in the way either
    other = {"run": {**header["run"], "max_new_tokens": 99}}
    (out / JOURNAL).write_text(json.dumps(other) + "\n")
    assert evaluate(args)["resumed_at"] == 0


def not_a_reward(command):
    return 0


def test_a_reward_plugin_that_is_not_a_reward_function_fails_at_start_up(small_dataset_dir, tmp_path, capsys):
    import rewards

    with pytest.raises(ValueError, match=r"reward function 'os.system': signature system\(command\) does not take "
                                         r"completions and \*\*kwargs; a reward function is fn\(completions, \*\*kwargs\)"):
        rewards.load_reward_funcs(["os.system"])
    with pytest.raises(ValueError, match=r"not_a_reward\(command\) does not take completions"):
        rewards.load_reward_funcs([f"{__name__}.not_a_reward"])
    out = tmp_path / "g"
    t0 = time.perf_counter()
    assert main(["grpo", "--config", str(RECIPES / "grpo_tiny.yaml"), "--reward_funcs", "os.system",
                 "--dataset_path", str(small_dataset_dir), "--output_dir", str(out)]) == 1
    assert "reward function 'os.system'" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 10 and not out.exists()  # before the model is loaded, no folder left


def nan_reward(completions, **kwargs):
    return [float("nan")] * len(completions)


def test_an_all_nan_reward_is_logged_and_stops_training(tiny_dir, small_rows, tmp_path, caplog):
    from test_grpo import make_trainer

    rows = small_rows.remove_columns(["helper_image", "answer"])
    trainer, _ = make_trainer(tiny_dir, rows, tmp_path, reward_funcs=[nan_reward], max_steps=10,
                              nan_reward_patience=2, max_completion_length=6)
    with pytest.raises(ValueError, match=r"reward function nan_reward returned NaN or None for every completion of 2 "
                                         r"generation batches in a row \(8 completions each\)"):
        trainer.train()
    warned = [r.message for r in caplog.records if "returned NaN/None for all" in r.message]
    assert warned[:2] == ["reward function nan_reward returned NaN/None for all 8 completions of this generation batch "
                          f"({i} batch(es) in a row)" for i in (1, 2)]
    assert trainer.state.global_step == 1  # stopped at the second generation batch, not after 10 silent steps


def test_pipeline_refuses_a_finished_stage_of_other_settings(tiny_dir, small_dataset_dir, tmp_path, capsys):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    cfg = yaml.safe_load((RECIPES / "stage1_tiny.yaml").read_text())
    cfg.update(max_steps=2, save_strategy="no", dataset_path=str(small_dataset_dir), model_name_or_path=str(tiny_dir))
    (recipes / "stage1_tiny.yaml").write_text(yaml.safe_dump(cfg))
    root = tmp_path / "run"
    argv = ["pipeline", "--recipe_dir", str(recipes), "--stages", "stage1", "--evaluate", "false", "--output_root",
            str(root)]
    assert main(argv) == 0
    assert main(argv) == 0  # same settings: the finished stage is reused
    before = (root / "stage1" / "model.safetensors").read_bytes()
    cfg["max_steps"] = 3
    (recipes / "stage1_tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"stage1: {root / 'stage1'} holds a finished model trained with other settings (max_steps: 2 saved, 3 now)" \
           in err and "pass --retrain true" in err
    assert (root / "stage1" / "model.safetensors").read_bytes() == before
    assert main(argv + ["--retrain", "true"]) == 0
    assert json.loads((root / "stage1" / "mirage_output.json").read_text())["run"]["max_steps"] == 3
    assert (root / "stage1" / "model.safetensors").read_bytes() != before
