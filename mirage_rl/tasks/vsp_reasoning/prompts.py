"""The prompts of VSP spatial reasoning: Mirage's own wording (the ``text_input`` of its published
``vsp-spatial-reasoning`` sample, ``../shared/data/vsp/mirage_reasoning_sample``, reproduced exactly; a test checks
every sample row) and a short variant for models trained from scratch. ``{plan}`` is the item's action plan."""

from __future__ import annotations

#: Mirage's prompt (its typo "faile" kept: it is the text the paper's models were trained on).
MIRAGE_PROMPT = (
    "\nAs a professional maze solver, your task is to analyze a grid-based map and decide whether a given action plan "
    "enables a player to reach the goal from the starting point without falling into any holes.\n\n## Setup\n- The "
    "game presents a fully observable grid-based map.\n- The player starts at a specified grid square, with the goal "
    "located elsewhere on the map.\n- Each grid square is either safe or contains a hole.\n- The provided action plan "
    "consists of a series of moves: 'LEFT' (left), 'RIGHT' (right), 'UP' (up), or 'DOWN' (down).\n- Each move "
    "transfers the player to the adjacent square in that direction, provided it is a safe square. The player cannot "
    "move more than one square at a time.\n- Moving off the edge of the map has no effect. The player will remain at "
    "the same square.\n- For each action plan and map, there are 3 possible outcomes:\n    - A. Action Success.\n    "
    "- B. Action Failed. Falling into a hole.\n    - C. Action Failed. Player safe but faile to reach the goal.\n\n"
    "Determine the outcome of the action plan based on the map, and provide your answer with A, B, or C. \n\nHere is "
    "the map: <image>\n\nFull Action Plan: {plan}\n\nPlease provide your answer.\n You FIRST think about the reasoning "
    "process as an internal monologue and then provide the final answer. The reasoning process MUST BE enclosed "
    "within <think> </think> tags. The final answer MUST BE put in \\boxed{{}}."
)
#: The map, the plan and the answer instruction only (for from-scratch models, as planning's ``short``).
SHORT_PROMPT = ("Here is the map: <image>\n\nFull Action Plan: {plan}\n\nA goal, B hole, C safe elsewhere. "
                "The final answer MUST BE put in \\boxed{{}}.")
#: by name (``prompt:`` of ``build-data`` and ``eval``); ``train`` and ``test`` are both Mirage's one prompt
PROMPTS = {"train": MIRAGE_PROMPT, "test": MIRAGE_PROMPT, "short": SHORT_PROMPT}


def fill(template: str, plan_text: str) -> str:
    """The prompt of one item: ``template`` with its action plan (``"RIGHT, UP"``)."""
    return template.format(plan=plan_text)
