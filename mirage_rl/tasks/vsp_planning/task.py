"""VSP spatial planning as a :class:`~mirage_rl.tasks.base.Task` (``plan``), and its perception task (``describe``).

Source: VSP (Wu et al., 2024) and Mirage's splits (arXiv 2506.17218, section 4). The pieces live beside this file:
``maps`` (maps, rendering, helper images, generator, benchmark loader), ``prompts``, ``scoring`` (VSP's official rule
and Mirage's strict rule), ``describe`` (the table scoring), ``chance`` (chance levels), ``rows`` (training rows).
"""

from __future__ import annotations

from . import chance, describe, maps, prompts, rows, scoring
from ..base import Task

BENCHMARK_DIR = "../shared/data/vsp/maze_planning"


class VspPlanning(Task):
    """``plan``: a maze image -> the action plan in ``\\boxed{}``, scored with both rules (``scoring``)."""

    name = "plan"
    prompts = prompts.PROMPTS
    metrics = (("accuracy", "official (VSP)"), ("accuracy_strict", "strict (Mirage)"), ("invalid_rate", "invalid"))
    chance_labels = {"random_plan": "random plan of the level", "best_blind_plan": "best blind plan (chosen on training maps)"}
    correct_key = "success"
    has_latent_block = True
    benchmark_dir = BENCHMARK_DIR

    def load_benchmark(self, root, levels=None, items_file=None):
        return maps.load_benchmark(root, levels)

    def parse_answer(self, completion):
        return scoring.parse_plan(completion)

    def score(self, item, completion):
        s = scoring.score_plan(item.map_desc, completion)
        return {"plan": s.plan, "verdict": s.verdict, "success": s.success, "success_strict": s.success_strict}

    def summarize(self, samples):
        n = len(samples)
        return {"n": n, "accuracy": sum(r["success"] for r in samples) / n,
                "accuracy_strict": sum(r["success_strict"] for r in samples) / n,
                "invalid_rate": sum(r["verdict"] == "invalid" for r in samples) / n}

    def helper_image(self, item, answer, helper: str = "arrows"):
        """The map (``item``: ``map_desc``) with the plan ``answer`` (moves) drawn on it: red arrows (``arrows``,
        Mirage sec. 3.1) or its cells filled red (``filled``, ours): ``maps.render_helper``."""
        return maps.render_helper(item, answer, helper)

    def oracle_image(self, item, helper=None):
        """The training helper image of a test map: its shortest plan drawn as the ``helper`` variant (default
        arrows). It *shows the answer*: feeding it measures whether the model reads its latents, not a fair
        accuracy."""
        return self.helper_image(item.map_desc, maps.shortest_plan(item.map_desc), helper or "arrows")

    def item_answer(self, item):
        """The map's shortest plan (a tuple of moves): the answer the latent geometry compares."""
        return tuple(maps.shortest_plan(item.map_desc))

    def chance_baselines(self, dataset_path, benchmark_dir, levels=None, items_file=None):
        return chance.blind_baselines(dataset_path, benchmark_dir, levels)

    def build_rows(self, args, bad):
        return rows.build_rows(args, bad)


class VspDescribe(VspPlanning):
    """``describe``: the same maps, the answer is the map as a table (``describe.score_table``); no latent block.
    Pretrains the perception of a model trained from scratch."""

    name = "describe"
    prompts = {variant: prompts.DESCRIBE_PROMPT for variant in prompts.PROMPTS}  # one prompt, whatever the variant
    metrics = (("table_exact", "exact table"), ("cell_accuracy", "cells right"), ("player_found", "player found"),
               ("goal_found", "goal found"))
    has_latent_block = False
    correct_key = "table_exact"

    def parse_answer(self, completion):
        return describe.parse_table(completion)

    def score(self, item, completion):
        return describe.score_table(item.map_desc, completion)

    def summarize(self, samples):
        n = len(samples)
        return {"n": n, "table_exact": sum(r["table_exact"] for r in samples) / n,
                "cell_accuracy": sum(r["cells_right"] for r in samples) / sum(r["n_cells"] for r in samples),
                "player_found": sum(r["player_found"] for r in samples) / n,
                "goal_found": sum(r["goal_found"] for r in samples) / n}

    def helper_image(self, item, answer):
        return maps.render_map(item)

    def chance_baselines(self, dataset_path, benchmark_dir, levels=None, items_file=None):
        raise NotImplementedError("task 'describe' has no chance baselines")


PLAN = VspPlanning()
DESCRIBE = VspDescribe()
