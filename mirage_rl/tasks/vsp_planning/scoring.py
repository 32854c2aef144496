"""Scoring of VSP spatial-planning answers: the one place that parses plans and replays them.

Two rules are implemented (VSP, Wu et al. 2024, and Mirage, arXiv 2506.17218, section 4):

* **official** (VSP): the plan is parsed and replayed exactly as VSP's own evaluation script does
  (``VSP-main/maze/task-main/eval.py`` of UCSB-NLP-Chang/Visual-Spatial-Planning): the answer is split at
  commas; from each item the characters ``"``, ``'``, newline and ``.`` are removed and surrounding
  whitespace stripped; the items are played one by one on FrozenLake physics (a move off the edge leaves
  the player in place); the episode ends at the first hole (failure) or at the goal (success): items after
  that are never read, so junk after the goal costs nothing. An item that is not a move, read before the
  episode ended, makes the answer wrong; so does a plan that ends elsewhere. Hence ``"L R"`` (spaces),
  lowercase ``"l"`` and empty items (``"L,,R"``) are wrong, while a trailing period, quotes, or junk after
  the goal is reached are not.
* **strict** (Mirage): the same items, every one of which must be a move; *every* move is replayed; success
  only if no hole was entered and the final cell is the goal.

Deliberate differences from VSP's script (each one needed for Mirage-trained models):

1. The answer is the content of the last ``\\boxed{...}`` (Mirage's answer format, which its prompts ask
   for), not the text after ``Action plan:``.
2. Besides VSP's letters ``L``/``R``/``U``/``D``, the upper-case words ``LEFT``/``RIGHT``/``UP``/``DOWN`` are
   moves: Mirage's training answers are written that way (``\\boxed{RIGHT, DOWN}``).
3. Where VSP's script swallows every exception into "not correct", the verdict says why: ``invalid`` (no
   box, unbalanced braces, or an item that is not a move before the episode ended) or ``fail``. Accuracy is
   the same.
4. At most ``mirage_rl.tasks.answers.MAX_BOX_CHARS`` characters of a box are read.

Model output is only ever parsed as text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..answers import last_box

SAFE, PLAYER, GOAL, HOLE = 0, 1, 2, -1
MOVES = {"L": (0, -1), "R": (0, 1), "U": (-1, 0), "D": (1, 0)}
_WORDS = {"LEFT": "L", "RIGHT": "R", "UP": "U", "DOWN": "D", "L": "L", "R": "R", "U": "U", "D": "D"}


#: VSP's per-item clean-up: these characters are removed from every comma-separated item, then whitespace is stripped
_VSP_REMOVED = str.maketrans("", "", "\"'\n.")


def plan_items(box: str) -> list[str | None]:
    """VSP's parsing of an answer (module docstring): split at commas, remove ``" ' \\n .`` from each item, strip
    whitespace; each item becomes ``"L"``/``"R"``/``"U"``/``"D"`` when it is one of those letters or one of the words
    ``LEFT``/``RIGHT``/``UP``/``DOWN`` (case-sensitive, as VSP), else ``None``."""
    return [_WORDS.get(item.translate(_VSP_REMOVED).strip()) for item in box.split(",")]


def parse_plan(text: str) -> list[str] | None:
    """The moves of the last ``\\boxed{...}`` when every item is a move (:func:`plan_items`), else ``None``
    (no box, unbalanced braces, an empty box or item, or an item that is not a move)."""
    box = last_box(text)
    if box is None:
        return None
    items = plan_items(box)
    return None if any(m is None for m in items) else items  # type: ignore[return-value]


def find_cell(map_desc: list[list[int]], value: int) -> tuple[int, int]:
    """Return ``(row, col)`` of the first cell equal to ``value``; ``ValueError`` if there is none."""
    for r, row in enumerate(map_desc):
        for c, v in enumerate(row):
            if v == value:
                return r, c
    raise ValueError(f"map_desc has no cell with value {value}: {map_desc}")


def step(map_desc: list[list[int]], cell: tuple[int, int], move: str) -> tuple[int, int]:
    """FrozenLake physics of one move: the adjacent cell, or ``cell`` itself when the move leaves the map."""
    dr, dc = MOVES[move]
    r, c = cell[0] + dr, cell[1] + dc
    return (r, c) if 0 <= r < len(map_desc) and 0 <= c < len(map_desc[0]) else cell


def _cells(map_desc: list[list[int]], moves: list[str]):
    """The value of the cell the player stands on after each move (:func:`step`): the one walk both rules replay."""
    cell = find_cell(map_desc, PLAYER)
    for move in moves:
        cell = step(map_desc, cell, move)
        yield map_desc[cell[0]][cell[1]]


def replay(map_desc: list[list[int]], plan: list[str]) -> tuple[bool, bool]:
    """Replay ``plan`` on ``map_desc``; return ``(success_official, success_strict)``."""
    official, cell = False, PLAYER
    for cell in _cells(map_desc, plan):
        if cell == HOLE:
            return official, False
        official = official or cell == GOAL
    return official, cell == GOAL


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


def play_official(map_desc: list[list[int]], items: list[str | None]) -> str:
    """VSP's replay of parsed items: ``"success"`` (goal reached before any hole or bad item), ``"fail"`` (a hole, or
    the plan ends elsewhere) or ``"invalid"`` (an item that is not a move, read before the episode ended)."""
    bad = items.index(None) if None in items else len(items)
    for cell in _cells(map_desc, items[:bad]):
        if cell in (HOLE, GOAL):
            return "success" if cell == GOAL else "fail"
    return "invalid" if bad < len(items) else "fail"


def score_plan(map_desc: list[list[int]], completion: str) -> PlanScore:
    """Score one completion against its map with both rules (see module docstring). ``plan`` holds the moves before
    the first item that is not a move; ``valid`` is True when every item is a move."""
    box = last_box(completion)
    if box is None:
        return PlanScore(None, False, False, False, "invalid")
    items = plan_items(box)
    valid = None not in items
    plan = items if valid else items[: items.index(None)]
    verdict = play_official(map_desc, items)
    strict = valid and replay(map_desc, plan)[1]  # type: ignore[arg-type]
    return PlanScore(plan or None, valid, verdict == "success", strict, verdict)  # type: ignore[arg-type]
