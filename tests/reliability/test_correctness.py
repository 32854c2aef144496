"""Correctness defects found by independent probes (issue 16, part 7): a GRPO prompt that ends in <|latent_start|>,
stage 1 without latent blocks, k above a helper image's visual tokens, TRL GRPO options that were ignored, the
official scorer against VSP's own parser, and a token-weighted ce_loss under gradient accumulation."""

from __future__ import annotations

import pytest
import torch

from mirage_rl.modeling import QWEN2_5_VL_CHAT_TEMPLATE
from mirage_rl.tasks.vsp_planning.scoring import score_plan
from mirage_rl.trainers import MirageGRPOConfig, MirageSFTConfig


@pytest.fixture(scope="module")
def grpo_rows(small_rows):
    return small_rows.remove_columns(["helper_image", "answer"])


# ------------------------------------------------------------------------- a prompt that opens the latent block
@pytest.mark.parametrize("objective", ["none", "gaussian"])
def test_grpo_prompt_ending_in_latent_start_masks_and_scores_the_same_slots(objective, tiny_dir, grpo_rows, tmp_path):
    from test_grpo import make_trainer, recompute, rollout

    trainer, lt = make_trainer(tiny_dir, grpo_rows, tmp_path, latent_objective=objective, start_bias=1.0)
    forced = QWEN2_5_VL_CHAT_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}",
                                              "<|im_start|>assistant\n<|latent_start|>{% endif %}")
    assert forced != QWEN2_5_VL_CHAT_TEMPLATE
    trainer.processing_class.chat_template = trainer.processing_class.tokenizer.chat_template = forced
    out = rollout(trainer, grpo_rows)
    k = lt.latent_size
    ids, keep = out["completion_ids"], out["tool_mask"]
    assert bool((out["prompt_ids"][:, -1] == lt.start).all())
    assert bool((ids[:, :k] == lt.pad).all()) and bool((ids[:, k] == lt.end).all())  # the block the prompt opened
    assert bool((keep[:, k] == 0).all())  # the forced end is never an action
    assert bool((keep[:, :k] == (1 if objective == "gaussian" else 0)).all())
    scored = (out["completion_mask"] * keep).bool()
    lp = recompute(trainer, out)
    # sampling-time and recomputed log-probs agree on every position in the loss (before the fix: 0.0 vs -79.5)
    torch.testing.assert_close(lp[scored], out["sampling_per_token_logps"][scored], atol=3e-5, rtol=1e-6)
    if objective == "gaussian":
        slots, _ = trainer._completion_slot_masks(out["prompt_ids"], ids)
        assert int(slots.sum()) >= len(ids) * k and bool((out["sampling_per_token_logps"][slots] < 0).all())


# ---------------------------------------------------------------------------------------- stage 1 and its data
def test_stage1_with_latent_blocks_null_trains_rows_without_a_block_on_ce(tiny_dir, rows_of, save_rows, tmp_path):
    from mirage_rl.modeling import load_model, load_processor
    from mirage_rl.commands.sft import SFTScriptArguments, check_sft_dataset, load_train_split
    from mirage_rl.trainers import Stage1Trainer

    rows = rows_of(4)
    for r in rows[:2]:
        r["answer"] = r["answer"].replace("<output_image>", "")  # no latent block in these two rows
    ds = load_train_split(SFTScriptArguments(dataset_path=str(save_rows(rows))))
    args = MirageSFTConfig(output_dir=str(tmp_path / "s1"), use_cpu=True, bf16=False, stage=1, latent_blocks=None,
                           per_device_train_batch_size=1, max_steps=4, logging_steps=1, save_strategy="no",
                           report_to="none", learning_rate=1e-3, seed=0, data_seed=0)
    processor = load_processor(tiny_dir)
    check_sft_dataset(ds, args, "d", processor)
    trainer = Stage1Trainer(model=load_model(tiny_dir), args=args, train_dataset=ds, processing_class=processor)
    trainer.train()  # batch size 1: two of the four micro-batches hold no latent block
    logs = [h for h in trainer.state.log_history if "ce_loss" in h]
    assert len(logs) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert sum("cos_loss" in h for h in logs) == 2  # logged only for the steps that had latent slots


def test_latent_size_above_a_helper_images_visual_tokens_is_caught_in_data_validation(tiny, small_rows, tmp_path):
    from mirage_rl.commands.sft import check_sft_dataset

    _, processor = tiny
    args = MirageSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, stage=1, latent_size=64)
    with pytest.raises(ValueError, match=r"d row 0 \(map_id=.*\): helper image \d+x\d+ gives 36 visual token\(s\) after "
                                         r"the processor's resize, fewer than latent_size=64"):
        check_sft_dataset(small_rows, args, "d", processor)


# ------------------------------------------------------------------------------------------- TRL GRPO options
GRPO = dict(output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=4,
            num_generations=4)


@pytest.mark.parametrize("kw,message", [
    (dict(generation_kwargs={"num_beams": 2}), r"generation_kwargs \['num_beams'\]: latent rollouts .* honour only "
                                               r"\['eos_token_id', 'suppress_tokens', 'do_sample'\]"),
    (dict(generation_kwargs={"max_new_tokens": 5}), r"generation_kwargs \['max_new_tokens'\].*max_completion_length"),
    (dict(generation_kwargs={"do_sample": False}), "GRPO rollouts sample"),
    (dict(cache_implementation="static"), "cache_implementation='static': latent rollouts keep a DynamicCache"),
    (dict(latent_objective="gaussian", top_entropy_quantile=0.2), "top_entropy_quantile=0.2 with latent_objective: "
                                                                   "gaussian: it ranks positions by token entropy"),
    (dict(latent_objective="gaussian", entropy_coef=0.01), "entropy_coef=0.01 with latent_objective: gaussian"),
    (dict(latent_objective="gaussian", importance_sampling_level="sequence", loss_type="grpo"),
     "importance_sampling_level='sequence' with latent_objective: gaussian"),
])
def test_grpo_options_the_latent_rollout_cannot_honour_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        MirageGRPOConfig(**GRPO, **kw)


def test_generation_kwargs_suppress_tokens_and_eos_token_id_are_honoured(tiny_dir, grpo_rows, tmp_path):
    from test_grpo import make_trainer, rollout

    trainer, lt = make_trainer(tiny_dir, grpo_rows, tmp_path)
    ids = rollout(trainer, grpo_rows)["completion_ids"]
    assert bool((ids == lt.start).any())  # the scrambled model opens latent blocks ...
    trainer, lt = make_trainer(tiny_dir, grpo_rows, tmp_path / "b", generation_kwargs={"suppress_tokens": [lt.start]})
    assert not bool((rollout(trainer, grpo_rows)["completion_ids"] == lt.start).any())  # ... unless suppressed
    text = ids[(ids != lt.pad) & (ids != lt.end) & (ids != lt.start) & (ids != trainer._tokenizer.pad_token_id)]
    stop = int(torch.mode(text).values)  # a token the rollouts sample often: made an end-of-completion id
    trainer, _ = make_trainer(tiny_dir, grpo_rows, tmp_path / "c", generation_kwargs={"eos_token_id": stop})
    out = rollout(trainer, grpo_rows)
    assert stop in trainer.eos_token_ids
    ends = 0
    for row, mask in zip(out["completion_ids"].tolist(), out["completion_mask"].tolist()):
        n = int(sum(mask))
        assert stop not in row[: n - 1]  # the completion ends at its first `stop` (TRL's mask agrees)
        ends += row[n - 1] == stop
    assert ends > 0


# -------------------------------------------------------------------------- the official rule is VSP's parser
# player top left, hole top right, goal bottom right; shortest plan D, D, R, R
MAP = [[1, 0, -1], [0, 0, 0], [0, 0, 2]]
VSP_TABLE = [  # (boxed answer, official = VSP's eval.py, strict = Mirage)
    ("D,D,R,R", True, True),
    ("D, D, R, R", True, True),
    ("DOWN, DOWN, RIGHT, RIGHT", True, True),  # Mirage's words: our one deliberate extension (VSP: wrong)
    ("D,D,R,R.", True, True),  # VSP removes periods
    ("'D','D','R','R'", True, True),  # ... and quotes
    ('"D", "D", "R", "R"', True, True),
    ("D,\nD,\nR,\nR", True, True),  # ... and newlines
    (" D , D , R , R ", True, True),  # ... and strips whitespace
    ("L,U,D,D,R,R", True, True),  # off-edge moves leave the player in place
    ("D,D,R,R, then stop", True, False),  # junk after the goal is never read by VSP
    ("D,D,R,R,X", True, False),
    ("D,D,R,R,,", True, False),  # empty items after the goal
    ("D,D,R,R,U", True, False),  # moves after the goal: official stops, strict replays
    ("D D R R", False, False),  # spaces are not separators for VSP
    ("d,d,r,r", False, False),  # lower case is not a move for VSP
    ("Down, Down, Right, Right", False, False),
    ("D,,D,R,R", False, False),  # an empty item before the goal
    ("D,D,R,X", False, False),  # a bad item before the goal
    ("D, D, R, R Done", False, False),  # the last item is 'R Done'
    ("D.D.R.R", False, False),  # periods removed: one item 'DDRR'
    ("D;D;R;R", False, False),
    ("D,D,R,R\tok", False, False),
    ("", False, False),
    ("R,R", False, False),  # into the hole
    ("R,R,D,D", False, False),  # the hole ends the episode before the goal
    ("D,D", False, False),  # ends short of the goal
]


def test_the_table_has_26_answers():
    assert len(VSP_TABLE) == 26


@pytest.mark.parametrize("answer,official,strict", VSP_TABLE)
def test_official_scoring_reproduces_vsp_s_parser(answer, official, strict):
    s = score_plan(MAP, "<think>...</think> \\boxed{" + answer + "}")
    assert (s.success, s.success_strict) == (official, strict)


# ------------------------------------------------------------------------------ ce_loss under gradient accumulation
def test_logged_ce_loss_is_token_weighted_under_gradient_accumulation(tiny_dir, rows_of, save_rows, tmp_path):
    from mirage_rl.modeling import load_model, load_processor
    from mirage_rl.commands.sft import SFTScriptArguments, load_train_split
    from mirage_rl.trainers import Stage2Trainer

    rows = rows_of(2)
    rows[0]["answer"] = "\\boxed{" + ", ".join(["RIGHT", "DOWN"] * 12) + "}"  # long answer
    rows[1]["answer"] = "\\boxed{UP}"  # short answer
    ds = load_train_split(SFTScriptArguments(dataset_path=str(save_rows(rows))))
    args = MirageSFTConfig(output_dir=str(tmp_path / "s"), use_cpu=True, bf16=False, stage=2, latent_mode="none",
                           per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=1, logging_steps=1,
                           learning_rate=0.0, save_strategy="no", report_to="none")
    model, processor = load_model(tiny_dir), load_processor(tiny_dir)
    trainer = Stage2Trainer(model=model, args=args, train_dataset=ds, processing_class=processor)
    trainer.train()
    logged = next(h["ce_loss"] for h in trainer.state.log_history if "ce_loss" in h)
    sums, counts = [], []
    with torch.no_grad():
        for r in rows:
            out = trainer.model(**trainer.data_collator([r]))
            sums.append(float(out.ce_sum))
            counts.append(float(out.n_tokens))
    token_weighted = sum(sums) / sum(counts)
    mean_of_means = sum(s / n for s, n in zip(sums, counts)) / 2
    assert abs(mean_of_means - token_weighted) > 1e-3  # the two differ here: the check is sharp
    assert logged == pytest.approx(token_weighted, rel=1e-4)
