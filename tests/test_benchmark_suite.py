"""The benchmark suite (issue 20): VSP spatial reasoning and jigsaw on the real data (committed test splits,
rendering, labels against the simulator, split disjointness, adversarial answers), BLINK's schema, SAT/COMT JSONL
items, and multi-image rows through the builder, the collator, evaluation and GRPO."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, scramble
from PIL import Image

from mirage_rl.tasks import get_task
from mirage_rl.tasks.vsp_reasoning import items as r_items
from mirage_rl.tasks.vsp_reasoning import outcomes
from mirage_rl.tasks.vsp_reasoning.prompts import MIRAGE_PROMPT, fill

REPO = Path(__file__).resolve().parents[1]
PHOTOS = SHARED_DATA / "photos"
SAMPLE = SHARED_DATA / "vsp" / "mirage_reasoning_sample"


def require_photos():
    if not (PHOTOS / "manifest.jsonl").is_file():
        pytest.skip(f"photos not found at {PHOTOS} (set MIRAGE_SHARED_DATA to the shared/data folder)")


# ------------------------------------------------------------------------------------ VSP spatial reasoning
def test_the_simulator_follows_vsps_rule():
    m = [[1, 0, -1],
         [0, 0, 0],
         [0, 0, 2]]
    assert outcomes.walk(m, ["D", "D", "R", "R"]).outcome == "A"
    assert outcomes.walk(m, ["D", "D", "R", "R", "U", "U"]).outcome == "A"  # moves after the goal are never played
    assert outcomes.walk(m, ["R", "R"]).outcome == "B" and outcomes.walk(m, ["R", "R", "D"]).cells[-1] == (0, 2)
    assert outcomes.walk(m, ["L", "U", "U"]).outcome == "C"  # off the edge: the player stays, safe, not on the goal
    assert outcomes.walk(m, ["L", "U"]).cells == [(0, 0), (0, 0), (0, 0)]
    assert outcomes.helper_cell(m, ["D", "D", "R", "R"], "partial") == (2, 0)  # after ceil(4 / 2) moves
    assert outcomes.helper_cell(m, ["D", "D", "R", "R", "U"], "outcome") == (2, 2)  # where the episode ended
    assert outcomes.helper_cell(m, ["R"], "partial") == (0, 1)  # at least one move
    with pytest.raises(ValueError, match=r"helper must be one of \('partial', 'outcome'\)"):
        outcomes.helper_cell(m, ["R"], "midway")


def test_the_committed_reasoning_split_regenerates_and_every_label_is_the_simulators(vsp_dir):
    committed = (REPO / r_items.TEST_FILE).read_text()
    rows = [json.loads(line) for line in committed.splitlines()]
    assert r_items.split_text(r_items.make_test_split(str(vsp_dir / "maze_planning"))) == committed
    items = get_task("vsp_spatial_reasoning").load_benchmark(str(vsp_dir / "maze_planning"))
    maps = {(m.level, m.map_id) for m in __import__("mirage_rl.tasks.vsp_planning.maps", fromlist=["x"])
            .load_benchmark(vsp_dir / "maze_planning")}
    assert len(items) == 400 and {(it.level, it.map_id) for it in items} == maps  # one item per test map
    for it, row in zip(items, rows):
        assert outcomes.walk(it.map_desc, it.plan).outcome == it.answer == row["answer"]
        assert 1 <= len(it.plan) <= 2 * len(it.map_desc)
        assert set(row["plan"]) <= {"LEFT", "RIGHT", "UP", "DOWN"}
    for level in (3, 4, 5, 6):
        counts = {c: sum(it.answer == c for it in items if it.level == level) for c in "ABC"}
        assert min(counts.values()) >= 30 and sum(counts.values()) == 100, (level, counts)
    # a tampered label is refused, naming the line
    bad = REPO / "tests" / "_tampered.jsonl"
    try:
        bad.write_text(committed.replace('"answer": "A"', '"answer": "C"', 1))
        with pytest.raises(ValueError, match=r"_tampered\.jsonl:\d+: answer 'C' but the simulator says A"):
            r_items.load_benchmark(str(vsp_dir / "maze_planning"), items_file=str(bad))
    finally:
        bad.unlink()


def test_mirage_prompt_is_the_samples_wording_and_helpers_use_the_map_sprites():
    if not SAMPLE.is_dir():
        pytest.skip(f"Mirage's reasoning sample not found at {SAMPLE}")
    for line in (SAMPLE / "sample.jsonl").read_text().splitlines():
        r = json.loads(line)
        plan = r["text_input"].split("Full Action Plan: ")[1].split("\n")[0]
        assert fill(MIRAGE_PROMPT, plan) == r["text_input"]
    # sample 231 (level 6): the player starts at (5, 3); its helper image shows it at (3, 5) after 6 moves (the last
    # one RIGHT), with the stool left on the start cell. Our drawing of those cells is pixel-identical.
    helper = np.asarray(Image.open(SAMPLE / "images/level_6/231/map_6x6_step_6.png").convert("RGB"))
    m = [[0] * 6 for _ in range(6)]
    m[5][3], m[0][0] = 1, 2
    ours = np.asarray(outcomes.render_state(m, (3, 5), "R"))
    for r, c in ((5, 3), (3, 5), (4, 4)):
        cell = np.s_[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64]
        assert np.array_equal(ours[cell], helper[cell]), (r, c)
    assert not np.array_equal(np.asarray(outcomes.render_state(m, (3, 5), "D"))[192:256, 320:384], helper[192:256, 320:384])


def test_reasoning_training_rows_are_balanced_labelled_and_never_a_test_map(vsp_dir, tmp_path):
    from datasets import load_from_disk

    from mirage_rl.data.build import BuildDataArguments, build_dataset
    from mirage_rl.tasks.vsp_planning.maps import load_benchmark, map_key

    out = tmp_path / "ds"
    build_dataset(BuildDataArguments(source="task", task="vsp_spatial_reasoning", num_generated=30, helper="outcome",
                                     test_dir=str(vsp_dir / "maze_planning"), output_dir=str(out), prompt="short"))
    ds = load_from_disk(str(out))["train"]
    tests = {map_key(m.map_desc) for m in load_benchmark(vsp_dir / "maze_planning")}
    assert [ds[i]["solution"] for i in range(6)] == list("ABCABC")
    for row in ds:
        plan = [outcomes.LETTERS[w] for w in row["plan"]]
        assert map_key(row["map_desc"]) not in tests
        assert outcomes.walk(row["map_desc"], plan).outcome == row["solution"]
        assert row["answer"] == "<output_image>\\boxed{" + row["solution"] + "}"
        assert "Full Action Plan: " + ", ".join(row["plan"]) in row["prompt"][0]["content"][-1]["text"]
        want = outcomes.render_helper(row["map_desc"], plan, "outcome")
        assert np.array_equal(np.asarray(row["helper_image"].convert("RGB")), np.asarray(want))
    with pytest.raises(ValueError, match=r"helper must be one of \('partial', 'outcome'\)"):
        build_dataset(BuildDataArguments(source="task", task="vsp_spatial_reasoning", num_generated=3,
                                         helper="true_piece", test_dir=str(vsp_dir / "maze_planning"),
                                         output_dir=str(tmp_path / "bad")))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("completion, pred", [
    ("\\boxed{A}", "A"), ("I think \\boxed{b}.", "B"), ("\\boxed{(C)}", "C"), ("\\boxed{B. hole}", "B"),
    ("\\boxed{A} no, \\boxed{C}", "C"),  # the last box decides
    ("A", None), ("(A)", None),  # no box: invalid (only jigsaw and COMT read the (X) form)
    ("\\boxed{D}", None), ("\\boxed{AB}", None), ("\\boxed{}", None), ("\\boxed{A", None), ("\\boxed{\\boxed{A}}", None),
])
def test_reasoning_scorer_on_adversarial_answers(completion, pred):
    task = get_task("vsp_spatial_reasoning")
    item = type("Item", (), {"answer": "C"})()
    s = task.score(item, completion)
    assert s["pred"] == pred and s["correct"] == (pred == "C")


def test_choice_summary_has_the_confusion_matrix_and_chance_levels(tmp_path):
    from datasets import Dataset, DatasetDict

    from mirage_rl.tasks.choice import choice_chance

    task = get_task("vsp_spatial_reasoning")
    samples = [{"gold": g, "pred": p, "correct": g == p} for g, p in
               [("A", "A"), ("A", "B"), ("B", None), ("C", "C"), ("C", "C")]]
    s = task.summarize(samples)
    assert s["accuracy"] == 3 / 5 and s["invalid_rate"] == 1 / 5
    assert s["confusion"]["A"] == {"A": 1, "B": 1, "C": 0, "invalid": 0} and s["confusion"]["B"]["invalid"] == 1
    DatasetDict({"train": Dataset.from_list([{"solution": x, "level": lv} for x, lv in
                                             [("A", 3), ("A", 3), ("B", 3), ("C", 4)]])}).save_to_disk(str(tmp_path / "d"))
    items = [type("I", (), {"level": lv, "answer": a})() for lv, a in [(3, "A"), (3, "B"), (4, "C"), (4, "A"), (5, "C")]]
    chance = choice_chance(task, str(tmp_path / "d"), items)
    assert chance["3"]["majority_class"] == {"accuracy": 0.5, "class": "A", "from_levels": "3"}
    assert chance["4"]["majority_class"]["accuracy"] == 0.5 and chance["3"]["uniform"]["accuracy"] == pytest.approx(1 / 3)
    assert chance["5"]["majority_class"] == {"accuracy": 0.0, "class": "A", "from_levels": "all"}


# --------------------------------------------------------------------------------------------------- jigsaw
def test_the_committed_jigsaw_split_regenerates_and_never_touches_a_train_photo():
    require_photos()
    from mirage_rl.tasks.jigsaw import items as j_items
    from mirage_rl.tasks.jigsaw import pieces

    committed = (REPO / j_items.TEST_FILE).read_text()
    assert j_items.split_text(j_items.make_items(str(PHOTOS), "test", 150)) == committed
    items = get_task("jigsaw").load_benchmark(str(PHOTOS))
    split = {p.file: p.split for p in pieces.read_manifest(PHOTOS)}
    assert len(items) == 150 and sum(it.answer == "A" for it in items) == 75
    assert all(split[it.photo] == split[it.distractor_photo] == "test" for it in items)
    assert len({it.photo for it in items}) == 10 and all(it.distractor_photo != it.photo for it in items)
    for it in items[:10]:
        ims = get_task("jigsaw").item_images(it, "t")
        assert len(ims) == 3 and ims[1].size == ims[2].size
        w, h = pieces.frame(str(PHOTOS), it.photo, it.crop).size
        assert it.piece_box[2:] == [w, h] and all(v % 8 == 0 for v in it.piece_box + it.distractor_box)
        frac_w = (it.piece_box[2] - it.piece_box[0]) / w
        assert 0.2 <= frac_w <= 0.45
        # the puzzle's hole is masked, and the true candidate is what was cut from there
        full = pieces.item_images(str(PHOTOS), it, max_side=10_000)
        true = full["A" if it.answer == "A" else "B"]
        assert np.array_equal(np.asarray(true), np.asarray(pieces.frame(str(PHOTOS), it.photo, it.crop).crop(it.piece_box)))
        assert np.asarray(full["puzzle"].crop(it.piece_box)).max() == 0
    # a train photo smuggled into a test item is refused, naming the line
    bad = REPO / "tests" / "_leak.jsonl"
    try:
        bad.write_text(committed.replace('"distractor_photo": "kodak/kodim20.jpg"', '"distractor_photo": "kodak/kodim01.jpg"', 1))
        with pytest.raises(ValueError, match=r"_leak\.jsonl:\d+: kodak/kodim01\.jpg is a train photo .* the item is test"):
            j_items.load_benchmark(str(PHOTOS), items_file=str(bad))
    finally:
        bad.unlink()


def test_kodak_border_is_cropped_before_pieces_are_cut():
    """The scans' flat grey side lines and black bottom line would mark the true piece: after the manifest's crop the
    frame's outermost rows and columns look like the rows a few pixels in (no flat dark line)."""
    require_photos()
    from mirage_rl.tasks.jigsaw import pieces

    raw = np.asarray(Image.open(PHOTOS / "kodak/kodim01.jpg").convert("RGB")).astype(int)
    assert raw[-1].mean() < 20  # the raw scan: a black bottom line
    f = np.asarray(pieces.frame(str(PHOTOS), "kodak/kodim01.jpg", 8)).astype(int)
    assert f.shape[:2] == (496, 752)
    for edge, inner in ((f[-1], f[-4]), (f[:, -1], f[:, -4]), (f[0], f[3]), (f[:, 0], f[:, 3])):
        assert abs(edge.mean() - inner.mean()) < 12


def test_jigsaw_training_rows_come_from_train_photos_with_three_images_and_a_helper(tmp_path):
    require_photos()
    from datasets import load_from_disk

    from mirage_rl.data.build import BuildDataArguments, build_dataset
    from mirage_rl.tasks.jigsaw import pieces

    out = tmp_path / "ds"
    build_dataset(BuildDataArguments(source="task", task="jigsaw", num_generated=6, photos_dir=str(PHOTOS),
                                     max_side=160, helper="true_piece", output_dir=str(out)))
    ds = load_from_disk(str(out))["train"]
    split = {p.file: p.split for p in pieces.read_manifest(PHOTOS)}
    assert "images" in ds.column_names and "image" not in ds.column_names
    for row in ds:
        assert split[row["photo"]] == "train" and len(row["images"]) == 3 and max(row["images"][0].size) == 160
        puzzle, a, b = row["images"]
        true = a if row["solution"] == "A" else b
        helper = np.asarray(row["helper_image"]).astype(int)
        corner = helper[-true.height:, -true.width:]
        assert np.abs(corner - np.asarray(true).astype(int)).mean() < 1  # the true piece fills the hole
    assert sorted(ds["solution"]) == ["A", "A", "A", "B", "B", "B"]


@pytest.mark.parametrize("completion, pred", [
    ("\\boxed{A}", "A"), ("The answer is (B).", "B"), ("(A) or maybe (B)", "B"), ("\\boxed{B} (A)", "B"),
    ("\\boxed{C}", None), ("(C)", None), ("B", None), ("\\boxed{A", None),
])
def test_jigsaw_scorer_reads_the_box_or_blinks_form(completion, pred):
    assert get_task("jigsaw").parse_answer(completion) == pred


def test_blink_jigsaw_rows_become_items_and_evaluate(tiny_dir, tmp_path):
    """A local dataset with exactly the columns of BLINK's dataset card (Jigsaw, val) loads as jigsaw items and runs
    through `mirage-rl eval`."""
    from datasets import Dataset, Features, Sequence, Value
    from datasets import Image as HFImage

    from mirage_rl.evaluation import EvalArguments, evaluate

    rng = np.random.default_rng(0)

    def im(w, h):
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    features = Features({"idx": Value("string"), "question": Value("string"), "sub_task": Value("string"),
                         "image_1": HFImage(), "image_2": HFImage(), "image_3": HFImage(), "image_4": HFImage(),
                         "choices": Sequence(Value("string")), "answer": Value("string"), "prompt": Value("string"),
                         "explanation": Value("string")})
    rows = [{"idx": f"val_Jigsaw_{i}", "question": "q", "sub_task": "Jigsaw", "image_1": im(200, 150),
             "image_2": im(60, 50), "image_3": im(60, 50), "image_4": None,
             "choices": ["the second image", "the third image"], "answer": ans, "prompt": "p", "explanation": ""}
            for i, ans in enumerate(["(A)", "(B)", "(B)"])]
    Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "blink"))
    task = get_task("jigsaw")
    items = task.load_benchmark(str(tmp_path / "blink"))
    assert [it.answer for it in items] == ["A", "B", "B"] and [len(task.item_images(it, "x")) for it in items] == [3] * 3
    report = evaluate(EvalArguments(model=str(tiny_dir), task="jigsaw", benchmark_dir=str(tmp_path / "blink"),
                                    output_dir=str(tmp_path / "eval"), max_new_tokens=4, batch_size=2, prompt="short"))
    assert report["n"] == 3 and set(report["confusion"]) == {"A", "B"}
    assert sum(sum(v.values()) for v in report["confusion"].values()) == 3
    Dataset.from_list([{"idx": "x", "answer": "(A)"}]).save_to_disk(str(tmp_path / "notblink"))
    with pytest.raises(ValueError, match=r"no column\(s\) \['image_1', 'image_2', 'image_3'\]; BLINK's Jigsaw rows"):
        task.load_benchmark(str(tmp_path / "notblink"))


# ------------------------------------------------------------------------------------- SAT / COMT, JSONL
def _write_mixed_jsonl(tmp_path, colours=((255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 0))):
    paths = []
    for i, c in enumerate(colours):
        p = tmp_path / f"im{i}.png"
        Image.new("RGB", (56 + 28 * i, 56), c).save(p)
        paths.append(p.name)
    rows = [{"text_input": "One view: <image> Which is left? (A) x (B) y \\boxed{}", "image_input": [paths[0]],
             "image_output": paths[3], "text_output": "<output_image>\\boxed{A}", "answer": "A", "id": "one"},
            {"text_input": "<image><image><image> Three views. Which is nearer? (A) x (B) y (C) z (D) w",
             "image_input": paths[:3], "image_output": paths[3], "text_output": "I see <output_image> so (C)", "id": "three"}]
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return jsonl


def test_sat_and_comt_items_read_mirages_jsonl_with_their_answer_rules(tmp_path):
    jsonl = _write_mixed_jsonl(tmp_path)
    comt = get_task("comt").load_benchmark(str(tmp_path), items_file=str(jsonl))
    assert [it.answer for it in comt] == ["A", "C"] and [len(it.image_paths) for it in comt] == [1, 3]
    assert get_task("comt").parse_answer("first (B), finally (D)") == "D"
    assert get_task("sat").parse_answer("(A)") is None and get_task("sat").parse_answer("\\boxed{B}") == "B"
    with pytest.raises(ValueError, match=r"items\.jsonl:2: no gold answer among \['A', 'B'\]"):
        get_task("sat").load_benchmark(str(tmp_path), items_file=str(jsonl))  # "(C)" is not a SAT choice
    with pytest.raises(ValueError, match="task sat: pass items_file"):
        get_task("sat").load_benchmark(str(tmp_path))


# ---------------------------------------------------------------------------------- multi-image everywhere
def test_the_jsonl_builder_and_the_collator_take_rows_of_one_and_of_three_images(tiny, tmp_path):
    from datasets import load_from_disk

    from mirage_rl.collator import LatentCollator
    from mirage_rl.data.build import BuildDataArguments, build_dataset
    from mirage_rl.modeling import LatentTokens

    jsonl = _write_mixed_jsonl(tmp_path)
    build_dataset(BuildDataArguments(source="mirage_jsonl", jsonl=str(jsonl), output_dir=str(tmp_path / "ds")))
    ds = load_from_disk(str(tmp_path / "ds"))["train"]
    assert [len(r["images"]) for r in ds] == [1, 3]
    assert [p["type"] for p in ds[1]["prompt"][0]["content"]] == ["image", "image", "image", "text"]
    model, processor = tiny
    lt = LatentTokens.from_config(model.config)
    collate = LatentCollator(processor, lt, "hidden", stage=1)
    batch = collate([ds[0], ds[1]])
    assert batch["image_grid_thw"].shape[0] == 4 and batch["helper_image_grid_thw"].shape[0] == 2
    image_id = model.config.image_token_id
    per_image = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [per_image[0], sum(per_image[1:])]
    out = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
    assert len(out.pooler_output) == 4
    # a prompt whose markers do not match its images is refused, naming the line
    bad = tmp_path / "bad.jsonl"
    rows = [json.loads(x) for x in jsonl.read_text().splitlines()]
    rows[1]["image_input"] = rows[1]["image_input"][:2]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: text_input: expected 2 \(one per input image\) '<image>' "
                                         r"in the prompt, found 3"):
        build_dataset(BuildDataArguments(source="mirage_jsonl", jsonl=str(bad), output_dir=str(tmp_path / "bad")))


def test_grpo_rollouts_on_mixed_image_counts_process_each_distinct_image_once(tiny_dir, tmp_path):
    """Rows of one and of three images in one GRPO generation batch: with the prompt-image caches each distinct image
    goes through the image processor and the vision tower once, and log-probs and loss equal the uncached run."""
    from datasets import Dataset

    import rewards
    from mirage_rl.data.messages import to_messages
    from mirage_rl.modeling import LatentTokens, load_model, load_processor
    from mirage_rl.trainers import MirageGRPOConfig, MirageGRPOTrainer

    ims = [Image.new("RGB", (168, 168), c) for c in ((250, 10, 10), (10, 250, 10), (10, 10, 250))]
    rows = [{"prompt": to_messages("<image> what?"), "images": [ims[0]]},
            {"prompt": to_messages("<image><image><image> which?", 3), "images": [ims[1], ims[2], ims[0]]}]

    def trainer(name, **kw):
        model, processor = load_model(tiny_dir), load_processor(tiny_dir)
        scramble(model, seed=3, std=0.25)
        with torch.no_grad():
            model.lm_head.weight[LatentTokens.from_config(model.config).start] *= 8.0
        args = MirageGRPOConfig(output_dir=str(tmp_path / name), use_cpu=True, bf16=False, gradient_checkpointing=False,
                                per_device_train_batch_size=4, num_generations=2, max_completion_length=12,
                                report_to="none", save_strategy="no", seed=0, beta=0.1, **kw)
        return MirageGRPOTrainer(model, rewards.load_reward_funcs(["format_reward"]), args,
                                 train_dataset=Dataset.from_list(rows), processing_class=processor)

    outs = {}
    for name, kw in (("cached", {}), ("plain", {"cache_prompt_images": False})):
        t = trainer(name, **kw)
        t.model.train()
        torch.manual_seed(0)
        out = t._generate_and_score_completions([dict(rows[i]) for i in range(2) for _ in range(2)])
        t.current_gradient_accumulation_steps = 1
        outs[name] = (t, out, t._compute_loss(t.model, out))
    (tc, oc, lc), (_, op, lp) = outs["cached"], outs["plain"]
    assert list(oc["num_images"]) == [1, 1, 3, 3]
    assert tc.processing_cache.images_processed == 3 and tc.vision_cache.images_encoded == 3
    for key in ("completion_ids", "old_per_token_logps", "ref_per_token_logps"):
        if oc.get(key) is not None:
            assert torch.equal(oc[key], op[key]), key
    assert torch.equal(lc, lp) and math.isfinite(lc.item())
