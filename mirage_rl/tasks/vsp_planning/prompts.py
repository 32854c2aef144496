"""The prompts of VSP spatial planning (Mirage's train and test prompts, a short one) and of its perception task."""

from __future__ import annotations

_PROMPT_HEAD = (
    "\nAs a professional maze solver, your task is to analyze a grid-based map and devise an action plan that "
    "enables a player to reach the goal from the starting point without falling into any holes, using the fewest "
    "possible moves.\n\n## Game Setup\n- The game presents a fully observable grid-based map.\n- The player starts "
    "at a specified grid square, with the goal located elsewhere on the map.\n- Each grid square is either safe or "
    "contains a hole.\n- Your goal is to guide the player to the goal while avoiding holes.\n"
)
_PROMPT_EXAMPLE = (
    '- For example, your final answer should be like "L,L,R,U,D", which means an action plan of left, left, '
    "right, up, and down.\n"
)
_PROMPT_TAIL = (
    "\n## Moving Rules\n- The action plan involves a series of moves: 'L' (left), 'R' (right), 'U' (up), or 'D' "
    "(down).\n- Each move transfers the player to the adjacent square in that direction, provided it is a safe "
    "square. The player cannot move more than one square at a time.\n- Moving off the edge of the map has no "
    "effect. The player will remain at the same square.\n- DO NOT MOVE INTO A HOLE! Falling into a hole results in "
    "defeat.\n- Locating at the grid containing the goal results in victory.\n\nHere is the map: <image>\n\nPlease "
    "provide your action plan.\n The final answer MUST BE put in \\boxed{}."
)
#: The prompt of Mirage's VSP training split (with the answer-format example line).
TRAIN_PROMPT = _PROMPT_HEAD + _PROMPT_EXAMPLE + _PROMPT_TAIL
#: The prompt of the VSP test split as Mirage evaluates it.
TEST_PROMPT = _PROMPT_HEAD + "\n" + _PROMPT_TAIL
#: The benchmark prompt without the task description: the map and the answer instruction only (the last lines
#: of the VSP prompt). For models trained from scratch, to whom the description is noise that costs 5x the
#: compute per step (the `*_small` recipes); evaluate such a model with the prompt it was trained on.
SHORT_PROMPT = "Here is the map: <image>\n\nPlease provide your action plan.\n The final answer MUST BE put in \\boxed{}."
#: The prompt of the perception task (``task: describe`` of ``build-data``): read the map off the image.
DESCRIBE_PROMPT = "Here is the map: <image>\n\nDescribe the map as a table: one row per line, @ player, * goal, # hole, _ safe."
#: The prompts by name (``prompt:`` of ``build-data`` and ``eval``).
PROMPTS = {"train": TRAIN_PROMPT, "test": TEST_PROMPT, "short": SHORT_PROMPT}
