"""Opening images from disk with errors that name the file, and the pixel-budget check.

Every image the project reads from a path (benchmark maps, Mirage-format JSONL rows) goes through
:func:`open_image`; every image that meets a processor goes through :func:`check_pixel_budget`.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

#: An image whose area exceeds the processor's ``max_pixels`` budget by more than this factor is refused:
#: the processor would shrink it more than 4x per side, silently erasing the detail the task depends on.
MAX_DOWNSCALE_AREA = 16.0
#: The tiny offline model's image processor bounds (pixels): every VSP map (192..384 px square) becomes
#: 168x168 px = 12x12 patches = 6x6 merged visual tokens (``create-model --min_pixels/--max_pixels`` change them).
TINY_MIN_PIXELS, TINY_MAX_PIXELS = 164 * 164, 172 * 172
#: The largest image :func:`open_image` decodes (pixels, 40 megapixels: a 7300 x 5500 photo). A larger file is
#: refused by its header before decoding: every model here resizes to well under a megapixel, and PIL would only warn
#: (up to 179 megapixels) while the image takes gigabytes.
MAX_IMAGE_PIXELS = 40_000_000
#: The shortest side an image that meets a processor may have (pixels): one merged visual token of Qwen2.5-VL is
#: 28 x 28 px (patch 14, merge 2). A smaller image would be upscaled from (almost) nothing.
MIN_IMAGE_SIDE = 28


def size_problem(width: int, height: int) -> str | None:
    """Why an image of ``width`` x ``height`` pixels is refused (over :data:`MAX_IMAGE_PIXELS`, or a side under
    :data:`MIN_IMAGE_SIDE`), or None: the one size rule of every image mirage-rl reads from a path, a training split
    or a batch."""
    if width * height > MAX_IMAGE_PIXELS:
        return (f"image is {width}x{height} = {width * height / 1e6:.0f} megapixels, more than mirage-rl decodes "
                f"({MAX_IMAGE_PIXELS / 1e6:.0f}; data.images.MAX_IMAGE_PIXELS); resize it offline (no model here uses "
                "more than a few megapixels)")
    if min(width, height) < MIN_IMAGE_SIDE:
        return (f"image is {width}x{height} pixels, smaller than {MIN_IMAGE_SIDE} px on a side (one merged visual "
                "token; data.images.MIN_IMAGE_SIDE): the processor would upscale it from almost nothing. Use the real "
                "image, or remove the row")
    return None


def open_image(path: str | Path, where: str | None = None) -> Image.Image:
    """Open and fully decode the image at ``path``; returns an RGB ``PIL.Image``.

    Args:
        path: the file.
        where: what refers to it (``"data.jsonl:12 image_input"``), prefixed to every error.
    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is truncated, not an image, or of a size :func:`size_problem` refuses (read from its
            header, before decoding).
    """
    p = Path(path)
    label = f"{where}: " if where else ""
    if not p.is_file():
        raise FileNotFoundError(f"{label}image file {p} does not exist; fix the path (relative paths resolve "
                                "against the image_root folder) or remove the row")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below by its size instead
            im = Image.open(p)
        with im:
            problem = size_problem(*im.size)
            if problem is None:
                im.load()  # decode now: a truncated file fails here, not inside a training step
                return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ValueError(f"{label}{p}: image too large to decode safely ({e}); resize it offline") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{label}{p} is not a readable image ({type(e).__name__}: {e}); the file is truncated or "
                         "not an image: re-export it or remove the row") from None
    raise ValueError(f"{label}{p}: {problem}")


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
    """Refuse an image far larger than the processor's pixel budget (``MAX_DOWNSCALE_AREA`` times ``max_pixels``), or
    one :func:`size_problem` refuses.

    Raises:
        ValueError: naming ``where``, the image size, the budget and the fix.
    """
    w, h = image.size
    problem = size_problem(w, h)
    if problem is not None:
        raise ValueError(f"{where}: {problem}")
    if not max_pixels:
        return
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
