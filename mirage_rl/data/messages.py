"""The conversational format of every task's rows: a prompt with one ``<image>`` marker per input image as a user
message, the images of a row, and Mirage's marker for where the latent block goes in an answer.

A row holds its input images as ``image`` (one ``PIL.Image``: VSP) or ``images`` (a list: jigsaw's three, SAT's
several; TRL's column names, which ``GRPOTrainer`` reads the same way), in the order of the prompt's markers.
"""

from __future__ import annotations

#: Where the latent block goes in an answer (Mirage's own marker for the helper image).
LATENT_MARKER = "<output_image>"
#: Where an input image goes in a prompt (Mirage's data format).
IMAGE_MARKER = "<image>"


def to_messages(prompt_text: str, n_images: int = 1) -> list[dict]:
    """Turn a prompt with ``n_images`` ``<image>`` markers into a conversational user message.

    Every content part carries both ``type`` and ``text`` (None for an image), the schema a ``datasets`` column of
    messages needs; the images stay in their places in the text.

    Raises:
        ValueError: if ``prompt_text`` does not hold exactly ``n_images`` markers.
    """
    parts = prompt_text.split(IMAGE_MARKER)
    if len(parts) != n_images + 1:
        want = "exactly one" if n_images == 1 else f"{n_images} (one per input image)"
        raise ValueError(f"expected {want} '<image>' in the prompt, found {len(parts) - 1}: {prompt_text[:80]!r}")
    content = []
    for i, text in enumerate(parts):
        if i:
            content.append({"type": "image", "text": None})
        if text:
            content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def row_images(example: dict) -> list:
    """The input images of a row, in prompt order: ``images`` (a list) when the row has it, else ``[image]``.

    Raises:
        KeyError: the row has neither (the caller names the row).
    """
    images = example.get("images")
    if images is not None:
        return list(images)
    if example.get("image") is None:
        raise KeyError("image")
    return [example["image"]]


def image_columns(column_names) -> str | None:
    """``"images"`` or ``"image"``: the column a dataset holds its input images in (None: neither)."""
    return "images" if "images" in column_names else ("image" if "image" in column_names else None)


def with_helper_input(prompt: list[dict]) -> list[dict]:
    """The conversational ``prompt`` with one more image part right after its first image: where the helper image
    goes when it is given as a second input image (the input upper bound of docs/RESULTS.md, ``helper_as_input``;
    the paper's "helper image as input" row). The input is not modified.

    Raises:
        ValueError: the prompt has no image part.
    """
    out, done = [], False
    for message in prompt:
        content = []
        for part in message["content"]:
            content.append(part)
            if not done and part.get("type") == "image":
                content.append({"type": "image", "text": None})
                done = True
        out.append({**message, "content": content})
    if not done:
        raise ValueError("helper_as_input: the prompt has no image to put the helper image after")
    return out
