"""The prompts of jigsaw: BLINK's Jigsaw question and choices (``prompt`` field of BLINK's ``Jigsaw`` configuration,
the three images first, as BLINK's evaluation presents them) with Mirage's answer instruction, and a short variant."""

from __future__ import annotations

QUESTION = ("Given the first image with the lower right corner missing, can you tell which one of the second image or "
            "the third image is the missing part? Imagine which image would be more appropriate to place in the "
            "missing spot. You can also carefully observe and compare the edges of the images.")
CHOICES = "Select from the following choices.\n\n(A) the second image\n(B) the third image"
BLINK_PROMPT = f"<image><image><image>{QUESTION}\n{CHOICES}\n\nThe final answer MUST BE put in \\boxed{{}}."
SHORT_PROMPT = ("<image><image><image>Which one fills the missing lower right corner: (A) the second image or (B) the "
                "third image? The final answer MUST BE put in \\boxed{}.")
PROMPTS = {"train": BLINK_PROMPT, "test": BLINK_PROMPT, "short": SHORT_PROMPT}
