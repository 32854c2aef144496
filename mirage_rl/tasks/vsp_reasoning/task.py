"""VSP spatial reasoning as a :class:`~mirage_rl.tasks.choice.ChoiceTask` (``vsp_spatial_reasoning``).

Source: Mirage (arXiv 2506.17218, section 4: "VSP spatial reasoning", its published 10-row sample for the prompt and
the helper image), VSP's maps and rule (Wu et al., 2024). The pieces: ``outcomes`` (simulator, plan sampler, helper
images), ``prompts``, ``items`` (committed test split, its generator and loader, training rows).
"""

from __future__ import annotations

from ..choice import ChoiceTask
from . import items, outcomes, prompts


class VspReasoning(ChoiceTask):
    """``vsp_spatial_reasoning``: a maze image and a full action plan -> ``\\boxed{A|B|C}`` (A goal, B hole, C safe
    elsewhere), exact match of the boxed letter."""

    name = "vsp_spatial_reasoning"
    prompts = prompts.PROMPTS
    letters = "ABC"
    has_latent_block = True
    benchmark_dir = "../shared/data/vsp/maze_planning"
    items_file = items.TEST_FILE

    def item_prompt(self, item, variant):
        return prompts.fill(self.prompt(variant), outcomes.plan_text(item.plan))

    def load_benchmark(self, root, levels=None, items_file=None):
        return items.load_benchmark(root, levels, items_file or self.items_file)

    def helper_image(self, item, answer, helper: str = "partial"):
        """The map (``item``: ``map_desc``) with the player moved along the plan ``answer`` (letters): ``partial``
        (the paper's) or ``outcome`` (:func:`outcomes.helper_cell`)."""
        return outcomes.render_helper(item, answer, helper)

    def oracle_image(self, item, helper=None):
        """The item's helper image: the map with the player moved along its plan (``partial`` by default, the paper's;
        ``outcome`` shows where the plan ends, i.e. the answer)."""
        return self.helper_image(item.map_desc, item.plan, helper or "partial")

    def build_rows(self, args, bad):
        return items.build_rows(args, bad)


REASONING = VspReasoning()
