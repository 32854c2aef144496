"""Reward plugins: tables of good, bad and adversarial completions, and the name/kwargs contract."""

from __future__ import annotations

import inspect

import pytest

import rewards
from rewards import (
    choice_accuracy_reward,
    format_reward,
    load_reward_funcs,
    plan_success_reward,
)

BLOCK = "<|latent_start|>" + "<|latent_pad|>" * 4 + "<|latent_end|>"
# player (1) at the top left, goal (2) at the bottom right, a hole (-1) at the top right
MAP = [[1, 0, -1], [0, 0, 0], [0, 0, 2]]


def chat(text):
    return [{"role": "assistant", "content": text}]


PLAN_TABLE = [
    # (completion, official, strict)
    (BLOCK + "\\boxed{DOWN, DOWN, RIGHT, RIGHT}", 1.0, 1.0),
    ("\\boxed{D, D, R, R}", 1.0, 1.0),  # letters
    ("\\boxed{d d r r}", 0.0, 0.0),  # lower case, spaces: not moves for VSP's parser
    ("\\boxed{RIGHT, RIGHT}", 0.0, 0.0),  # walks into the hole
    ("\\boxed{D, D, R, R, U}", 1.0, 0.0),  # official stops at the goal; strict ends off it
    ("\\boxed{D, D, R, R, U, U, U}", 1.0, 0.0),  # ... the strict rule replays into the hole
    ("\\boxed{D, D}", 0.0, 0.0),  # short of the goal
    ("DOWN, DOWN, RIGHT, RIGHT", 0.0, 0.0),  # no box
    ("\\boxed{}", 0.0, 0.0),  # empty box
    ("\\boxed{D, D, R, R", 0.0, 0.0),  # unbalanced braces
    ("\\boxed{D, D, JUMP}", 0.0, 0.0),  # not a move
    ("\\boxed{R, R} \\boxed{D, D, R, R}", 1.0, 1.0),  # several boxes: the last one is the answer (as in eval)
    ("\\boxed{D, D, R, R} \\boxed{R, R}", 0.0, 0.0),
    ("\\boxed{ДОЛОЙ}", 0.0, 0.0),  # non-ASCII
    ("\\boxed{D, D, R, R}\u200b", 1.0, 1.0),  # trailing zero-width space outside the box
    ("\\boxed{__import__('os').system('true')}", 0.0, 0.0),  # code is text, never run
    ("\\boxed{" + "D, " * 50_000 + "}", 0.0, 0.0),  # huge output: bounded, not a success
]


@pytest.mark.parametrize("completion,official,strict", PLAN_TABLE)
def test_plan_success_reward_table(completion, official, strict):
    for form in (completion, chat(completion)):
        assert plan_success_reward([form], map_desc=[MAP]) == [official]
        assert plan_success_reward([form], map_desc=[MAP], rule="strict") == [strict]


def test_plan_success_reward_rows_without_a_map_are_none_and_bad_input_raises():
    assert plan_success_reward(["\\boxed{D, D, R, R}"] * 2, map_desc=[MAP, None]) == [1.0, None]
    assert plan_success_reward(["x"], map_desc=None) == [None]
    with pytest.raises(ValueError, match="rule"):
        plan_success_reward(["x"], map_desc=[MAP], rule="lenient")
    with pytest.raises(ValueError, match="map_desc"):
        plan_success_reward(["x", "y"], map_desc=[MAP])


CHOICE_TABLE = [
    # (completion, solution, reward)
    ("\\boxed{B}", "B", 1.0),
    ("The answer is \\boxed{(b)}", "B", 1.0),
    ("\\boxed{B. a red cube}", "(B)", 1.0),
    ("\\boxed{B: a red cube}", "B", 1.0),
    ("\\boxed{C}", "B", 0.0),
    ("\\boxed{B} \\boxed{B}", "B", 1.0),  # the same letter twice
    ("\\boxed{A} \\boxed{B}", "B", 0.0),  # hedging between letters
    ("\\boxed{A, B, C, D}", "B", 0.0),  # all options at once
    ("\\boxed{AB}", "B", 0.0),
    ("B", "B", 0.0),  # no box
    ("\\boxed{B", "B", 0.0),  # unbalanced
    ("\\boxed{}", "B", 0.0),
    ("\\boxed{Б}", "B", 0.0),  # Cyrillic look-alike is not the letter B
    ("\\boxed{" + "B" * 100_000 + "}", "B", 0.0),
]


@pytest.mark.parametrize("completion,solution,reward", CHOICE_TABLE)
def test_choice_accuracy_reward_table(completion, solution, reward):
    assert choice_accuracy_reward([chat(completion)], solution=[solution]) == [reward]


def test_choice_accuracy_reward_needs_a_letter_solution():
    assert choice_accuracy_reward(["\\boxed{A}"], solution=[None]) == [None]
    with pytest.raises(ValueError, match="row 0"):
        choice_accuracy_reward(["\\boxed{A}"], solution=["forty-two"])


FORMAT_TABLE = [
    # (completion, latent_blocks_expected, reward)
    (BLOCK + "\\boxed{R, D}", 1, 1.0),
    ("I look. " + BLOCK + " so \\boxed{R, D}<|im_end|>", 1, 1.0),
    ("\\boxed{R, D}", 1, 0.0),  # no latent block
    ("\\boxed{R, D}", 0, 1.0),  # Direct SFT expects none
    (BLOCK + "\\boxed{R, D}", 0, 0.0),
    (BLOCK + BLOCK + "\\boxed{R, D}", 1, 0.0),  # two blocks
    ("\\boxed{R, D}" + BLOCK, 1, 0.0),  # answer before the block
    (BLOCK + "\\boxed{R} \\boxed{D}", 1, 0.0),  # several boxed answers
    (BLOCK + "\\boxed{R, D", 1, 0.0),  # unbalanced braces
    (BLOCK + "\\boxed{}", 1, 0.0),  # empty answer
    (BLOCK + "R, D", 1, 0.0),  # no box
    ("<|latent_start|><|latent_end|>\\boxed{R}", 1, 0.0),  # a block without slots
    ("<|latent_start|><|latent_pad|>\\boxed{R}", 1, 0.0),  # a block without its end
    (BLOCK + "<|latent_pad|>\\boxed{R}", 1, 0.0),  # a stray slot after the block
    ("<|latent_end|>" + BLOCK + "\\boxed{R}", 1, 0.0),  # a stray end before it
    (BLOCK + "\\boxed{\\text{右}}", 1, 1.0),  # non-ASCII inside a balanced box is well formed
    (BLOCK + "\\boxed{R}" + "x" * 30_000, 1, 0.0),  # huge output
]


@pytest.mark.parametrize("completion,expected,reward", FORMAT_TABLE)
def test_format_reward_table(completion, expected, reward):
    assert format_reward([chat(completion)], latent_blocks_expected=expected) == [reward]


def test_format_reward_rejects_a_negative_block_count():
    with pytest.raises(ValueError, match="latent_blocks_expected"):
        format_reward(["x"], latent_blocks_expected=-1)


def test_load_reward_funcs_resolves_names_paths_and_kwargs():
    funcs = load_reward_funcs(["plan_success_reward", "format_reward", "rewards.accuracy:choice_accuracy_reward"],
                              {"plan_success_reward": {"rule": "strict"}})
    assert [f.__name__ for f in funcs] == ["plan_success_reward", "format_reward", "choice_accuracy_reward"]
    # the bound option is applied: this plan succeeds under the official rule only
    assert funcs[0](["\\boxed{D, D, R, R, U}"], map_desc=[MAP]) == [0.0]
    # the plugin itself, behind the contract check (rewards.checked_reward)
    assert inspect.unwrap(load_reward_funcs(["rewards.format.format_reward"])[0]) is format_reward


@pytest.mark.parametrize("names,kwargs,match", [
    (["plan_succes_reward"], None, "known rewards are choice_accuracy_reward, format_reward, plan_success_reward"),
    (["no_such_pkg.reward"], None, "cannot import module 'no_such_pkg'"),
    (["rewards.accuracy.nope"], None, "no callable 'nope'"),
    ([], None, "empty"),
    (["format_reward", "format_reward"], None, "twice"),
    (["format_reward"], {"plan_success_reward": {"rule": "strict"}}, "not in reward_funcs"),
    (["plan_success_reward"], {"plan_success_reward": {"rul": "strict"}}, "not options of plan_success_reward"),
    (["plan_success_reward"], {"plan_success_reward": "strict"}, "mapping"),
])
def test_load_reward_funcs_fails_at_start_up_with_the_known_names(names, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_reward_funcs(names, kwargs)


def test_shipped_plugins_are_listed():
    assert set(rewards.REWARD_FUNCS) == {"plan_success_reward", "choice_accuracy_reward", "format_reward"}
