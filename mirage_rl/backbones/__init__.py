"""Model families behind one small interface (issue 32): :class:`~.base.Backbone`, one instance per family, chosen
from the checkpoint's ``config.model_type``.

Supported: ``qwen2_5_vl`` (Qwen2.5-VL, :mod:`.qwen2_5_vl`) and ``qwen3_vl`` (Qwen3-VL, :mod:`.qwen3_vl`). Everything
family-specific lives in those two modules; the rest of mirage-rl asks :func:`of` (a model) or :func:`get` (a
``model_type``)."""

from __future__ import annotations

from .base import Backbone, ImageFeatures, VisualInjection, inject  # noqa: F401
from .qwen2_5_vl import QWEN2_5_VL
from .qwen3_vl import QWEN3_VL

#: the supported families by ``model_type``
BACKBONES: dict[str, Backbone] = {b.model_type: b for b in (QWEN2_5_VL, QWEN3_VL)}
#: their ``model_type`` values (``create-model --backbone``, messages)
NAMES = tuple(BACKBONES)
DEFAULT = QWEN2_5_VL.model_type


def supported() -> str:
    """``"qwen2_5_vl (Qwen2.5-VL), qwen3_vl (Qwen3-VL)"``: for messages."""
    return ", ".join(f"{b.model_type} ({b.name})" for b in BACKBONES.values())


def get(model_type: str | None, where: str = "model") -> Backbone:
    """The family of a ``model_type`` (a text sub-config's ``qwen3_vl_text`` names its family too).

    Raises:
        ValueError: an unsupported ``model_type`` (Qwen3.5, say), naming ``where`` and what is supported.
    """
    key = str(model_type or "")
    found = BACKBONES.get(key) or BACKBONES.get(key.removesuffix("_text"))
    if found is None:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported; mirage-rl trains and decodes "
                         f"{supported()} checkpoints: start from one, or from `mirage-rl create-model --backbone ...`")
    return found


def of(model) -> Backbone:
    """The family of a model (a ``*ForConditionalGeneration``, its backbone or text decoder, PEFT-wrapped or not).

    Raises:
        ValueError: a model of an unsupported family."""
    return get(getattr(getattr(model, "config", None), "model_type", None), type(model).__name__)
