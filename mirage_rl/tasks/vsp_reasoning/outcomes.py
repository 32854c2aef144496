"""The simulator of VSP spatial reasoning, its plan sampler and its helper images.

Rule (VSP's FrozenLake physics, the same as :mod:`mirage_rl.tasks.vsp_planning.scoring`): the player starts on its
cell and plays the moves in order; a move off the edge leaves it in place; entering a hole ends the episode (**B**);
reaching the goal ends it (**A**; moves after the goal, or after a hole, are never played); a plan that ends on
another safe cell is **C**.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..vsp_planning.maps import _blit, _sprite, render_cells, render_map, shortest_plan
from ..vsp_planning.scoring import GOAL, HOLE, PLAYER, find_cell, step

#: the three outcomes, in Mirage's wording (the prompt lists them the same way)
OUTCOMES = {"A": "Action Success.", "B": "Action Failed. Falling into a hole.",
            "C": "Action Failed. Player safe but failed to reach the goal."}
WORDS = {"L": "LEFT", "R": "RIGHT", "U": "UP", "D": "DOWN"}
LETTERS = {v: k for k, v in WORDS.items()}
HELPERS = ("partial", "outcome")


@dataclass
class Walk:
    """A plan played on a map: ``outcome`` (``A``/``B``/``C``), ``cells`` (the player's cell at the start and after
    each played move; the last is where the episode ended), ``played`` (moves played before it ended)."""

    outcome: str
    cells: list[tuple[int, int]]

    @property
    def played(self) -> int:
        return len(self.cells) - 1


def walk(map_desc: list[list[int]], plan: list[str]) -> Walk:
    """Play ``plan`` (``L``/``R``/``U``/``D`` letters) on ``map_desc`` by the rule of the module docstring (one move:
    :func:`mirage_rl.tasks.vsp_planning.scoring.step`)."""
    cells = [find_cell(map_desc, PLAYER)]
    for move in plan:
        r, c = step(map_desc, cells[-1], move)
        cells.append((r, c))
        if map_desc[r][c] == HOLE:
            return Walk("B", cells)
        if map_desc[r][c] == GOAL:
            return Walk("A", cells)
    return Walk("C", cells)


def _cell_value(map_desc, cell: tuple[int, int], move: str) -> int:
    r, c = step(map_desc, cell, move)
    return map_desc[r][c]


def _safe_walk(map_desc, start, length: int, rng: random.Random) -> tuple[list[str], tuple[int, int]] | None:
    """``length`` random moves that never enter a hole or the goal (edge moves allowed), or None when stuck."""
    cell, moves = start, []
    for _ in range(length):
        options = [m for m in "LRUD" if _cell_value(map_desc, cell, m) not in (HOLE, GOAL)]
        if not options:
            return None
        m = rng.choice(options)
        moves.append(m)
        cell = step(map_desc, cell, m)
    return moves, cell


def draw_plan(map_desc: list[list[int]], outcome: str, rng: random.Random, tries: int = 200) -> list[str] | None:
    """A plan of 1 to 2n moves (n = map size) whose outcome is ``outcome``, or None when ``tries`` draws find none
    (e.g. **B** on a map whose holes the player cannot reach).

    A: a random safe walk, then the shortest path to the goal, sometimes moves after it (never played);
    B: a random safe walk, then a step into an adjacent hole, sometimes moves after it;
    C: a random safe walk that ends off the goal. Every plan is checked with :func:`walk`.
    """
    n = len(map_desc)
    start = find_cell(map_desc, PLAYER)
    for _ in range(tries):
        length = rng.randint(1, 2 * n)
        if outcome == "C":
            got = _safe_walk(map_desc, start, length, rng)
            plan = got[0] if got else None
        else:
            got = _safe_walk(map_desc, start, rng.randint(0, length - 1), rng)
            if got is None:
                continue
            prefix, cell = got
            if outcome == "A":
                tail = shortest_plan(map_desc, cell)
            else:
                holes = [m for m in "LRUD" if _cell_value(map_desc, cell, m) == HOLE]
                tail = [rng.choice(holes)] if holes else None
            if tail is None or len(prefix) + len(tail) > 2 * n:
                continue
            plan = prefix + tail
            if len(plan) < 2 * n and rng.random() < 0.25:  # moves after the end: the rule says they are ignored
                plan += [rng.choice("LRUD") for _ in range(rng.randint(1, 2 * n - len(plan)))]
        if plan and 1 <= len(plan) <= 2 * n and walk(map_desc, plan).outcome == outcome:
            return plan
    return None


def plan_text(plan: list[str]) -> str:
    """``["R", "U"]`` -> ``"RIGHT, UP"`` (the prompt's *Full Action Plan* form)."""
    return ", ".join(WORDS[m] for m in plan)


#: gym's FrozenLake draws the elf facing its last action (``elf_images[lastaction]``), down before any move
ELF = {"L": "elf_left", "D": "elf_down", "R": "elf_right", "U": "elf_up", None: "elf_down"}


def render_state(map_desc: list[list[int]], cell: tuple[int, int], last_move: str | None = None) -> Image.Image:
    """The map as gym's FrozenLake (``gym==0.26.2``, ``_render_gui``) draws it after the player moved: the stool on
    the start cell, the elf at ``cell`` facing ``last_move`` (over the goal when it ended there), or the cracked hole
    sprite when it fell in. Mirage's sample helper images are drawn this way (tested on its cells). At the start
    cell, before any move, it is the map itself."""
    start = find_cell(map_desc, PLAYER)
    if cell == start and last_move is None:
        return render_map(map_desc)
    canvas = render_cells(map_desc, stool_at=start)
    _blit(canvas, _sprite("cracked_hole" if map_desc[cell[0]][cell[1]] == HOLE else ELF[last_move]), *cell)
    return Image.fromarray(canvas.astype(np.uint8), "RGB")


def helper_state(map_desc: list[list[int]], plan: list[str], helper: str) -> tuple[tuple[int, int], str]:
    """``(cell, last move)`` the helper image draws: ``partial`` (the paper's: partway, after ceil(p / 2) of the p
    moves played, at least one) or ``outcome`` (where the episode ended: on the goal, in the hole, or at the plan's
    end).

    Raises ``ValueError`` for another ``helper``."""
    if helper not in HELPERS:
        raise ValueError(f"helper must be one of {HELPERS} for VSP spatial reasoning, got {helper!r}")
    w = walk(map_desc, plan)
    k = w.played if helper == "outcome" else max(1, math.ceil(w.played / 2))
    return w.cells[k], plan[k - 1]


def helper_cell(map_desc: list[list[int]], plan: list[str], helper: str) -> tuple[int, int]:
    """The cell of :func:`helper_state`."""
    return helper_state(map_desc, plan, helper)[0]


def render_helper(map_desc: list[list[int]], plan: list[str], helper: str) -> Image.Image:
    """The helper image of ``helper`` (:func:`helper_state`), drawn by :func:`render_state`."""
    return render_state(map_desc, *helper_state(map_desc, plan, helper))
