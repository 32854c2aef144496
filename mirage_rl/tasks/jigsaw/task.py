"""Jigsaw as a :class:`~mirage_rl.tasks.choice.ChoiceTask` (``jigsaw``): BLINK's format on real photographs.

Source: BLINK (Fu et al., 2024, arXiv 2404.12390), Jigsaw; Mirage (arXiv 2506.17218, section 4) for the helper image.
The pieces: ``pieces`` (photos, frames, the three images, helper images), ``prompts``, ``items`` (generator,
committed test split, loader, training rows), ``blink`` (BLINK's own split, for users with hub access).
"""

from __future__ import annotations

from ..choice import ChoiceTask
from . import blink, items, pieces, prompts


class Jigsaw(ChoiceTask):
    """``jigsaw``: the puzzle and two candidates -> ``\\boxed{A}`` or ``\\boxed{B}`` (BLINK's ``(A)`` form accepted
    when there is no box). ``benchmark_dir`` is a photos folder (the committed items), or BLINK (:mod:`.blink`)."""

    name = "jigsaw"
    prompts = prompts.PROMPTS
    letters = "AB"
    paren_fallback = True
    has_latent_block = True
    benchmark_dir = "../shared/data/photos"
    items_file = items.TEST_FILE

    def load_benchmark(self, root, levels=None, items_file=None):
        if blink.is_blink(str(root)):
            return blink.blink_items(blink.load_blink(str(root)), str(root))
        return items.load_benchmark(root, levels, items_file or self.items_file)

    def item_images(self, item, where):
        if isinstance(item, blink.BlinkItem):
            return item.images
        ims = pieces.item_images(item.photos_dir, item)
        return [ims["puzzle"], ims["A"], ims["B"]]

    def helper_image(self, item, answer, helper: str = "random_candidate"):
        return pieces.helper_image(item.photos_dir, item, helper)

    def oracle_image(self, item, helper=None):
        """The item's helper image (``random_candidate`` by default, the paper's; ``true_piece`` shows the answer);
        none for BLINK's rows (their pieces are not known)."""
        if isinstance(item, blink.BlinkItem):
            return None
        return self.helper_image(item, item.answer, helper or "random_candidate")

    def build_rows(self, args, bad):
        return items.build_rows(args, bad)


JIGSAW = Jigsaw()
