"""The conversational format of every task's rows: a prompt with one ``<image>`` marker as a user message, and
Mirage's marker for where the latent block goes in an answer."""

from __future__ import annotations

#: Where the latent block goes in an answer (Mirage's own marker for the helper image).
LATENT_MARKER = "<output_image>"


def to_messages(prompt_text: str) -> list[dict]:
    """Turn a prompt with one ``<image>`` marker into a conversational user message.

    Every content part carries both ``type`` and ``text`` (None for the image), the schema a
    ``datasets`` column of messages needs.

    Raises:
        ValueError: if ``prompt_text`` does not contain exactly one ``<image>``.
    """
    parts = prompt_text.split("<image>")
    if len(parts) != 2:
        raise ValueError(f"expected exactly one '<image>' in the prompt, found {len(parts) - 1}: {prompt_text[:80]!r}")
    content = []
    if parts[0]:
        content.append({"type": "text", "text": parts[0]})
    content.append({"type": "image", "text": None})
    if parts[1]:
        content.append({"type": "text", "text": parts[1]})
    return [{"role": "user", "content": content}]
