"""`mirage-rl results`: the plan of the comparison, resumable execution, chance levels and the generated report."""

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import yaml

from mirage_rl import results
from mirage_rl.tasks.vsp_planning import maps as vsp_maps
from mirage_rl.evaluation import summarize
from mirage_rl.recipe import parse
from mirage_rl.tasks import get_task
from mirage_rl.tasks.vsp_planning.scoring import parse_plan, replay, score_plan

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "recipes/vsp_spatial_planning/results_small.yaml"


def args_for(tmp_path, **kw):
    (a,) = parse((results.ResultsArguments,), ["--config", str(CONFIG)])
    a.recipe_dir = str(REPO / "recipes/vsp_spatial_planning")
    a.data_config = str(REPO / a.data_config)
    a.alt_data_config = str(REPO / a.alt_data_config)
    a.focus_levels = None  # the training set's levels (the shipped config names 3-4)
    a.report_block = None  # the unnamed block (results.BEGIN / END); named blocks: tests/test_results_arms.py
    a.base_config = str(tmp_path / "base.yaml")  # the shipped base config, its cache in tmp_path
    base = yaml.safe_load((REPO / "recipes/vsp_spatial_planning/base_small.yaml").read_text())
    base = {k: str(REPO / v) if k.endswith("_config") else v for k, v in base.items()}
    Path(a.base_config).write_text(yaml.safe_dump({**base, "cache_dir": str(tmp_path / "base")}))
    a.output_root, a.report, a.figure = str(tmp_path / "runs"), str(tmp_path / "RESULTS.md"), str(tmp_path / "fig.png")
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def test_plan_shares_runs_and_chains_each_arm(tmp_path, vsp_dir):  # the base step's key hashes the VSP data
    a = args_for(tmp_path, seeds=[0, 1])
    steps = {s.key: s for s in results.plan(a)}
    # stage 1 is shared by Mirage, dummy latents and Mirage + GRPO: once per seed
    assert [k for k in steps if k.endswith("/stage1")] == ["seed0/stage1", "seed1/stage1"]
    assert steps["seed1/stage2"].needs == ["data/plan", "seed1/stage1"]
    assert steps["seed0/dummy_latent"].needs[-1] == "seed0/stage1"
    assert steps["seed0/grpo"].argv[0] == "grpo" and steps["seed0/grpo"].needs[-1] == "seed0/stage2"
    assert steps["seed0/direct_sft"].needs[-1] == "base"
    # one base for every arm and seed: the cached seeing base of base-model (its perception measured when built)
    base = steps["base"]
    assert base.argv == ["base-model", "--config", a.base_config] and base.needs == []
    assert Path(base.done_file).parent.name.startswith("seeing-tiny-") and base.done_file.endswith("base.json")
    start = steps["seed0/stage1"].argv[steps["seed0/stage1"].argv.index("--model_name_or_path") + 1]
    assert start == str(Path(base.done_file).parent)
    # every run gets its seed, every arm one evaluation per seed
    assert all(s.argv[s.argv.index("--seed") + 1] == k[4] for k, s in steps.items() if k.startswith("seed") and "eval_" not in k)
    assert sum(k.startswith("seed") and "/eval_" in k for k in steps) == sum(len(results.arm_seeds(a, x)) for x in a.arms)
    assert a.one_seed_arms == ["mirage_alt_helper", "mirage_grid"]  # the screened target variants: seed 0 only
    assert all(results.arm_seeds(a, x) == [a.seeds[0]] for x in a.one_seed_arms) and results.arm_seeds(a, "mirage") == a.seeds
    # each step appears after what it needs
    order = list(steps)
    assert all(order.index(n) < order.index(k) for k, s in steps.items() for n in s.needs)


def test_plan_of_a_subset_and_missing_recipe(tmp_path, vsp_dir):
    a = args_for(tmp_path, arms=["dummy_latent"], seeds=[3])
    keys = [s.key for s in results.plan(a)]
    assert [k for k in keys if k.startswith("seed")] == ["seed3/stage1", "seed3/dummy_latent", "seed3/eval_dummy_latent"]
    a = args_for(tmp_path, variant="nosuch")
    with pytest.raises(FileNotFoundError, match="direct_sft_nosuch.yaml"):
        results.plan(a)
    with pytest.raises(ValueError, match="unknown"):
        results.ResultsArguments(arms=["mirage", "magic"])


def test_execute_records_resumes_and_reports_failures(tmp_path):
    a = args_for(tmp_path, jobs=2)
    out = tmp_path / "runs"
    steps = [results.Step("base/model", ["create-model", "--output_dir", str(out / "m"), "--hidden_size", "32"], [],
                          str(out / "m" / "model.safetensors")),
             results.Step("seed0/copy", ["create-model", "--output_dir", str(out / "m2"), "--hidden_size", "32"],
                          ["base/model"], str(out / "m2" / "model.safetensors"))]
    log = results.execute(a, steps)
    assert set(log.steps) == {"base/model", "seed0/copy"} and all(s["wall_s"] > 0 for s in log.steps.values())
    assert json.loads((out / "steps.json").read_text()) == log.steps
    stamp = (out / "m2" / "model.safetensors").stat().st_mtime_ns
    results.execute(a, steps)  # finished steps are not rerun
    assert (out / "m2" / "model.safetensors").stat().st_mtime_ns == stamp
    bad = [results.Step("seed0/bad", ["sft", "--config", str(tmp_path / "missing.yaml")], [], str(tmp_path / "never"))]
    with pytest.raises(RuntimeError, match="seed0/bad failed.*\n.*log: .*seed0__bad.log"):
        results.execute(a, bad)


def test_binomial_tail():
    assert results.binomial_tail(0, 10, 0.3) == pytest.approx(1.0)
    assert results.binomial_tail(10, 10, 0.3) == pytest.approx(0.3 ** 10)
    assert results.binomial_tail(3, 5, 0.5) == pytest.approx((10 + 5 + 1) / 32)


def test_blind_baselines_from_training_answers(small_dataset_dir, vsp_dir):
    chance = get_task("plan").chance_baselines(str(small_dataset_dir), str(vsp_dir / "maze_planning"), levels=[3, 4])
    assert set(chance) == {"3", "4"} and chance["3"]["from_levels"] == "3"
    from datasets import load_from_disk

    rows = load_from_disk(str(small_dataset_dir))["train"].select_columns(["solution", "map_desc", "level"])
    tests = [m.map_desc for m in vsp_maps.load_benchmark(vsp_dir / "maze_planning", [3])]
    plans = Counter(tuple(parse_plan(r["solution"])) for r in rows if r["level"] == 3)
    # brute force: the expected accuracy of a plan drawn from the level-3 training answers
    expected = sum(c * sum(replay(m, list(p))[0] for m in tests) / len(tests) for p, c in plans.items()) / sum(plans.values())
    assert chance["3"]["random_plan"]["accuracy"] == pytest.approx(expected)
    best = chance["3"]["best_blind_plan"]
    assert tuple(best["plan"].split(",")) in plans
    assert best["accuracy"] == pytest.approx(sum(replay(m, best["plan"].split(","))[0] for m in tests) / len(tests))
    assert 0 <= best["accuracy_strict"] <= best["accuracy"] <= 1


def fake_report(maps, rng, skill):
    """A report made by the real scorer: each map answered with its shortest plan with probability ``skill``, else a
    random plan (or an invalid answer)."""
    samples = []
    for m in maps:
        r = rng.random()
        text = ("\\boxed{" + ", ".join(vsp_maps.shortest_plan(m.map_desc)) + "}" if r < skill
                else "no box" if r > 0.97 else "\\boxed{" + ",".join(rng.choice("LRUD") for _ in range(3)) + "}")
        s = score_plan(m.map_desc, text)
        samples.append({"level": m.level, "verdict": s.verdict, "success": s.success, "success_strict": s.success_strict})
    return summarize(samples, "vsp")


def test_report_tables_figure_and_kept_text(tmp_path, small_dataset_dir, vsp_dir):
    a = args_for(tmp_path, seeds=[0, 1], arms=["direct_sft", "mirage"], benchmark_dir=str(vsp_dir / "maze_planning"))
    a.data_config = str(tmp_path / "data.yaml")
    Path(a.data_config).write_text(f"output_dir: {small_dataset_dir}\n")
    maps = vsp_maps.load_benchmark(vsp_dir / "maze_planning")
    rng = random.Random(0)
    log = results.StepLog(Path(a.output_root) / "steps.json")
    skills = {"direct_sft": [0.5, 0.6], "stage2": [0.7, 0.2]}
    for run, sk in skills.items():
        for seed, skill in enumerate(sk):
            out = Path(a.output_root) / f"seed{seed}" / run / "eval"
            out.mkdir(parents=True)
            (out / "report.json").write_text(json.dumps(fake_report(maps, rng, skill)))
            for key in (f"seed{seed}/{run}", f"seed{seed}/stage1"):
                log.record(results.Step(key, ["sft", "--seed", str(seed)], [], ""), 60.0, 1)
    Path(a.report).write_text(f"# Results\n\nintro kept\n\n{results.BEGIN}\nold\n{results.END}\n\nreading kept\n")
    per = results.base_path(a) / "eval_describe"
    per.mkdir(parents=True)
    per_rows = [{"level": m.level, "table_exact": i % 2 == 0, "cells_right": 3, "n_cells": 4, "player_found": True,
                 "goal_found": i % 4 == 0} for i, m in enumerate(maps)]
    (per / "report.json").write_text(json.dumps(summarize(per_rows, "vsp", "describe")))
    res = results.write_report(a, log)
    text = Path(a.report).read_text()
    assert text.startswith("# Results\n\nintro kept\n") and text.rstrip().endswith("reading kept") and "\nold\n" not in text
    assert Path(a.figure).stat().st_size > 10_000
    # the table cell is the mean ± std of the per-seed reports
    reps = [json.loads((Path(a.output_root) / f"seed{s}/direct_sft/eval/report.json").read_text()) for s in (0, 1)]
    vals = [r["by_level"]["3"]["accuracy"] for r in reps]
    m, sd = sum(vals) / 2, math.sqrt((vals[0] - vals[1]) ** 2 / 2)
    row = next(line for line in text.splitlines() if line.startswith("| Direct SFT | 2 |"))
    assert row.split(" | ")[2] == f"{m:.3f} ± {sd:.3f}"
    # the paired difference and the per-seed p-values are computed, the wall time sums the arm's runs
    assert "Mirage (stage 1 -> 2) minus Direct SFT" in text
    assert "| 4 | 100 | 0.50 | 0.75 | 1.00 | 0.25 |" in text  # the base model's perception table
    seed0 = res["arms"]["direct_sft"]["seeds"]["0"]
    # the headline levels default to the training set's (levels 3-6 in this small set); skill 0.5 is far above chance
    assert res["focus_levels"] == ["3", "4", "5", "6"] and "| arm | seeds | level 3 | level 4 | level 5 | level 6 | levels 3-6 |" in text
    assert seed0["focus_n"] == 400 and 0 <= seed0["focus_p_value"] < 1e-6
    a.focus_levels = [3, 4]
    assert results.write_report(a, log)["arms"]["direct_sft"]["seeds"]["0"]["focus_n"] == 200
    assert "levels 3-4" in Path(a.report).read_text()
    assert res["arms"]["mirage"]["seeds"]["0"]["wall_s"] == 120.0
    assert json.loads((Path(a.output_root) / "results.json").read_text())["arms"]["mirage"]["label"].startswith("Mirage")
    # a report without the markers is refused, naming the file
    Path(a.report).write_text("# Results\n")
    with pytest.raises(ValueError, match="RESULTS.md: no generated block"):
        results.write_report(a, log)


def test_the_report_of_a_choice_task_uses_its_metric_and_chance_levels(tmp_path, vsp_dir):
    """`mirage-rl results` on VSP spatial reasoning (the eval recipe's task): one accuracy table with the uniform and
    majority-class chance rows, the headline over the training set's levels, the p-value against uniform choice."""
    from mirage_rl.data.build import BuildDataArguments, build_dataset

    data = tmp_path / "data"
    build_dataset(BuildDataArguments(source="task", task="vsp_spatial_reasoning", num_generated=9, prompt="short",
                                     generated_sizes=[3, 4], test_dir=str(vsp_dir / "maze_planning"), output_dir=str(data)))
    a = args_for(tmp_path, seeds=[0], arms=["direct_sft", "mirage"], benchmark_dir=str(vsp_dir / "maze_planning"),
                 recipe_dir=str(REPO / "recipes/vsp_spatial_reasoning"), variant="demo")
    a.data_config = str(tmp_path / "data.yaml")
    Path(a.data_config).write_text(f"output_dir: {data}\n")
    task = get_task("vsp_spatial_reasoning")
    items = task.load_benchmark(str(vsp_dir / "maze_planning"))
    rng = random.Random(0)
    log = results.StepLog(Path(a.output_root) / "steps.json")
    for run, skill in (("direct_sft", 0.9), ("stage2", 0.3)):
        samples = [{"level": it.level, **task.score(it, "\\boxed{" + (it.answer if rng.random() < skill else "A") + "}")}
                   for it in items]
        out = Path(a.output_root) / "seed0" / run / "eval"
        out.mkdir(parents=True)
        (out / "report.json").write_text(json.dumps(summarize(samples, "vsp", "vsp_spatial_reasoning")))
    Path(a.report).write_text(f"# Results\n\n{results.BEGIN}\n{results.END}\n")
    res = results.write_report(a, log)
    text = Path(a.report).read_text()
    assert res["task"] == "vsp_spatial_reasoning" and res["rates"] == ["accuracy"] and res["focus_levels"] == ["3", "4"]
    assert "### Accuracy, accuracy: mean ± std over seeds" in text and "strict" not in text
    assert "| *chance: uniform choice* | - | 0.333 |" in text and "*chance: majority class of the level's training rows*" in text
    assert "400 test items of task vsp_spatial_reasoning" in text and "levels 3-4" in text
    assert res["arms"]["direct_sft"]["seeds"]["0"]["focus_p_value"] < 1e-6  # 0.9 skill against 1/3
