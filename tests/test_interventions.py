"""Latent interventions at evaluation (issue 21, section 1): what enters the latent slots, the paired statistics, the
geometry, and `mirage-rl eval --latent_intervention ...` end to end on a tiny checkpoint that opens latent blocks."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import scramble

from mirage_rl import interventions as iv
from mirage_rl.collator import LatentCollator
from mirage_rl.generation import generate
from mirage_rl.modeling import LatentTokens, load_model, load_processor
from conftest import per_backbone_tiny_dir

tiny_dir = per_backbone_tiny_dir  # every test here runs on each backbone


@pytest.fixture(scope="module")
def latent_ckpt(tiny_dir, tmp_path_factory):
    """The tiny checkpoint with weights scrambled and <|latent_start|> made likely: greedy decoding opens blocks."""
    from PIL import Image

    from mirage_rl.data.messages import to_messages

    model, processor = load_model(tiny_dir), load_processor(tiny_dir)
    scramble(model, seed=3, std=0.25)
    lt = LatentTokens.from_config(model.config)
    rows = [{"prompt": to_messages("<image> go"), "image": Image.new("RGB", (168, 168), (200, 30, 30))}]
    batch = LatentCollator(processor, lt, "none", with_answer=False)(rows)
    first = generate(model, processor, batch, max_new_tokens=1, latent_mode="none").sequences[0, 0]
    with torch.no_grad():  # <|latent_start|> scores like 4x the token greedy decoding picks: blocks open
        model.lm_head.weight[lt.start] = 4.0 * model.lm_head.weight[first]
    model.config.latent_mode = "hidden"
    out = tmp_path_factory.mktemp("ckpt") / "latent"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_derangement_keeps_levels_and_moves_every_item():
    levels = [3] * 5 + [4] * 4 + [5]
    p = iv.derangement(levels, seed=1)
    assert sorted(p) == list(range(10)) and [levels[j] for j in p] == levels
    assert [i for i in range(10) if p[i] == i] == [9]  # the one item of level 5 has no partner
    assert p == iv.derangement(levels, seed=1) and p != iv.derangement(levels, seed=2)


def test_mcnemar_and_paired_bootstrap():
    assert iv.mcnemar_p(0, 5) == pytest.approx(2 / 32) and iv.mcnemar_p(3, 3) == 1.0 and iv.mcnemar_p(0, 0) == 1.0
    assert iv.mcnemar_p(1, 9) == pytest.approx(2 * 11 / 1024)
    ref = [True] * 60 + [False] * 40
    other = [True] * 40 + [False] * 20 + [True] * 5 + [False] * 35
    p = iv.paired(ref, other)
    assert p["diff"] == pytest.approx(-0.15) and (p["b"], p["c"]) == (20, 5)
    assert p["ci95"][0] < -0.15 < p["ci95"][1] < 0 and p["mcnemar_p"] == pytest.approx(iv.mcnemar_p(20, 5))
    with pytest.raises(ValueError, match="the same items"):
        iv.paired([True], [True, False])
    with pytest.raises(ValueError, match=r"unknown \['zeros'\]; known"):
        iv.check_names(["zeros"])
    assert iv.check_names(["zero", "oracle", "zero"]) == ["none", "zero", "oracle"]


def test_zero_feeds_exact_zeros_into_the_forward_and_skip_opens_no_block(latent_ckpt):
    model, processor = load_model(latent_ckpt), load_processor(latent_ckpt)
    lt = LatentTokens.from_config(model.config)
    from PIL import Image

    from mirage_rl.data.messages import to_messages

    rows = [{"prompt": to_messages("<image> go"), "image": Image.new("RGB", (168, 168), (200, 30, 30))}]
    batch = LatentCollator(processor, lt, "hidden", with_answer=False)(rows)
    seen = []
    lm = model.model.language_model
    h = lm.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw["inputs_embeds"].detach().clone()), with_kwargs=True)
    try:
        fn = iv.LatentIntervention("zero", lt.latent_size).for_items([0])
        out = generate(model, processor, batch, max_new_tokens=12, latent_fn=fn, record_latents=True)
    finally:
        h.remove()
    ids = out.sequences[0].tolist()
    assert lt.start in ids, "the biased checkpoint opens a latent block"
    first = ids.index(lt.start)
    # forward 0 is the prefill; forward j + 1 takes the input of generated token j: slots are tokens first+1..first+k
    for j in range(first + 1, first + 1 + lt.latent_size):
        assert ids[j] == lt.pad and torch.count_nonzero(seen[j + 1]) == 0
    assert torch.count_nonzero(seen[first + 1]) > 0  # the <|latent_start|> token's own embedding
    assert len(out.own_latents[0]) >= lt.latent_size and torch.count_nonzero(out.fed_latents[0]) == 0
    assert out.own_latents[0].norm() > 0  # what the model would have fed
    skipped = generate(model, processor, batch, max_new_tokens=12, suppress_token_ids=[lt.start])
    assert lt.start not in skipped.sequences[0].tolist() and lt.pad not in skipped.sequences[0].tolist()


def test_eval_with_every_intervention_reports_paired_tests_geometry_and_resumes(latent_ckpt, vsp_dir, tmp_path, tiny_dir):
    from mirage_rl.evaluation import EvalArguments, evaluate
    from mirage_rl.intervention_eval import oracle_targets
    from mirage_rl.latent import helper_targets
    from mirage_rl.tasks import get_task

    args = EvalArguments(model=str(latent_ckpt), benchmark_dir=str(vsp_dir / "maze_planning"), levels=[3, 4], limit=6,
                         batch_size=4, max_new_tokens=12, output_dir=str(tmp_path / "e"), prompt="short",
                         latent_intervention=list(iv.INTERVENTIONS))
    report = evaluate(args)
    table = report["interventions"]
    assert list(table) == list(iv.INTERVENTIONS) and all(t["n"] == 6 for t in table.values())
    assert "paired" not in table["none"] and set(table["zero"]["paired"]) == {"diff", "mcnemar_p", "ci95", "b", "c"}
    assert table["none"]["accuracy"] == report["accuracy"]
    geo = report["latent_geometry"]
    assert geo["items"] >= 2 and len(geo["cos_to_oracle"]) == 4 and 0 <= geo["retrieval_top1"] <= 1
    assert -1 <= geo["collapse"] <= 1 and -1 <= geo["oracle_collapse"] <= 1 and 0 < geo["oracle_specific_share"] < 1
    out = tmp_path / "e"
    none = [json.loads(x) for x in (out / "interventions/none/samples.jsonl").read_text().splitlines()]
    skip = [json.loads(x) for x in (out / "interventions/skip/samples.jsonl").read_text().splitlines()]
    assert any("<|latent_start|>" in s["completion"] for s in none)
    assert not any("<|latent_start|>" in s["completion"] or "<|latent_pad|>" in s["completion"] for s in skip)
    assert (out / "interventions.png").read_bytes()[:4] == b"\x89PNG" and (out / "interventions/none/latents.safetensors").is_file()
    # the oracle is the stage-1 target of the item's helper image, bit for bit (the SFT collator's path)
    model, processor = load_model(latent_ckpt), load_processor(latent_ckpt)
    task = get_task("plan")
    items = task.load_benchmark(str(vsp_dir / "maze_planning"), [3, 4])[:2]
    ours = oracle_targets(model, processor, task, items, None, 4, "average")
    lt = LatentTokens.from_config(model.config)
    from mirage_rl.data.messages import to_messages

    for it, target in zip(items, ours):
        row = {"prompt": to_messages("<image> go"), "image": task.item_images(it, "x")[0],
               "answer": "<output_image>\\boxed{R}", "helper_image": task.oracle_image(it)}
        b = LatentCollator(processor, lt, "hidden", stage=1)([row])
        assert torch.equal(target, helper_targets(model, b["helper_pixel_values"], b["helper_image_grid_thw"], 4)[0].float())
    # a second run with the same settings reuses every pass
    stamp = (out / "interventions/zero/samples.jsonl").stat().st_mtime_ns
    again = evaluate(args)
    assert (out / "interventions/zero/samples.jsonl").stat().st_mtime_ns == stamp and again["interventions"] == table
    with pytest.raises(ValueError, match="latent_intervention needs the model's own latents"):
        EvalArguments(model="m", latent_intervention=["zero"], latent_mode="dummy")


def test_geometry_on_known_latents():
    g = torch.Generator().manual_seed(0)
    oracle = [torch.randn(4, 16, generator=g) for _ in range(5)]
    same = iv.geometry([o.clone() for o in oracle], oracle, 4)  # latents equal to their targets
    assert same["retrieval_top1"] == 1.0 and same["cos_to_oracle"] == [1.0] * 4 and same["retrieval_chance"] == 0.2
    assert same["collapse"] == pytest.approx(same["oracle_collapse"]) and same["oracle_specific_share"] > 0.5
    const = [oracle[0].clone() for _ in range(5)]  # every item's target the same vector: nothing map-specific
    flat = iv.geometry([o.clone() for o in oracle], const, 4)
    assert flat["oracle_collapse"] == pytest.approx(1.0) and flat["oracle_specific_share"] == pytest.approx(0.0, abs=1e-6)
    assert iv.geometry([torch.zeros(0, 16)] * 3, oracle[:3], 4) == {"items": 0}  # no latent block: nothing to measure
    # answers: items 0-1 and 2-3 share an answer and a target (up to noise), item 4 stands alone
    pairs = [oracle[0], oracle[0] + 0.01, oracle[2], oracle[2] + 0.01, oracle[4]]
    by_answer = iv.geometry([const[0].clone() + 0.001 * i for i in range(5)], pairs, 4, answers=["a", "a", "b", "b", "c"])
    assert by_answer["oracle_nn_same_answer"] == pytest.approx(0.8) and by_answer["same_answer_chance"] == pytest.approx(0.2)
    assert 0 <= by_answer["nn_same_answer"] <= 1


def test_residual_oracle_is_the_helper_minus_the_input_map(latent_ckpt, vsp_dir):
    from mirage_rl.intervention_eval import oracle_targets
    from mirage_rl.tasks import get_task

    model, processor = load_model(latent_ckpt), load_processor(latent_ckpt)
    task = get_task("plan")
    items = task.load_benchmark(str(vsp_dir / "maze_planning"), [3])[:2]
    helper = oracle_targets(model, processor, task, items, None, 4, "average")
    residual = oracle_targets(model, processor, task, items, None, 4, "average", target="residual")
    inputs = [oracle_targets(model, processor, type("T", (), {"oracle_image": lambda self, it, h: task.item_images(it, "x")[0],
                                                              "item_images": task.item_images})(), [it], None, 4,
                             "average")[0] for it in items]
    for h, r, i in zip(helper, residual, inputs):
        assert torch.allclose(r, h - i, atol=1e-6) and r.norm() < h.norm()
