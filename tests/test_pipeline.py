"""The GRPO command and the stage1 -> stage2 -> GRPO -> eval pipeline, on the shipped tiny recipes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from mirage_rl.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "vsp_spatial_planning"


def short_copy(src: Path, out: Path, tiny_dir, data, steps: dict, grpo: dict, evaluation: dict) -> dict:
    """Write ``src``'s tiny recipes into ``out`` with ``steps`` max_steps per stage, the test data, stage 1 from the
    tiny model, ``grpo`` and ``evaluation`` overrides; returns the shipped eval recipe (before the overrides)."""
    out.mkdir()
    for stage, n in steps.items():
        cfg = yaml.safe_load((src / f"{stage}_tiny.yaml").read_text())
        cfg.update(max_steps=n, save_strategy="no", dataset_path=str(data), logging_steps=1)
        if stage == "stage1":
            cfg["model_name_or_path"] = str(tiny_dir)
        if stage == "grpo":
            cfg.update(grpo)
        (out / f"{stage}_tiny.yaml").write_text(yaml.safe_dump(cfg))
    shipped = yaml.safe_load((src / "eval_tiny.yaml").read_text())
    (out / "eval_tiny.yaml").write_text(yaml.safe_dump({**shipped, **evaluation}))
    return shipped


@pytest.fixture()
def short_recipes(tmp_path, tiny_dir, small_dataset_dir, vsp_dir):
    """The shipped tiny recipes with a few steps each and test paths."""
    out = tmp_path / "recipes"
    short_copy(RECIPES, out, tiny_dir, small_dataset_dir, {"stage1": 3, "stage2": 3, "grpo": 2},
               dict(per_device_train_batch_size=8, num_generations=4, max_completion_length=16),
               dict(benchmark_dir=str(vsp_dir / "maze_planning"), limit=6, max_new_tokens=16))
    return out


def test_pipeline_runs_every_stage_evaluates_and_resumes(short_recipes, tmp_path, caplog):
    root = tmp_path / "run"
    argv = ["pipeline", "--recipe_dir", str(short_recipes), "--variant", "tiny", "--output_root", str(root)]
    assert main(argv) == 0
    summary = json.loads((root / "pipeline_summary.json").read_text())
    rows = summary["stages"]
    assert [r["stage"] for r in rows] == ["stage1", "stage2", "grpo"]
    assert all(r["n"] == 6 for r in rows)
    md = (root / "pipeline_summary.md").read_text()
    assert md.count("\n| stage | latent mode") == 1 and "| grpo | hidden |" in md
    # the bars to clear, from the training set: the chance rows sit under the stages, per level
    bars = summary["chance"]
    assert bars["trained_levels"] == ["3", "4", "5", "6"] and 0 < bars["by_level"]["3"]["random_plan"] < 1
    assert "| *chance: random plan* | - |" in md and "| *chance: best blind plan* | - |" in md
    # the 6 evaluated maps are all of level 3: no separate trained-levels column
    assert "| level 3 | all | all: strict (Mirage) | all: invalid |" in md
    for stage in ("stage1", "stage2", "grpo"):
        assert (root / stage / "model.safetensors").exists()
        assert (root / stage / "eval" / "report.json").exists()
    assert (root / "grpo" / "reward_curve.png").read_bytes()[:4] == b"\x89PNG"
    log = json.loads((root / "grpo" / "train_log.json").read_text())
    assert any("time/generation" in h and "rewards/format_reward/mean" in h for h in log)
    # GRPO started from stage 2's output: the recipe's model_name_or_path was overridden
    assert json.loads((root / "grpo" / "config.json").read_text())["latent_mode"] == "hidden"
    # a second run finds every stage finished: nothing is retrained, the summary is rebuilt
    before = (root / "grpo" / "model.safetensors").stat().st_mtime_ns
    caplog.clear()
    caplog.set_level(logging.INFO, logger="mirage_rl")  # reuse is information, logged at INFO
    assert main(argv) == 0
    assert (root / "grpo" / "model.safetensors").stat().st_mtime_ns == before
    assert sum("not retraining" in r.message for r in caplog.records) == 3


def test_pipeline_names_the_missing_recipe_and_the_variants(short_recipes):
    with pytest.raises(FileNotFoundError, match=r"stage1_huge.yaml.*variants in .*\['tiny'\]"):
        main(["pipeline", "--debug", "--recipe_dir", str(short_recipes), "--variant", "huge"])
    with pytest.raises(ValueError, match="ordered sub-sequence"):
        main(["pipeline", "--debug", "--recipe_dir", str(short_recipes), "--stages", "grpo", "stage1"])


def test_grpo_unknown_reward_fails_at_start_up_with_the_known_names(short_recipes, tmp_path):
    out = tmp_path / "g"
    with pytest.raises(ValueError, match="known rewards are choice_accuracy_reward, format_reward"):
        main(["grpo", "--debug", "--config", str(short_recipes / "grpo_tiny.yaml"), "--reward_funcs", "plan_succes",
              "--output_dir", str(out)])
    assert not out.exists()


def test_grpo_rejects_a_reward_weight_count_mismatch(short_recipes, tmp_path):
    with pytest.raises(ValueError, match="reward_weights has 1 values for 2 reward_funcs"):
        main(["grpo", "--debug", "--config", str(short_recipes / "grpo_tiny.yaml"), "--reward_weights", "1.0",
              "--output_dir", str(tmp_path / "g")])


def test_reward_trend_reads_the_first_and_last_quarter_of_the_grpo_log(tmp_path):
    from mirage_rl.pipeline import reward_trend

    log = [{"loss": 0.1}] + [{"reward": r, "step": i} for i, r in enumerate([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9])]
    (tmp_path / "train_log.json").write_text(json.dumps(log))
    assert reward_trend(str(tmp_path)) == {"logs": 8, "first_quarter": pytest.approx(0.15),
                                           "last_quarter": pytest.approx(0.8)}
    (tmp_path / "train_log.json").write_text(json.dumps(log[:4]))
    assert reward_trend(str(tmp_path)) is None  # too few logged steps to compare quarters


@pytest.mark.parametrize("task", ["vsp_spatial_reasoning", "jigsaw"])
def test_the_tiny_pipeline_of_each_benchmark_task_runs_end_to_end(task, tmp_path, tiny_dir, vsp_dir):
    """`mirage-rl pipeline --recipe_dir recipes/<task> --variant tiny` with a few steps: every stage trains on the task's
    rows (jigsaw: three images per prompt), is evaluated on the committed test items, and the summary holds the
    task's metrics and its chance rows (uniform, majority class)."""
    from mirage_rl.data.build import BuildDataArguments, build_dataset
    from mirage_rl.tasks.jigsaw.pieces import read_manifest

    photos = vsp_dir.parent / "photos"
    if task == "jigsaw" and not (photos / "manifest.jsonl").is_file():
        pytest.skip(f"photos not found at {photos}")
    data = tmp_path / "data"
    build_dataset(BuildDataArguments(source="task", task=task, num_generated=12, prompt="short", max_side=160,
                                     test_dir=str(vsp_dir / "maze_planning"), photos_dir=str(photos),
                                     generated_sizes=[3, 4], output_dir=str(data)))
    out = tmp_path / "recipes"
    ev = short_copy(RECIPES.parent / task, out, tiny_dir, data, {"stage1": 2, "stage2": 2, "grpo": 1},
                    dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=10),
                    dict(benchmark_dir=str(photos if task == "jigsaw" else vsp_dir / "maze_planning"), limit=4,
                         max_new_tokens=8))
    assert ev["task"] == task and ev["items_file"].startswith("data/")
    root = tmp_path / "run"
    assert main(["pipeline", "--recipe_dir", str(out), "--variant", "tiny", "--output_root", str(root)]) == 0
    summary = json.loads((root / "pipeline_summary.json").read_text())
    assert [r["stage"] for r in summary["stages"]] == ["stage1", "stage2", "grpo"]
    assert all(r["task"] == task and r["n"] == 4 and 0 <= r["accuracy"] <= 1 for r in summary["stages"])
    assert summary["chance"]["baselines"] == ["uniform", "majority_class"]
    md = (root / "pipeline_summary.md").read_text()
    assert f"({task})" in md and "| *chance: uniform* | - |" in md and "| all | all: invalid |" in md
    report = json.loads((root / "grpo" / "eval" / "report.json").read_text())
    assert report["task"] == task and "confusion" in report
    if task == "jigsaw":
        assert {p.file for p in read_manifest(photos) if p.split == "train"} >= set(
            __import__("datasets").load_from_disk(str(data))["train"]["photo"])
