"""The arms of RESULTS' second edition (issue 21, section 4): the input upper bound (the helper image as a second
input image, trained and evaluated), the filled helper image of VSP planning, and the plan / report of the new arms
(interventions per latent arm, geometry, two comparisons in one page)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mirage_rl import results
from mirage_rl.collator import LatentCollator
from mirage_rl.data.messages import to_messages, with_helper_input
from mirage_rl.evaluation import summarize
from mirage_rl.modeling import LatentTokens
from mirage_rl.recipe import parse
from mirage_rl.tasks import get_task
from mirage_rl.tasks.vsp_planning import maps as vsp_maps
from mirage_rl.tasks.vsp_planning.scoring import MOVES, parse_plan, replay, score_plan

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ the input upper bound
def test_with_helper_input_puts_one_image_part_after_the_first():
    prompt = to_messages("<image> then <image> and text", 2)
    out = with_helper_input(prompt)
    types = [p["type"] for p in out[0]["content"]]
    assert types == ["image", "image", "text", "image", "text"] and [p["type"] for p in prompt[0]["content"]] == [
        "image", "text", "image", "text"]  # the input is not modified
    with pytest.raises(ValueError, match="no image"):
        with_helper_input([{"role": "user", "content": [{"type": "text", "text": "x"}]}])


def test_helper_as_input_feeds_the_helper_image_as_the_second_image(tiny, small_rows):
    model, processor = tiny
    row = dict(small_rows[0])
    plain = LatentCollator(processor, None, "none")([row])
    both = LatentCollator(processor, None, "none", helper_as_input=True)([row])
    # two images: twice the visual tokens, the helper's pixels second, the same answer tokens learned
    assert int(both["mm_token_type_ids"].sum()) == 2 * int(plain["mm_token_type_ids"].sum())
    helper = LatentCollator(processor, None, "none")([{**row, "image": row["helper_image"]}])
    n = plain["pixel_values"].shape[0]
    assert torch.equal(both["pixel_values"][:n], plain["pixel_values"])
    assert torch.equal(both["pixel_values"][n:], helper["pixel_values"])
    text = processor.tokenizer.decode(both["input_ids"][0][both["labels"][0] != -100])
    assert text == processor.tokenizer.decode(plain["input_ids"][0][plain["labels"][0] != -100])
    assert not (both["input_ids"] == LatentTokens.from_config(model.config).start).any()
    with pytest.raises(ValueError, match="helper_as_input .* needs latent_mode 'none'"):
        LatentCollator(processor, LatentTokens.from_config(model.config), "hidden", helper_as_input=True)
    with pytest.raises(ValueError, match=r"row 0 \(map_id=.*\): helper_as_input needs the row's 'helper_image'"):
        LatentCollator(processor, None, "none", helper_as_input=True)([{**row, "helper_image": None}])


def test_helper_as_input_settings_are_checked():
    from mirage_rl.evaluation import EvalArguments
    from mirage_rl.trainers import MirageSFTConfig

    with pytest.raises(ValueError, match="helper_as_input"):
        MirageSFTConfig(output_dir="/tmp/x", latent_mode="hidden", helper_as_input=True, use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="helper_as_input"):
        EvalArguments(model="m", helper_as_input=True, latent_mode="hidden")


def test_eval_with_helper_as_input_shows_each_item_its_own_helper(tiny_dir, vsp_dir, tmp_path):
    """The evaluation rows of the input upper bound: each item's prompt gets its helper image (``oracle_image``) as
    the second image, the same layout the training collator builds; the report says so."""
    from mirage_rl.evaluation import EvalArguments, evaluate, prompt_rows

    task = get_task("plan")
    items = task.load_benchmark(str(vsp_dir / "maze_planning"), [3])[:2]
    args = EvalArguments(model=str(tiny_dir), benchmark_dir=str(vsp_dir / "maze_planning"), helper_as_input=True,
                         prompt="short", latent_mode="none", levels=[3], limit=3, batch_size=2, max_new_tokens=4,
                         output_dir=str(tmp_path / "e"))
    rows = prompt_rows(task, items, args)
    for row, it in zip(rows, items):
        assert np.array_equal(np.asarray(row["helper_image"]), np.asarray(task.oracle_image(it)))
    report = evaluate(args)
    assert report["n"] == 3 and report["helper_as_input"] == "default" and report["latent_mode"] == "none"


# ------------------------------------------------------------------------------------------- the filled helper image
def test_filled_helper_fills_the_path_cells_and_nothing_else():
    desc = [[1, 0, 0], [0, 0, 0], [0, 0, 2]]
    plan = vsp_maps.shortest_plan(desc)
    assert replay(desc, plan)[1]
    base = np.asarray(vsp_maps.render_map(desc)).astype(int)
    filled = np.asarray(vsp_maps.render_helper(desc, plan, "filled")).astype(int)
    changed = (base != filled).any(-1)
    cell = vsp_maps.CELL_PX
    r, c = 0, 0
    path = set()
    for move in plan:
        dr, dc = MOVES[move]
        r, c = r + dr, c + dc
        path.add((r, c))
    for rr in range(3):
        for cc in range(3):
            inside = changed[rr * cell + 6: (rr + 1) * cell - 6, cc * cell + 6: (cc + 1) * cell - 6]
            assert inside.all() if (rr, cc) in path else not inside.any(), (rr, cc)
    # pixels move 0.6 of the way towards red: the red channel never falls, green and blue do
    assert (filled[changed][:, 0] >= base[changed][:, 0]).all() and (filled[changed][:, 1] < base[changed][:, 1]).all()
    with pytest.raises(ValueError, match="helper must be one of"):
        vsp_maps.render_helper(desc, plan, "thick")


def test_build_data_draws_the_filled_helper(tmp_path, vsp_dir):
    from datasets import load_from_disk

    from mirage_rl.data.build import BuildDataArguments, build_task_dataset

    kw = dict(train_jsonl=str(vsp_dir / "mirage_train_maps.jsonl"), test_dir=str(vsp_dir / "maze_planning"),
              max_train_maps=3, num_generated=2, seed=1)
    build_task_dataset(BuildDataArguments(output_dir=str(tmp_path / "f"), helper="filled", **kw))
    rows = load_from_disk(str(tmp_path / "f"))["train"]
    for row in rows:
        plan = parse_plan(row["solution"])
        want = vsp_maps.render_helper(row["map_desc"], plan, "filled")
        assert np.array_equal(np.asarray(row["helper_image"]), np.asarray(want))
    with pytest.raises(ValueError, match=r"helper: task plan draws \['arrows', 'filled'\], got 'thick'"):
        build_task_dataset(BuildDataArguments(output_dir=str(tmp_path / "g"), helper="thick", **kw))


# ------------------------------------------------------------------------------------------- the plan and the report
def args_for(tmp_path, config="recipes/vsp_spatial_planning/results_small.yaml", **kw):
    (a,) = parse((results.ResultsArguments,), ["--config", str(REPO / config)])
    a.recipe_dir = str(REPO / a.recipe_dir)
    for key in ("data_config", "alt_data_config", "base_config"):
        if getattr(a, key):
            setattr(a, key, str(REPO / getattr(a, key)))
    a.output_root, a.report, a.figure = str(tmp_path / "runs"), str(tmp_path / "RESULTS.md"), str(tmp_path / "fig.png")
    a.figure_interventions = str(tmp_path / "fig_iv.png")
    for k, v in kw.items():
        setattr(a, k, v)
    return a


@pytest.mark.parametrize("config", ["recipes/vsp_spatial_planning/results_small.yaml",
                                    "recipes/vsp_spatial_reasoning/results_small.yaml"])
def test_the_plans_of_both_comparisons(tmp_path, config):
    a = args_for(tmp_path, config)
    steps = {s.key: s for s in results.plan(a, base=tmp_path / "base")}
    for seed in a.seeds:
        for arm in a.arms:
            key = f"seed{seed}/eval_{results.ARMS[arm][1]}"
            assert (key in steps) == (seed in results.arm_seeds(a, arm)), key
    # every run's recipe exists and parses; the alternative helper trains on its own rows
    alt = results.plan.__globals__["dataset_dir"](a.alt_data_config)
    for key, s in steps.items():
        if "--dataset_path" in s.argv:
            data = s.argv[s.argv.index("--dataset_path") + 1]
            assert (data == alt) == ("alt_helper" in key), key
            assert s.needs[0] == ("data/alt_helper" if "alt_helper" in key else "data/plan")
    # the latent arms are evaluated with every intervention and the oracle of their own stage 1
    ev = steps["seed0/eval_stage2"].argv
    assert ev[ev.index("--latent_intervention") + 1: ev.index("--latent_intervention") + 9] == [
        "none", "zero", "noise", "mean", "swap", "oracle", "pad", "skip"]
    assert ev[ev.index("--oracle_helper") + 1] == a.helper
    alt_ev = steps["seed0/eval_stage2_alt_helper"].argv
    assert alt_ev[alt_ev.index("--oracle_helper") + 1] == a.alt_helper
    up = steps["seed0/eval_input_upper_bound"].argv
    assert up[up.index("--helper_as_input") + 1] == "true" and "--latent_intervention" not in up
    assert "--latent_intervention" not in steps["seed0/eval_dummy_latent"].argv
    if "mirage_residual" in a.arms:
        res_ev = steps["seed0/eval_stage2_residual"].argv
        assert res_ev[res_ev.index("--oracle_target") + 1] == "residual"
    if "mirage_grid" in a.arms:  # grid targets: the oracle pools on the grid, k as the stage-1 recipe sets it
        grid_ev = steps["seed0/eval_stage2_grid"].argv
        assert grid_ev[grid_ev.index("--oracle_compress") + 1] == "grid"
        assert "--oracle_compress" not in steps["seed0/eval_stage2"].argv
    # the recipes: upper bound with helper_as_input, budget-matched steps = stage 2 + 0.1 x stage 1
    from mirage_rl.recipe import load_recipe, recipe_path

    def steps_of(run):
        return load_recipe(recipe_path(a.recipe_dir, run, a.variant))["max_steps"]

    assert steps_of("direct_sft_matched") == steps_of("stage2") + steps_of("stage1") // 10
    assert load_recipe(recipe_path(a.recipe_dir, "input_upper_bound", a.variant))["helper_as_input"] is True
    if "mirage_grid" in a.arms:
        g1, g2 = (load_recipe(recipe_path(a.recipe_dir, r, a.variant)) for r in ("stage1_grid", "stage2_grid"))
        assert g1["compress"] == "grid" and g1["set_latent_size"] is True
        assert g1["latent_size"] == g2["latent_size"] > load_recipe(recipe_path(a.recipe_dir, "stage1", a.variant))["latent_size"]
    if "mirage_grpo_strict" in a.arms:
        kw = load_recipe(recipe_path(a.recipe_dir, "grpo_strict", a.variant))["reward_kwargs"]
        assert kw["plan_success_reward"]["rule"] == "strict"


def test_arguments_refuse_what_cannot_run():
    with pytest.raises(ValueError, match="one_seed_arms"):
        results.ResultsArguments(arms=["mirage"], one_seed_arms=["direct_sft"])
    with pytest.raises(ValueError, match="mirage_alt_helper needs alt_data_config"):
        results.ResultsArguments(arms=["mirage_alt_helper"], alt_data_config=None)
    with pytest.raises(ValueError, match="unknown"):
        results.ResultsArguments(arms=["mirage"], interventions=["zero", "magic"])


def _intervention_eval(out: Path, maps, rng, skills: dict, geometry: dict | None):
    """A fake ``eval --latent_intervention`` folder: per intervention a samples.jsonl of skill ``skills[name]``."""
    reports = {}
    for name, skill in skills.items():
        samples = []
        for m in maps:
            fail = "no plan" if name == "skip" else "\\boxed{L}"  # skip's failures do not parse (invalid)
            text = "\\boxed{" + ",".join(vsp_maps.shortest_plan(m.map_desc)) + "}" if rng.random() < skill else fail
            s = score_plan(m.map_desc, text)
            samples.append({"prompt_id": m.prompt_id, "level": m.level, "intervention": name, "success": s.success,
                            "success_strict": s.success_strict, "verdict": s.verdict})
        (out / "interventions" / name).mkdir(parents=True)
        (out / "interventions" / name / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        reports[name] = summarize(samples, "vsp")
    report = dict(reports["none"])
    report["interventions"] = {n: {"n": r["n"], "accuracy": r["accuracy"]} for n, r in reports.items()}
    report["latent_geometry"] = geometry
    (out / "report.json").write_text(json.dumps(report))
    return reports


def test_report_of_interventions_geometry_and_a_named_block(tmp_path, small_dataset_dir, vsp_dir):
    a = args_for(tmp_path, seeds=[0, 1], arms=["direct_sft", "mirage", "mirage_alt_helper"],
                 one_seed_arms=["mirage_alt_helper"], benchmark_dir=str(vsp_dir / "maze_planning"),
                 base_config=str(tmp_path / "base.yaml"))
    import yaml

    base = yaml.safe_load((REPO / "recipes/vsp_spatial_planning/base_small.yaml").read_text())
    base = {k: str(REPO / v) if k.endswith("_config") else v for k, v in base.items()}
    Path(a.base_config).write_text(yaml.safe_dump({**base, "cache_dir": str(tmp_path / "base")}))
    a.data_config = str(tmp_path / "data.yaml")
    Path(a.data_config).write_text(f"output_dir: {small_dataset_dir}\n")
    maps = vsp_maps.load_benchmark(vsp_dir / "maze_planning")
    rng = random.Random(0)
    log = results.StepLog(Path(a.output_root) / "steps.json")
    geo = {"items": 400, "cos_to_oracle": [0.1, 0.2, 0.3, 0.4], "retrieval_top1": 0.01, "retrieval_chance": 0.0025,
           "collapse": 0.9, "oracle_collapse": 0.95, "oracle_specific_share": 0.1, "nn_same_answer": 0.25,
           "oracle_nn_same_answer": 0.5, "same_answer_chance": 0.125}
    kept = {}
    for seed in (0, 1):
        out = Path(a.output_root) / f"seed{seed}" / "direct_sft" / "eval"
        out.mkdir(parents=True)
        (out / "report.json").write_text(json.dumps(summarize(
            [{"level": m.level, "success": rng.random() < 0.6, "success_strict": False, "verdict": "ok"} for m in maps],
            "vsp")))
        kept[seed] = _intervention_eval(Path(a.output_root) / f"seed{seed}" / "stage2" / "eval", maps, rng,
                                        {"none": 0.7, "zero": 0.7, "skip": 0.05}, geo)
    _intervention_eval(Path(a.output_root) / "seed0" / "stage2_alt_helper" / "eval", maps, rng,
                       {"none": 0.5, "zero": 0.2}, None)
    begin, end = results.markers("vsp_spatial_planning")
    other_begin, other_end = results.markers("vsp_spatial_reasoning")
    Path(a.report).write_text(f"# R\n\n{begin}\nold\n{end}\n\nmiddle kept\n\n{other_begin}\nother kept\n{other_end}\n")
    res = results.write_report(a, log)
    text = Path(a.report).read_text()
    assert "\nold\n" not in text and "middle kept" in text and "\nother kept\n" in text
    # the intervention cell: mean accuracy on levels 3-4 over seeds, mean paired difference, pooled McNemar p
    focus = [str(x) for x in a.focus_levels]
    iv = res["arms"]["mirage"]["seeds"]["0"]["interventions"]
    none0 = [s for s in kept[0]["none"]["by_level"].items() if s[0] in focus]
    assert iv["none"]["n"] == sum(st["n"] for _, st in none0) == 200
    skip = [res["arms"]["mirage"]["seeds"][s]["interventions"]["skip"] for s in ("0", "1")]
    assert all(x["paired"]["diff"] < -0.4 and x["paired"]["mcnemar_p"] < 1e-6 for x in skip)
    row = next(line for line in text.splitlines() if line.startswith("| Mirage (stage 1 -> 2) | 2 |")
               and "p =" in line)
    acc = sum(x["accuracy"] for x in skip) / 2
    diff = sum(x["paired"]["diff"] for x in skip) / 2
    bad = sum(x["invalid_rate"] for x in skip) / 2
    assert bad == 1 - acc and iv["zero"]["invalid_rate"] == 0
    assert f"{acc:.3f} ({diff:+.3f}, p = " in row and f"; {bad:.1%} invalid)" in row
    assert row.count("invalid") == 1  # shown only where answers do not parse
    # the one-seed arm: its label names its helper, one seed, its missing interventions shown as "-"
    alt = next(line for line in text.splitlines() if line.startswith("| Mirage, helper image: filled | 1 |") and "-" in line)
    assert alt.rstrip(" |").endswith("-")
    assert "| Mirage (stage 1 -> 2) | 2 | 0.250 | 0.010 (chance 0.003) | 0.900 | 0.950 | 0.100 | 0.250 / 0.500 (chance 0.125) |" in text
    assert Path(a.figure_interventions).read_bytes()[:4] == b"\x89PNG" and "fig_iv.png" in text
    assert "seed 1 | seeds with p" in text and "not run" in text  # the one-seed arm's other seed


def test_the_report_names_the_commit_of_this_clone():
    """``machine()["commit"]`` is the checked-out commit of the repository holding the package (it read the wrong
    folder once, and every report said ``commit ;``)."""
    head = REPO / ".git" / "HEAD"
    if not head.is_file():
        pytest.skip("not a git clone")
    from mirage_rl.results.machine import git_commit, machine

    assert machine()["commit"] == git_commit(REPO) and len(git_commit(REPO)) == 7
    # each finished step records the commit that ran it, and the report names the steps' commits
    import tempfile

    from mirage_rl.results.plan import Step

    with tempfile.TemporaryDirectory() as d:
        log = results.StepLog(Path(d) / "steps.json")
        log.record(Step("seed0/x", ["sft"], [], str(Path(d) / "done")), 1.0, 1)
        assert results.StepLog(Path(d) / "steps.json").steps["seed0/x"]["commit"] == git_commit(REPO)


def test_elapsed_minutes_spans_the_first_start_to_the_last_end(tmp_path):
    from mirage_rl.results.report import elapsed_minutes

    log = results.StepLog(tmp_path / "steps.json")
    log.steps = {"a": {"finished": "2026-11-26 10:10:00", "wall_s": 600.0},   # started 10:00
                 "b": {"finished": "2026-11-26 10:40:00", "wall_s": 60.0},
                 "c": {"finished": "2026-11-26 10:20:00", "wall_s": 1500.0}}  # started 09:55
    assert elapsed_minutes(log) == 45.0 and elapsed_minutes(results.StepLog(tmp_path / "none.json")) == 0.0
