"""Scoring of VSP spatial-planning answers: the one place that parses plans and replays them.

Two rules are implemented (VSP, Wu et al. 2024, and Mirage, arXiv 2506.17218, section 4):

* **official** (VSP): replay the plan from the player's cell; a move off the edge leaves the player in
  place; stepping on a hole fails; reaching the goal ends the episode with success (later moves are
  ignored).
* **strict** (Mirage): replay *every* move with the same physics; success only if no hole was entered
  and the final cell is the goal.

A completion is *invalid* when it has no parsable ``\\boxed{...}`` plan (no box, unbalanced braces,
an empty box or a token that is not a move). Model output is only ever parsed as text.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

SAFE, PLAYER, GOAL, HOLE = 0, 1, 2, -1
MOVES = {"L": (0, -1), "R": (0, 1), "U": (-1, 0), "D": (1, 0)}
_WORDS = {"LEFT": "L", "RIGHT": "R", "UP": "U", "DOWN": "D", "L": "L", "R": "R", "U": "U", "D": "D"}
_BOXED = "\\boxed{"
# A plan longer than this is not an answer to a maze of at most 8x8 cells; parsing stops there so that
# hostile or runaway outputs cost O(limit), not O(len(text)).
MAX_PLAN_CHARS = 4096


def extract_boxed(text: str) -> list[str | None]:
    """Return the contents of every ``\\boxed{...}`` in ``text``, in order.

    Braces nest; a box whose braces never close yields ``None`` at its position.
    """
    out: list[str | None] = []
    start = text.find(_BOXED)
    while start != -1:
        i = start + len(_BOXED)
        depth = 1
        j = i
        limit = min(len(text), i + MAX_PLAN_CHARS)
        while j < limit and depth:
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
            j += 1
        if depth:
            out.append(None)
            break
        out.append(text[i : j - 1])
        start = text.find(_BOXED, j)
    return out


def parse_plan(text: str) -> list[str] | None:
    """Parse the plan of the last ``\\boxed{...}`` into moves ``["L", "R", "U", "D", ...]``.

    Accepts letters or words (``LEFT``/``RIGHT``/``UP``/``DOWN``, any case) separated by commas and/or
    spaces. Returns ``None`` when the answer is invalid (no box, unbalanced braces, empty plan, or a
    token that is not a move).
    """
    boxes = extract_boxed(text)
    if not boxes or boxes[-1] is None:
        return None
    tokens = [t for t in re.split(r"[\s,]+", boxes[-1].strip()) if t]
    if not tokens:
        return None
    moves = [_WORDS.get(t.upper()) for t in tokens]
    if any(m is None for m in moves):
        return None
    return moves  # type: ignore[return-value]


def find_cell(map_desc: list[list[int]], value: int) -> tuple[int, int]:
    """Return ``(row, col)`` of the first cell equal to ``value``; ``ValueError`` if there is none."""
    for r, row in enumerate(map_desc):
        for c, v in enumerate(row):
            if v == value:
                return r, c
    raise ValueError(f"map_desc has no cell with value {value}: {map_desc}")


def replay(map_desc: list[list[int]], plan: list[str]) -> tuple[bool, bool]:
    """Replay ``plan`` on ``map_desc``; return ``(success_official, success_strict)``."""
    n_rows, n_cols = len(map_desc), len(map_desc[0])
    r, c = find_cell(map_desc, PLAYER)
    official = None
    for move in plan:
        dr, dc = MOVES[move]
        nr, nc = r + dr, c + dc
        if 0 <= nr < n_rows and 0 <= nc < n_cols:
            r, c = nr, nc
        cell = map_desc[r][c]
        if cell == HOLE:
            return (official is True), False
        if cell == GOAL and official is None:
            official = True
    return (official is True), map_desc[r][c] == GOAL


@dataclass
class PlanScore:
    """Verdict on one completion. ``verdict`` is one of ``success``, ``fail``, ``invalid``."""

    plan: list[str] | None
    valid: bool
    success: bool
    success_strict: bool
    verdict: str

    def to_dict(self) -> dict:
        return asdict(self)


def score_plan(map_desc: list[list[int]], completion: str) -> PlanScore:
    """Score one completion against its map with both rules (see module docstring)."""
    plan = parse_plan(completion)
    if plan is None:
        return PlanScore(None, False, False, False, "invalid")
    ok, ok_strict = replay(map_desc, plan)
    return PlanScore(plan, True, ok, ok_strict, "success" if ok else "fail")
