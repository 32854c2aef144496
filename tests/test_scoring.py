import pytest

from mirage_rl.tasks.answers import extract_boxed
from mirage_rl.tasks.vsp_planning.scoring import parse_plan, replay, score_plan

# 3x3: player bottom-middle, goal top-middle, hole at middle-left
MAP = [[0, 2, 0],
       [-1, 0, 0],
       [0, 1, 0]]


@pytest.mark.parametrize("text,plan", [
    ("\\boxed{U, U}", ["U", "U"]),
    ("\\boxed{UP, UP}", ["U", "U"]),
    ("\\boxed{\"U\", 'U'.}", ["U", "U"]),  # VSP removes quotes and periods from every item
    ("thinking... \\boxed{L} then \\boxed{U, U}", ["U", "U"]),  # the last box counts
    ("<|latent_start|><|latent_pad|><|latent_end|>\\boxed{RIGHT, UP}", ["R", "U"]),
])
def test_parse_plan_valid(text, plan):
    assert parse_plan(text) == plan


@pytest.mark.parametrize("text", [
    "", "U, U", "\\boxed{}", "\\boxed{   }", "\\boxed{U, X}", "\\boxed{U, U", "\\boxed{LEFTRIGHT}",
    "\\boxed{U}\\boxed{U", "\\boxed{{U}}", "\\boxed{上}",
    "\\boxed{up,Up}", "\\boxed{U U}", "\\boxed{U,,U}",  # VSP: lower case, spaces and empty items are not moves
])
def test_parse_plan_invalid(text):
    assert parse_plan(text) is None


def test_extract_boxed_nested_and_unbalanced():
    assert extract_boxed("\\boxed{a{b}c} x \\boxed{d}") == ["a{b}c", "d"]
    assert extract_boxed("\\boxed{a{b}") == [None]


def test_huge_output_is_bounded():
    assert parse_plan("\\boxed{" + "U," * 100000) is None
    assert parse_plan("x" * 1_000_000) is None


@pytest.mark.parametrize("plan,official,strict", [
    (["U", "U"], True, True),
    (["U", "U", "R"], True, False),     # official stops at the goal; strict needs to end there
    (["L", "U"], False, False),         # bottom-left then into the hole
    (["D", "U", "U"], True, True),      # off-edge move does nothing
    (["R"], False, False),              # safe but not at the goal
    (["U", "L"], False, False),         # hole at middle-left
])
def test_replay_rules(plan, official, strict):
    assert replay(MAP, plan) == (official, strict)


def test_score_plan_verdicts():
    assert score_plan(MAP, "\\boxed{U,U}").verdict == "success"
    assert score_plan(MAP, "\\boxed{R}").verdict == "fail"
    s = score_plan(MAP, "no answer")
    assert (s.verdict, s.valid, s.success) == ("invalid", False, False)
