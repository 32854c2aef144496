"""Opening images from disk with errors that name the file, and the pixel-budget check.

Every image the project reads from a path (benchmark maps, Mirage-format JSONL rows) goes through
:func:`open_image`; every image that meets a processor goes through :func:`check_pixel_budget`.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

#: An image whose area exceeds the processor's ``max_pixels`` budget by more than this factor is refused:
#: the processor would shrink it more than 4x per side, silently erasing the detail the task depends on.
MAX_DOWNSCALE_AREA = 16.0
#: The tiny offline model's image processor bounds (pixels): every VSP map (192..384 px square) becomes
#: 168x168 px = 12x12 patches = 6x6 merged visual tokens (``create-model --min_pixels/--max_pixels`` change them).
TINY_MIN_PIXELS, TINY_MAX_PIXELS = 164 * 164, 172 * 172


def open_image(path: str | Path, where: str | None = None) -> Image.Image:
    """Open and fully decode the image at ``path``; returns an RGB ``PIL.Image``.

    Args:
        path: the file.
        where: what refers to it (``"data.jsonl:12 image_input"``), prefixed to every error.
    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is truncated, not an image, or a decompression bomb (PIL's pixel limit).
    """
    p = Path(path)
    label = f"{where}: " if where else ""
    if not p.is_file():
        raise FileNotFoundError(f"{label}image file {p} does not exist; fix the path (relative paths resolve "
                                "against the image_root folder) or remove the row")
    try:
        with Image.open(p) as im:
            im.load()  # decode now: a truncated file fails here, not inside a training step
            return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ValueError(f"{label}{p}: image too large to decode safely ({e}); resize it offline") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{label}{p} is not a readable image ({type(e).__name__}: {e}); the file is truncated or "
                         "not an image: re-export it or remove the row") from None


def _pixels(image_processor, name: str, size_key: str) -> int | None:
    """``image_processor.<name>``, else its ``size["<name>"]`` or ``size["<size_key>"]`` (transformers 5 stores the
    pixel bounds of Qwen2-VL-style processors as areas under ``shortest_edge`` / ``longest_edge``)."""
    value = getattr(image_processor, name, None)
    size = getattr(image_processor, "size", None)
    if value is None and size is not None:
        get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
        value = get(name) or get(size_key)
    return int(value) if value else None


def pixel_budget(image_processor) -> int | None:
    """The most pixels a Qwen2-VL-style image processor keeps (``max_pixels``; transformers 5 stores it as
    ``size["longest_edge"]``, an area), or None when it has no such budget."""
    return _pixels(image_processor, "max_pixels", "longest_edge")


def check_pixel_budget(image: Image.Image, max_pixels: int | None, where: str) -> None:
    """Refuse an image far larger than the processor's pixel budget (``MAX_DOWNSCALE_AREA`` times ``max_pixels``).

    Raises:
        ValueError: naming ``where``, the image size, the budget and the fix.
    """
    if not max_pixels:
        return
    w, h = image.size
    if w * h > MAX_DOWNSCALE_AREA * max_pixels:
        raise ValueError(f"{where}: image is {w}x{h} = {w * h} pixels, more than {MAX_DOWNSCALE_AREA:g}x the "
                         f"processor's budget max_pixels={max_pixels}; the processor would shrink it by "
                         f"{(w * h / max_pixels) ** 0.5:.1f}x per side and erase its detail. Resize the image "
                         "offline or raise the image processor's max_pixels")


def visual_tokens(image_processor, width: int, height: int) -> int:
    """Merged visual tokens a Qwen2-VL-style image processor makes of a ``width`` x ``height`` image (after its
    resize to multiples of ``patch_size * merge_size`` within its pixel bounds): what stage 1 pools into k vectors."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    patch, merge = int(getattr(image_processor, "patch_size", 14)), int(getattr(image_processor, "merge_size", 2))
    lo = _pixels(image_processor, "min_pixels", "shortest_edge") or 56 * 56  # smart_resize's own defaults
    hi = pixel_budget(image_processor) or 14 * 14 * 4 * 1280
    h, w = smart_resize(height, width, factor=patch * merge, min_pixels=lo, max_pixels=hi)
    return (h // (patch * merge)) * (w // (patch * merge))


def encode_png(img) -> dict:
    """``{"bytes": PNG bytes, "path": None}``: an image as a ``datasets`` ``Image()`` cell."""
    # encoded once here: `datasets` stores the bytes as they are, and thousands of maps never sit in
    # memory as decoded images
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}
