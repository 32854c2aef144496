import json
import re
from pathlib import Path

import pytest

from mirage_rl.cli import main


def test_eval_writes_report_samples_and_plot(tiny_dir, vsp_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_dir), "--benchmark_dir", str(vsp_dir / "maze_planning"),
                 "--output_dir", str(out), "--levels", "3", "6", "--limit", "150", "--max_new_tokens", "12"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"benchmark", "n", "accuracy", "accuracy_strict", "invalid_rate", "by_level"}
    assert report["n"] == 150 and set(report["by_level"]) == {"3", "6"}
    assert report["by_level"]["3"]["n"] == 100 and report["by_level"]["6"]["n"] == 50
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 150 and set(lines[0]) >= {"prompt_id", "completion", "plan", "verdict"}
    assert (out / "accuracy_by_level.png").read_bytes()[:4] == b"\x89PNG"
    assert "all" in capsys.readouterr().out


def test_eval_describe_task_scores_the_map_table(tiny_dir, vsp_dir, tmp_path, capsys):
    from mirage_rl.tasks.vsp_planning import maps as vsp_maps
    from mirage_rl.evaluation import EvalArguments, summarize
    from mirage_rl.tasks.vsp_planning.describe import score_table

    desc = [[0, -1, 0], [1, 0, 0], [0, 0, 2]]
    assert vsp_maps.map_to_text(desc) == "_ # _\n@ _ _\n_ _ *"
    assert score_table(desc, "_ # _\n@ _ _\n_ _ *\n") == {"table_exact": True, "cells_right": 9, "n_cells": 9,
                                                            "player_found": True, "goal_found": True}
    # a wrong cell, a missing row: counted wrong, the rest still scored by position
    s = score_table(desc, "_ _ _\n@ _ _")
    assert (s["table_exact"], s["cells_right"], s["player_found"], s["goal_found"]) == (False, 5, True, False)
    assert score_table(desc, "@ # _\n_ _ _\n_ _ *")["player_found"] is False
    rep = summarize([{"level": 3, **score_table(desc, t)} for t in ("_ # _\n@ _ _\n_ _ *", "_ _ _\n@ _ _")], "vsp", "describe")
    assert rep["by_level"]["3"] == {"n": 2, "table_exact": 0.5, "cell_accuracy": 14 / 18, "player_found": 1.0,
                                    "goal_found": 0.5}
    with pytest.raises(ValueError, match="task must be one of"):
        EvalArguments(model="m", task="draw")
    with pytest.raises(ValueError, match="task describe has no latent block"):
        EvalArguments(model="m", task="describe", latent_mode="hidden")

    out = tmp_path / "describe"
    assert main(["eval", "--task", "describe", "--model", str(tiny_dir), "--benchmark_dir", str(vsp_dir / "maze_planning"),
                 "--output_dir", str(out), "--levels", "4", "--limit", "6", "--max_new_tokens", "16"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "describe" and report["by_level"]["4"]["n"] == 6
    assert 0 <= report["cell_accuracy"] <= 1 and "accuracy" not in report
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    maps = {m.prompt_id: m.map_desc for m in vsp_maps.load_benchmark(vsp_dir / "maze_planning", [4])}
    assert all(x["n_cells"] == 16 and x == {**x, **score_table(maps[x["prompt_id"]], x["completion"])} for x in lines)
    assert "cell_accuracy" in capsys.readouterr().out



def test_recipes_parse(tmp_path):
    from trl import ModelConfig, TrlParser

    from mirage_rl.base_model import BaseModelArguments
    from mirage_rl.commands.create_model import CreateModelArguments
    from mirage_rl.evaluation import EvalArguments
    from mirage_rl.commands.grpo import GRPOScriptArguments
    from mirage_rl.recipe import RECIPE_STAGES
    from mirage_rl.results import ResultsArguments
    from mirage_rl.commands.sft import SFTScriptArguments
    from mirage_rl.trainers import MirageGRPOConfig, MirageSFTConfig

    recipes = sorted(Path(__file__).resolve().parents[1].glob("recipes/**/*.yaml"))
    # one naming rule, <stage>_<variant>.yaml: the longest known stage the name starts with
    stage_of = {r: max((s for s in RECIPE_STAGES if r.stem.startswith(s + "_")), key=len) for r in recipes}
    kinds = set(stage_of.values())
    assert {"stage1", "stage2", "grpo", "eval", "model", "results"} <= kinds
    for r in recipes:
        stem = stage_of[r]
        if stem.startswith("eval"):
            (e,) = TrlParser((EvalArguments,)).parse_args_and_config(["--config", str(r), "--model", "m"])
            assert e.max_new_tokens > 0
            continue
        if stem in ("model", "results", "base"):
            kind = {"model": CreateModelArguments, "results": ResultsArguments, "base": BaseModelArguments}[stem]
            (a,) = TrlParser((kind,)).parse_args_and_config(["--config", str(r)])
            assert {"model": lambda: a.output_dir, "results": lambda: a.seeds, "base": lambda: a.pretrain_config}[stem]()
            continue
        grpo = "grpo" in stem.split("_")
        types = ((GRPOScriptArguments, MirageGRPOConfig, ModelConfig) if grpo
                 else (SFTScriptArguments, MirageSFTConfig, ModelConfig))
        s, t, m = TrlParser(types).parse_args_and_config(
            ["--config", str(r), "--output_dir", str(tmp_path / "o"), "--use_cpu", "true", "--bf16", "false"])
        assert m.model_name_or_path
        if grpo:
            accuracy = "plan_success_reward" if r.parent.name == "vsp_spatial_planning" else "choice_accuracy_reward"
            assert t.num_generations == 8 and s.reward_funcs == [accuracy, "format_reward"]
            assert t.reward_weights == [1.0, 0.1]
        else:
            assert t.latent_size >= 1


def test_sft_command_runs_a_recipe_and_records_the_latent_mode(tiny_dir, small_dataset_dir, vsp_dir, tmp_path):
    from mirage_rl.modeling import load_model

    recipe = str(Path(__file__).resolve().parents[1] / "recipes/vsp_spatial_planning/dummy_latent_tiny.yaml")
    out = tmp_path / "dummy"
    assert main(["sft", "--config", recipe, "--model_name_or_path", str(tiny_dir), "--dataset_path",
                 str(small_dataset_dir), "--output_dir", str(out), "--max_steps", "2",
                 "--per_device_train_batch_size", "2", "--save_strategy", "no"]) == 0
    assert load_model(out).config.latent_mode == "dummy"
    assert main(["eval", "--model", str(out), "--benchmark_dir", str(vsp_dir / "maze_planning"),
                 "--output_dir", str(tmp_path / "ev"), "--limit", "4", "--max_new_tokens", "4"]) == 0
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["latent_mode"] == "dummy"


def test_stage1_set_latent_size_changes_k_of_an_untrained_base(tiny_dir, small_dataset_dir, vsp_dir, tmp_path, capsys):
    from mirage_rl.modeling import load_model

    recipe = str(Path(__file__).resolve().parents[1] / "recipes/vsp_spatial_planning/stage1_tiny.yaml")
    common = ["sft", "--config", recipe, "--model_name_or_path", str(tiny_dir), "--dataset_path", str(small_dataset_dir),
              "--max_steps", "2", "--per_device_train_batch_size", "2", "--save_strategy", "no", "--latent_size", "8",
              "--compress", "grid"]
    assert load_model(tiny_dir).config.latent_size == 4
    assert main([*common, "--output_dir", str(tmp_path / "refused")]) != 0  # another k without set_latent_size
    assert "latent_size=8 in the recipe but 4 in the checkpoint" in capsys.readouterr().err
    out = tmp_path / "k8"
    assert main([*common, "--output_dir", str(out), "--set_latent_size", "true"]) == 0
    assert load_model(out).config.latent_size == 8
    # the oracle of a k = 8 grid checkpoint: 8 vectors per item, pooled on the grid as its stage 1 was
    assert main(["eval", "--model", str(out), "--benchmark_dir", str(vsp_dir / "maze_planning"), "--output_dir",
                 str(tmp_path / "ev"), "--limit", "4", "--max_new_tokens", "12", "--latent_intervention", "none",
                 "oracle", "--oracle_compress", "grid"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "ev" / "interventions" / "none" / "samples.jsonl").read_text().splitlines()]
    opened = [r["completion"] for r in rows if r["completion"].startswith("<|latent_start|>")]
    assert all(c.count("<|latent_pad|>") == 8 for c in opened)
    from mirage_rl.intervention_eval import oracle_targets
    from mirage_rl.modeling import load_processor
    from mirage_rl.tasks import get_task

    task = get_task("plan")
    items = task.load_benchmark(vsp_dir / "maze_planning", None, None)[:2]
    model = load_model(out)
    oracle = oracle_targets(model, load_processor(str(out)), task, items, None, model.config.latent_size, "grid")
    assert [tuple(o.shape) for o in oracle] == [(8, model.config.text_config.hidden_size)] * 2
    with pytest.raises(ValueError, match="stage 1 only"):
        from mirage_rl.trainers import MirageSFTConfig

        MirageSFTConfig(output_dir=str(tmp_path / "x"), stage=2, set_latent_size=True, use_cpu=True)


def test_export_and_multi_process_eval_give_clear_errors(tiny_dir, tmp_path, monkeypatch, capsys):
    import pytest

    assert main(["export", "--adapter_dir", str(tiny_dir), "--output_dir", str(tmp_path / "merged")]) == 1
    err = capsys.readouterr().err  # one line, no traceback
    assert re.search("no adapter_config.json.*use_peft", err) and "Traceback" not in err and err.count("\n") == 1
    with pytest.raises(FileNotFoundError, match="no adapter_config.json.*use_peft"):  # --debug: the exception itself
        main(["export", "--debug", "--adapter_dir", str(tiny_dir), "--output_dir", str(tmp_path / "merged")])
    assert main(["export", "--adapter_dir", str(tiny_dir), "--output_dir", str(tmp_path / "m"), "--dtype", "int8"]) == 2
    assert "int8" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under accelerate launch / torchrun
    assert main(["eval", "--model", str(tiny_dir), "--output_dir", str(tmp_path / "eval")]) == 2
    assert "without accelerate launch" in capsys.readouterr().err and not (tmp_path / "eval").exists()
