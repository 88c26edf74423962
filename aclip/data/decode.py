"""Decoding one raw webdataset sample into an RGB image and its caption, refusing bad ones."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

from PIL import Image

from aclip.data.skips import BadSample, SkipStats
from aclip.data.views import to_rgb

IMAGE_EXTS = ("jpg", "png", "jpeg", "webp")
EXT_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}  # Pillow's names
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # the only decoders an image member reaches
MAX_DECODE_PIXELS = 32 * 1024 * 1024  # ~100 MB as RGB; larger images are reduced or skipped
MIN_IMAGE_SIDE = 8  # smaller images carry no usable content for 2 random crops: skipped


def _caption(sample: dict, url: str, stats: SkipStats | None) -> str:
    """The sample's caption. Non-UTF-8 bytes are decoded with U+FFFD replacements and the
    sample is kept (counted as "caption_not_utf8"); a missing or blank caption is skipped."""
    raw = sample.get("txt")
    if raw is None:
        raise BadSample("no_caption", f"sample {sample.get('__key__')} has no caption", url)
    try:
        caption = raw.decode("utf-8")
    except UnicodeDecodeError:
        caption = raw.decode("utf-8", errors="replace")
        if stats is not None:
            stats.convert("caption_not_utf8")
    caption = caption.strip()
    if not caption:
        raise BadSample(
            "empty_caption", f"sample {sample.get('__key__')} has an empty caption", url
        )
    return caption


def image_formats(ext: str) -> tuple[str, ...]:
    """The Pillow formats an image member named ``.ext`` may be decoded as: the extension's own
    format first, then the other formats of IMAGE_EXTS (a PNG named .jpg decodes, as
    webdataset's own decoder, a plain ``PIL.Image.open`` in webdataset/autodecode.py
    ``ImageHandler``, takes it). Pillow's other plugins are never tried: EPS bytes named .jpg
    must not reach its Ghostscript launcher."""
    own = EXT_FORMATS[ext.lower()]
    return (own, *(f for f in IMAGE_FORMATS if f != own))


def open_image(data: bytes, ext: str, key: str, url: str) -> Image.Image:
    """Read an image member's header (no pixel decode) with the decoders of
    ``image_formats(ext)`` only. PIL's decompression-bomb warning is silenced (our own
    MAX_DECODE_PIXELS guard applies, see `check_pixels`) and its error becomes a "too_large"
    skip; bytes of no such format are a "corrupt_image" skip."""
    if not data:
        raise BadSample("empty_image", f"sample {key} has a zero-byte image", url)
    formats = image_formats(ext)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as exn:
        raise BadSample("too_large", f"sample {key}: {exn}", url) from exn
    except Image.UnidentifiedImageError as exn:
        what = f"its .{ext} member is not a {', '.join(formats)} image"
        raise BadSample("corrupt_image", f"sample {key}: {what} ({exn})", url) from exn
    except Exception as exn:
        raise BadSample("corrupt_image", f"sample {key}: {exn!r}", url) from exn


def _check_size(img: Image.Image, key: str, url: str, stats: SkipStats | None) -> None:
    """Skip tiny images; guard huge ones (`check_pixels`)."""
    w, h = img.size
    if min(w, h) < MIN_IMAGE_SIDE:
        raise BadSample("too_small", f"sample {key} is {w}x{h} (< {MIN_IMAGE_SIDE})", url)
    check_pixels(img, key, url, stats)


def check_pixels(img: Image.Image, key: str, url: str, stats: SkipStats | None = None) -> None:
    """Before an opened image's pixels are decoded: decode a huge JPEG reduced (draft) to at
    most MAX_DECODE_PIXELS (counted "reduced_large" in ``stats``) and refuse any other image
    of more than MAX_DECODE_PIXELS ("too_large")."""
    w, h = img.size
    if w * h <= MAX_DECODE_PIXELS:
        return
    if img.format == "JPEG":
        # draft picks the smallest 1/2^k scale keeping each side >= the request, so asking for
        # half the target scale gives at most the target pixel count.
        scale = math.sqrt(MAX_DECODE_PIXELS / (w * h)) / 2
        img.draft(None, (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))))
        if img.size[0] * img.size[1] <= MAX_DECODE_PIXELS:
            if stats is not None:
                stats.convert("reduced_large")
            return
    raise BadSample("too_large", f"sample {key} is {w}x{h} (> {MAX_DECODE_PIXELS} px)", url)


# Local files (ImageFolder trees, Karpathy, segmentation and ImageNet-S folders): the extensions
# torchvision's ImageFolder accepts, each with its own Pillow decoder and no other.
FILE_FORMATS = {**EXT_FORMATS, "ppm": "PPM", "pgm": "PPM", "bmp": "BMP", "tif": "TIFF",
                "tiff": "TIFF"}  # fmt: skip


def open_image_file(path: str | Path) -> Image.Image:
    """Open a local image file as the training members are read: only the decoder its
    extension names (`image_formats`; BMP, PPM and TIFF also for their own extensions), never
    Pillow's other plugins (an EPS file named .jpg must not reach Ghostscript), and the
    MAX_DECODE_PIXELS guard before any pixel is decoded (`check_pixels`). The caller loads it.
    Raises ValueError naming the file for anything else."""
    path = Path(path)
    ext = path.suffix[1:].lower()
    if ext not in FILE_FORMATS:
        raise ValueError(f"{path}: not an image file this reader opens (.{ext}; it opens "
                         f"{', '.join('.' + e for e in FILE_FORMATS)})")  # fmt: skip
    formats = (FILE_FORMATS[ext], *(f for f in IMAGE_FORMATS if f != FILE_FORMATS[ext]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path, formats=formats)
    except (Image.UnidentifiedImageError, Image.DecompressionBombError) as exn:
        raise ValueError(f"{path}: not a {', '.join(formats)} image ({exn})") from exn
    try:
        check_pixels(img, str(path), str(path))
    except BadSample:
        img.close()
        raise
    return img


def load_image_file(path: str) -> Image.Image:
    """An ImageFolder loader (``loader=``): `open_image_file`, decoded, ``convert("RGB")`` as
    torchvision's default ``pil_loader`` does."""
    with open_image_file(path) as img:
        return img.convert("RGB")


def _decode_image(sample: dict, url: str, stats: SkipStats | None) -> Image.Image:
    """The sample's image as 8-bit RGB; non-RGB modes are converted (counted)."""
    key = str(sample.get("__key__"))
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise BadSample("no_image", f"sample {key} has no image", url)
    with open_image(sample[ext], ext, key, url) as img:
        _check_size(img, key, url, stats)
        try:
            img.load()
        except Exception as exn:
            raise BadSample("corrupt_image", f"sample {key}: {exn!r}", url) from exn
        if img.mode != "RGB" and stats is not None:
            stats.convert("mode_converted")
        rgb = to_rgb(img)
        if rgb is img:
            rgb = img.copy()  # the context manager closes `img`
    return rgb


def decode_sample(sample: dict, stats: SkipStats | None = None) -> tuple[Image.Image, str, str]:
    """Raw webdataset sample -> (RGB PIL image, caption, sample id).

    Raises `BadSample` (reason in SKIP_REASONS) on unusable samples; conversions (non-RGB
    image, reduced huge JPEG, non-UTF-8 caption) are counted in `stats` if given.
    """
    url = str(sample.get("__url__", ""))
    caption = _caption(sample, url, stats)
    rgb = _decode_image(sample, url, stats)
    return rgb, caption, f"{url}/{sample.get('__key__')}"
