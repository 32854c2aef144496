"""Prompt images processed and encoded once per distinct image of a GRPO generation batch, not once per rollout
and phase.

A GRPO generation batch repeats each prompt ``num_generations`` (G) times, and every phase of a step runs the model on
the whole batch: the rollout prefill, the old and reference log-probs (TRL ``_generate_and_score_completions``) and
the policy forward of the loss (TRL ``_compute_loss``). A frozen vision tower (Mirage keeps it frozen) would encode
each prompt image G times in each of these phases. :class:`VisionFeatureCache`, installed on the model's backbone
(policy and reference share one: their frozen towers are copies), wraps ``get_image_features``, the one call through
which every path reaches the tower (``mirage_rl.latent.embed_inputs``, the backbone's own ``forward``): distinct images
are encoded once, in one tower call, and later calls with the same pixels reuse the features (every output of the
tower per image: the merged visual tokens, and the DeepStack features of a family that has them; the family splits and
rebuilds the output object, :mod:`mirage_rl.backbones`).

Before the tower, TRL runs the image processor on the prompt images twice per generation batch (``_tokenize_prompts``
for the rollout, then ``_generate_and_score_completions`` for the forward passes), each time on every rollout's copy.
:class:`ImageProcessingCache`, active on the processor's image processor while a generation batch is built and
scored, preprocesses each distinct image (matched by a hash of its pixels, mode, size and the call's arguments) once.

Images are matched exactly: a key of the grid and two integer sums of the pixel bit patterns (exact and independent of
the batch an image comes in), then ``torch.equal`` on the pixels. The cache is bypassed while the tower has trainable
parameters (its features then change with every optimizer step and carry gradients). The trainer clears it at every
new generation batch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import torch
from transformers.feature_extraction_utils import BatchFeature

from . import backbones, latent
from .backbones import ImageFeatures
from .patching import is_patched, original, patch_method, unpatch_method

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _key(pixels: torch.Tensor, grid: tuple[int, ...]) -> tuple:
    bits = pixels.contiguous().view(-1).view(_BITS[pixels.element_size()]).long()
    weights = torch.arange(bits.numel(), device=bits.device) % 65521 + 1
    sums = torch.stack([bits.sum(), (bits * weights).sum()]).tolist()  # int64: exact, wraps on overflow
    return (grid, pixels.dtype, *sums)


class VisionFeatureCache:
    """Per-image vision-tower outputs of the current generation batch.

    Attributes:
        images_encoded: images that went through the tower since construction (the test and bench counter).
        images_reused: images answered from the cache or from a duplicate in the same call.
    """

    def __init__(self):
        self._entries: dict[tuple, list[tuple[torch.Tensor, ImageFeatures]]] = {}
        self.images_encoded = 0
        self.images_reused = 0

    def clear(self) -> None:
        """Forget every stored image (call when a new generation batch starts)."""
        self._entries.clear()

    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())

    def install(self, model) -> None:
        """Route ``get_image_features`` of ``model``'s backbone (PEFT-wrapped or not) through this cache. Idempotent;
        installing another cache on the same backbone replaces the first."""
        bb = latent.backbone(model)
        if not is_patched(bb, "get_image_features"):
            patch_method(bb, "get_image_features", _cached_get_image_features)
        bb._mirage_vision_cache = self

    def _find(self, key: tuple, pixels: torch.Tensor) -> ImageFeatures | None:
        for stored, feats in self._entries.get(key, ()):
            if torch.equal(stored, pixels):
                return feats
        return None

    def image_features(self, encode, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                       family: backbones.Backbone | None = None) -> list[ImageFeatures]:
        """The features of every image, encoding only those not seen since :meth:`clear`.

        Args:
            encode: the backbone's original ``get_image_features``.
            pixel_values: ``(P, C*T*p*p)`` flattened patches of N images. image_grid_thw: ``(N, 3)`` long.
            family: the model's family, which splits ``encode``'s output per image (default Qwen2.5-VL's).
        Returns:
            N :class:`~mirage_rl.backbones.ImageFeatures` (merged tokens ``(tokens_i, H)`` and DeepStack features).
        """
        family = family or backbones.get(backbones.DEFAULT)
        grids = [tuple(g) for g in image_grid_thw.tolist()]
        pieces = torch.split(pixel_values, [t * h * w for t, h, w in grids])
        out: list[ImageFeatures | None] = [None] * len(grids)
        pending: dict[tuple, list[tuple[torch.Tensor, list[int]]]] = {}  # key -> [(pixels, rows waiting)]
        for i, (pixels, grid) in enumerate(zip(pieces, grids)):
            key = _key(pixels, grid)
            out[i] = self._find(key, pixels)
            if out[i] is not None:
                self.images_reused += 1
                continue
            for stored, rows in pending.setdefault(key, []):
                if torch.equal(stored, pixels):
                    rows.append(i)
                    self.images_reused += 1
                    break
            else:
                pending[key].append((pixels, [i]))
        todo = [(key, pixels, rows) for key, group in pending.items() for pixels, rows in group]
        if todo:
            first = [rows[0] for _, _, rows in todo]
            feats = family.split_encoder_output(encode(torch.cat([p for _, p, _ in todo]), image_grid_thw[first],
                                                       return_dict=True), image_grid_thw[first])
            self.images_encoded += len(todo)
            for (key, pixels, rows), f in zip(todo, feats):
                self._entries.setdefault(key, []).append((pixels, f))
                for i in rows:
                    out[i] = f
        return out


def _cached_get_image_features(self, pixel_values, image_grid_thw=None, **kwargs):
    """The backbone's ``get_image_features`` through the installed :class:`VisionFeatureCache` (bypassed while the
    tower trains, or for calls with extra arguments)."""
    cache = self._mirage_vision_cache
    encode = original(self, "get_image_features")
    if (image_grid_thw is None or kwargs != {"return_dict": True}
            or any(p.requires_grad for p in self.visual.parameters())):
        return encode(pixel_values, image_grid_thw, **kwargs)
    family = backbones.of(self)
    return family.encoder_output(cache.image_features(encode, pixel_values, image_grid_thw, family))


class ImageProcessingCache:
    """Per-image outputs (``pixel_values`` rows, ``image_grid_thw`` row) of an image processor in the current
    generation batch.

    Attributes:
        images_processed: images that went through the image processor since construction.
        images_reused: images answered from the cache or from a duplicate in the same call.
    """

    KEYS = {"pixel_values", "image_grid_thw"}

    def __init__(self):
        self._entries: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.images_processed = 0
        self.images_reused = 0

    def clear(self) -> None:
        """Forget every stored image (call when a new generation batch starts)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    @contextlib.contextmanager
    def active(self, image_processor):
        """Route ``image_processor.preprocess`` (what ``__call__`` runs) through this cache inside the block, then
        restore it and forget the block's images. (The wrapper lives on the instance only inside the block:
        ``save_pretrained`` serializes the instance's attributes.)"""
        if is_patched(image_processor, "preprocess"):
            raise RuntimeError("the image processor's preprocess is already wrapped (nested ImageProcessingCache.active)")
        patch_method(image_processor, "preprocess",
                     functools.partial(_cached_preprocess, cache=self, original=image_processor.preprocess))
        try:
            yield self
        finally:
            unpatch_method(image_processor, "preprocess")
            self.clear()

    def preprocess(self, original, images: list, kwargs: dict) -> BatchFeature | None:
        """The processor's output for the flat list of PIL ``images``, preprocessing only unseen images; None when the
        processor's output is not Qwen-style (``pixel_values`` rows + ``image_grid_thw``) (the caller then runs the
        processor itself). ``kwargs["return_tensors"]``: ``"pt"``, or ``None``/``"np"`` for numpy arrays."""
        kwargs = dict(kwargs)
        numpy = kwargs.pop("return_tensors", None) != "pt"
        call = repr(sorted(kwargs.items()))
        keys = [(img.mode, img.size, hashlib.blake2b(img.tobytes(), digest_size=16).digest(), call) for img in images]
        todo = list(dict.fromkeys(k for k in keys if k not in self._entries))
        if todo:
            first = {k: keys.index(k) for k in todo}
            out = original([images[first[k]] for k in todo], return_tensors="pt", **kwargs)
            px, grid = out.get("pixel_values"), out.get("image_grid_thw")
            if set(out.keys()) != self.KEYS or not (torch.is_tensor(px) and torch.is_tensor(grid)):
                return None
            for k, p, g in zip(todo, torch.split(px, grid.prod(-1).tolist()), grid):
                self._entries[k] = (p, g)
            self.images_processed += len(todo)
        self.images_reused += len(keys) - len(todo)
        parts = [self._entries[k] for k in keys]
        data = {"pixel_values": torch.cat([p for p, _ in parts]), "image_grid_thw": torch.stack([g for _, g in parts])}
        return BatchFeature({k: v.numpy() for k, v in data.items()} if numpy else data)


def _cached_preprocess(self, images, *args, cache: ImageProcessingCache, original, **kwargs):
    """``preprocess`` through ``cache`` for PIL images (returned as torch tensors or numpy arrays); anything else goes
    to the original."""
    from PIL import Image
    from transformers.image_utils import make_flat_list_of_images

    if args or kwargs.get("return_tensors") not in (None, "np", "pt"):
        return original(images, *args, **kwargs)
    flat = make_flat_list_of_images(images)
    if not flat or not all(isinstance(img, Image.Image) for img in flat):
        return original(images, *args, **kwargs)
    out = cache.preprocess(original, flat, kwargs)
    return original(images, *args, **kwargs) if out is None else out
