"""The task interface (issue 18): the registry, the VSP tasks behind it on the real maps, the one table writer and the
one recipe naming rule."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mirage_rl.recipe import recipe_path
from mirage_rl.tables import markdown_table
from mirage_rl.tasks import Task, get_task, task_names

REPO = Path(__file__).resolve().parents[1]


def test_registry_names_the_tasks_and_refuses_an_unknown_one():
    assert task_names() == ("plan", "describe", "vsp_spatial_reasoning", "jigsaw", "sat", "comt")
    assert all(get_task(name).name == name for name in task_names())
    with pytest.raises(ValueError, match=r"unknown task 'maze'; known: \['plan', 'describe', 'vsp_spatial_reasoning', "):
        get_task("maze")


def test_a_task_without_an_implementation_says_which_part_is_missing():
    class Bare(Task):
        name = "bare"
        prompts = {"test": "<image> answer?"}

    t = Bare()
    assert t.prompt("test") == "<image> answer?"
    with pytest.raises(ValueError, match=r"prompt must be one of \['test'\] for task 'bare', got 'train'"):
        t.prompt("train")
    for call in (lambda: t.score(None, ""), lambda: t.chance_baselines("d", "b"), lambda: t.build_rows(None, None)):
        with pytest.raises(NotImplementedError, match="task 'bare'"):
            call()


def test_plan_task_on_the_real_maps(vsp_dir):
    task = get_task("plan")
    items = task.load_benchmark(vsp_dir / "maze_planning", [3])
    assert len(items) == 100 and {i.level for i in items} == {3} and items[0].prompt_id.startswith("level3/")
    from mirage_rl.tasks.vsp_planning.maps import shortest_plan

    plan = shortest_plan(items[0].map_desc)
    words = {"L": "LEFT", "R": "RIGHT", "U": "UP", "D": "DOWN"}
    right = "\\boxed{" + ", ".join(words[m] for m in plan) + "}"
    assert task.parse_answer(right) == plan and task.parse_answer("no box") is None
    scored = [task.score(items[0], right), task.score(items[0], "\\boxed{L R}"), task.score(items[0], "nothing")]
    assert [s["verdict"] for s in scored] == ["success", "invalid", "invalid"] and scored[0]["success_strict"]
    summary = task.summarize(scored)
    assert summary == {"n": 3, "accuracy": 1 / 3, "accuracy_strict": 1 / 3, "invalid_rate": 2 / 3}
    assert [k for k, _ in task.metrics] == ["accuracy", "accuracy_strict", "invalid_rate"]
    helper = np.asarray(task.helper_image(items[0].map_desc, plan))
    plain = np.asarray(get_task("describe").helper_image(items[0].map_desc, None))
    assert helper.shape == plain.shape and (helper != plain).any()  # the path is drawn on the map
    assert task.has_latent_block and task.prompt("test") != task.prompt("short")


def test_describe_task_scores_tables_and_keeps_one_prompt(vsp_dir):
    task = get_task("describe")
    item = task.load_benchmark(vsp_dir / "maze_planning", [4])[0]
    from mirage_rl.tasks.vsp_planning.maps import map_to_text

    exact, empty = task.score(item, map_to_text(item.map_desc)), task.score(item, "")
    assert exact["table_exact"] and exact["cells_right"] == 16 and not empty["table_exact"]
    assert task.summarize([exact, empty])["cell_accuracy"] == 0.5
    assert not task.has_latent_block and len(set(task.prompts.values())) == 1
    with pytest.raises(NotImplementedError, match="describe"):
        task.chance_baselines("d", "b")


def test_importing_the_plan_scorer_pulls_in_no_torch():
    code = ("import sys; from mirage_rl.tasks import get_task; get_task('plan'); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_markdown_table_formats_cells_and_refuses_ragged_rows():
    out = markdown_table(["arm", "acc", "n"], [["a", 0.12345, 3], ["b", float("nan"), None]])
    assert out.splitlines() == ["| arm | acc | n |", "|---|---|---|", "| a | 0.123 | 3 |", "| b | - | - |"]
    with pytest.raises(ValueError, match="has 2 cells for 3 columns"):
        markdown_table(["arm", "acc", "n"], [["a", 1.0]])


def test_recipes_follow_one_naming_rule_and_a_missing_one_lists_the_variants():
    folder = REPO / "recipes/vsp_spatial_planning"
    assert recipe_path(folder, "stage1", "tiny") == folder / "stage1_tiny.yaml"
    assert recipe_path(folder, "direct_sft_grpo", "small").is_file()
    assert not list(folder.glob("small_*.yaml"))  # the old prefix rule is gone
    # direct_sft's variants are not confused with direct_sft_grpo's
    with pytest.raises(FileNotFoundError, match=r"direct_sft_huge\.yaml.*variants in .*: \['demo', 'demo_qwen3_vl', 'qwen2.5_vl_7b', 'qwen3_vl_8b', 'small', 'tiny'\]"):
        recipe_path(folder, "direct_sft", "huge")
