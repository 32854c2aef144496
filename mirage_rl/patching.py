"""Replacing a method on one object (never on a class): the one mechanism the project uses to route a library's call
through the latent core, with one way to undo it.

Used for: the SFT stages' latent forward on the model instance (``mirage_rl.trainers.sft_trainer``: DDP/DeepSpeed
wrappers call ``model.forward``), the GRPO backbone forward that takes ``latent_mask`` (``install_latent_forward``:
TRL's fused LM head calls the backbone), the vision-feature cache on ``get_image_features`` and the image-processing
cache on ``preprocess`` (``mirage_rl.image_cache``). The original stays reachable as ``obj._mirage_original_<name>``.
"""

from __future__ import annotations

import types

PREFIX = "_mirage_original_"


def patch_method(obj, name: str, fn, bind: bool = True) -> None:
    """Make ``obj.name`` call ``fn`` (bound to ``obj`` when ``bind``; else ``fn`` is used as it is). The first patch
    keeps the original as ``obj._mirage_original_<name>``; patching again replaces only the replacement."""
    if PREFIX + name not in vars(obj):
        setattr(obj, PREFIX + name, getattr(obj, name))
    setattr(obj, name, types.MethodType(fn, obj) if bind else fn)


def original(obj, name: str):
    """The method ``obj.name`` had before :func:`patch_method` (the current one when it was never patched)."""
    return vars(obj).get(PREFIX + name) or getattr(obj, name)


def is_patched(obj, name: str) -> bool:
    return PREFIX + name in vars(obj)


def unpatch_method(obj, name: str) -> None:
    """Undo :func:`patch_method`: ``obj.name`` is the original again (nothing happens when it was never patched)."""
    if PREFIX + name not in vars(obj):
        return
    saved = vars(obj)[PREFIX + name]
    delattr(obj, PREFIX + name)
    if name in vars(obj):
        delattr(obj, name)
    if getattr(obj, name) != saved:  # the original was itself an instance attribute: put it back
        setattr(obj, name, saved)
