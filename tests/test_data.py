import json

import numpy as np
import pytest
from PIL import Image

from mirage_rl.data import jsonl
from mirage_rl.tasks.vsp_planning import maps as vsp_maps
from mirage_rl.data import messages
from mirage_rl.tasks.vsp_planning import prompts
from mirage_rl.tasks.vsp_planning.scoring import replay


def test_prompts_match_published(vsp_dir):
    train = jsonl.read_jsonl(vsp_dir / "mirage_train_maps.jsonl")
    test = jsonl.read_jsonl(vsp_dir / "mirage_test_maps.jsonl")
    assert {r["text_input"] for r in train} == {prompts.TRAIN_PROMPT}
    assert {r["text_input"] for r in test} == {prompts.TEST_PROMPT}


def test_loader_matches_mirage_test_split(vsp_dir):
    maps = vsp_maps.load_benchmark(vsp_dir / "maze_planning")
    assert len(maps) == 400 and {m.level for m in maps} == {3, 4, 5, 6}
    published = {(r["level"], str(r["map_id"])): r["map_desc"] for r in jsonl.read_jsonl(vsp_dir / "mirage_test_maps.jsonl")}
    assert {(m.level, m.map_id): m.map_desc for m in maps} == published


def test_render_reproduces_every_published_test_image(vsp_dir):
    maps = vsp_maps.load_benchmark(vsp_dir / "maze_planning")
    for m in maps:
        ref = np.asarray(Image.open(m.image_path).convert("RGB"))
        out = np.asarray(vsp_maps.render_map(m.map_desc))
        assert out.shape == ref.shape, m.image_path
        assert np.array_equal(out, ref), f"{m.image_path}: {(out != ref).any(-1).sum()} pixels differ"


def test_helper_image_draws_red_path_only():
    desc = [[1, 0, 0], [0, 0, 0], [0, 0, 2]]
    plan = vsp_maps.shortest_plan(desc)
    assert len(plan) == 4 and replay(desc, plan)[1]
    base = np.asarray(vsp_maps.render_map(desc)).astype(int)
    helper = np.asarray(vsp_maps.render_helper(desc, plan)).astype(int)
    changed = (base != helper).any(-1)
    assert changed.sum() > 500
    assert (helper[changed] == vsp_maps.ARROW_RGB).all()


def test_generator_is_seeded_solvable_and_distinct():
    a = vsp_maps.generate_maps(50, sizes=[3, 5, 8], seed=3)
    b = vsp_maps.generate_maps(50, sizes=[3, 5, 8], seed=3)
    assert a == b
    assert len({vsp_maps.map_key(m) for m in a}) == 50
    for m in a:
        vsp_maps.validate_map(m)
        assert len(m) in (3, 5, 8)
        plan = vsp_maps.shortest_plan(m)
        assert plan is not None and replay(m, plan) == (True, True)


def test_shortest_plan_is_shortest_on_mirage_train(vsp_dir):
    for r in jsonl.read_jsonl(vsp_dir / "mirage_train_maps.jsonl")[:200]:
        from mirage_rl.tasks.vsp_planning.scoring import parse_plan

        assert len(vsp_maps.shortest_plan(r["map_desc"])) == len(parse_plan(r["text_output"]))


def test_builder_removes_test_overlap(small_rows, vsp_dir):
    test_keys = {vsp_maps.map_key(m.map_desc) for m in vsp_maps.load_benchmark(vsp_dir / "maze_planning")}
    train = jsonl.read_jsonl(vsp_dir / "mirage_train_maps.jsonl")
    leaked = [r for r in train if vsp_maps.map_key(r["map_desc"]) in test_keys]
    assert len(leaked) == 7  # the published Mirage split leaks 7 test maps
    assert not any(vsp_maps.map_key(m) in test_keys for m in small_rows["map_desc"])
    row = small_rows[0]
    assert set(row) >= {"prompt", "image", "helper_image", "answer", "solution", "map_desc", "level"}
    assert row["answer"] == messages.LATENT_MARKER + row["solution"]
    assert row["answer"].index(messages.LATENT_MARKER) < row["answer"].index("\\boxed{")
    assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(vsp_maps.render_map(row["map_desc"])))


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"a": 1}) + "\n{not json\n")
    import pytest

    with pytest.raises(ValueError, match=r"x.jsonl:2: not valid JSON"):
        jsonl.read_jsonl(p)


def test_describe_task_short_prompt_and_level_filter(tmp_path, vsp_dir):
    from datasets import load_from_disk

    from mirage_rl.data.build import BuildDataArguments, build_task_dataset

    out = tmp_path / "describe"
    _, counts = build_task_dataset(BuildDataArguments(
        output_dir=str(out), train_jsonl=str(vsp_dir / "mirage_train_maps.jsonl"), test_dir=str(vsp_dir / "maze_planning"),
        max_train_maps=60, train_levels=[3], num_generated=3, generated_sizes=[4], task="describe", prompt="short"))
    rows = load_from_disk(str(out))["train"]
    levels = [r["level"] for r in jsonl.read_jsonl(vsp_dir / "mirage_train_maps.jsonl")[:60]]
    assert counts["removed_other_levels"] == sum(lv != 3 for lv in levels)
    assert sorted(set(rows["level"])) == [3, 4] and rows["source"].count("generated") == 3
    for r in rows:
        assert r["prompt"] == messages.to_messages(prompts.DESCRIBE_PROMPT)
        table = [line.split(" ") for line in r["answer"].split("\n")]
        assert [[vsp_maps.TABLE_SYMBOLS[c] for c in row] for row in table] == r["map_desc"]
    plan_rows = tmp_path / "plan"
    build_task_dataset(BuildDataArguments(output_dir=str(plan_rows), train_jsonl=str(vsp_dir / "mirage_train_maps.jsonl"),
                                         test_dir=str(vsp_dir / "maze_planning"), max_train_maps=5, prompt="short"))
    r = load_from_disk(str(plan_rows))["train"][0]
    assert r["prompt"] == messages.to_messages(prompts.SHORT_PROMPT) and r["answer"].startswith(messages.LATENT_MARKER)
    with pytest.raises(ValueError, match="task must be one of"):
        BuildDataArguments(task="caption")
    with pytest.raises(ValueError, match="prompt must be one of"):
        BuildDataArguments(prompt="long")
