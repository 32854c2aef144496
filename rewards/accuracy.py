"""Answer-accuracy rewards: VSP plan success (simulator replay) and multiple-choice letters.

Both follow TRL's reward contract (``GRPOTrainer`` reward functions): ``completions`` plus dataset columns
as keyword arguments; one float per completion, or ``None`` where the row carries no reference (a row of
another task in a mixed dataset), which TRL leaves out of that reward's mean.
"""

from __future__ import annotations

from mirage_rl.tasks.answers import normalize_choice
from mirage_rl.tasks.vsp_planning.scoring import score_plan

from ._text import MAX_COMPLETION_CHARS, boxed_answers, completion_text, per_row

RULES = ("official", "strict")


def plan_success_reward(completions, map_desc=None, rule: str = "official", **kwargs) -> list[float | None]:
    """1.0 if the last ``\\boxed{...}`` plan reaches the goal of the row's map, else 0.0.

    Args:
        completions: TRL completions (strings or chat messages).
        map_desc: dataset column, one VSP map per row (list of rows of cell codes, ``mirage_rl.tasks.vsp_planning.scoring``);
            ``None`` for a row gives ``None`` (no reference).
        rule: ``"official"`` (VSP: the episode ends at the goal) or ``"strict"`` (Mirage: every move replayed,
            the final cell must be the goal); see ``mirage_rl.tasks.vsp_planning.scoring``.
    Raises:
        ValueError: unknown ``rule``, or a column of the wrong length.
    """
    if rule not in RULES:
        raise ValueError(f"plan_success_reward: rule must be one of {RULES}, got {rule!r}")
    maps = per_row(map_desc, len(completions), "map_desc")
    out: list[float | None] = []
    for completion, m in zip(completions, maps):
        if m is None:
            out.append(None)
            continue
        score = score_plan(m, completion_text(completion)[:MAX_COMPLETION_CHARS])
        out.append(float(score.success_strict if rule == "strict" else score.success))
    return out


def choice_accuracy_reward(completions, solution=None, **kwargs) -> list[float | None]:
    """1.0 if the completion's boxed choice letter equals the row's ``solution`` letter, else 0.0.

    Several ``\\boxed{}`` answers with different letters score 0.0 (an answer that hedges is wrong); the same
    letter boxed twice counts once. A row with no ``solution`` gives ``None``.
    Args:
        solution: dataset column, the correct letter per row (``"A"``, ``"(B)"``, ...).
    Raises:
        ValueError: a ``solution`` that is not a choice letter (naming the row), or a column of the wrong length.
    """
    refs = per_row(solution, len(completions), "solution")
    out: list[float | None] = []
    for i, (completion, ref) in enumerate(zip(completions, refs)):
        if ref is None:
            out.append(None)
            continue
        gold = normalize_choice(str(ref))
        if gold is None:
            raise ValueError(f"choice_accuracy_reward: row {i}: solution {ref!r} is not a choice letter "
                             "(expected A, B, (C), ...)")
        picks = {normalize_choice(b) for b in boxed_answers(completion_text(completion))}
        out.append(1.0 if picks == {gold} else 0.0)
    return out
