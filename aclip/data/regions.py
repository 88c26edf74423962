"""Region-text samples (Alpha-CLIP): region masks from img2dataset shards, and their views.

A training sample's regions come from either

- its ``.json`` member's ``regions`` list: ``{"caption": str, "mask": <COCO RLE>}`` (``{"size":
  [h, w], "counts": str | list}``, compressed or not, decoded with pycocotools) or
  ``{"caption": str, "bbox": [x, y, w, h]}`` (COCO's box, made a box-shaped mask by
  pycocotools' own ``frPyObjects``, so a box and its RLE decode alike); or
- a ``.mask.png`` member (the mask, the image's size: grey levels / 255 as alpha, a palette
  image's non-zero indices as 1) with the sample's ``.txt`` as the region's caption.

A sample with neither trains as a full-image pair. :class:`RegionViews` draws, per sample and
step, one region (or with probability ``full_image_prob`` the full caption with an all-ones
alpha, the paper's and official code's ``common_pair`` = 0.1), decodes only that region's mask
and sends it through the image's own crop and resize. A mask that cannot be used (undecodable,
another size than the image, empty, a malformed region entry) skips the sample as ``bad_mask``,
counted like a bad image.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from aclip.data.decode import MAX_DECODE_PIXELS, open_image
from aclip.data.skips import BadSample
from aclip.data.views import ACLIPViews, colour_augment, image_tensor, resize_box, to_pil, to_rgb

MASK_MEMBER = "mask.png"
FULL_ALPHA = 255  # uint8 alpha of "all ones"


@dataclass(frozen=True)
class Region:
    """One region of a sample, not yet decoded: its caption and where its mask is."""

    caption: str
    kind: str  # "rle", "bbox" or "png"
    data: Any  # the RLE dict, the [x, y, w, h] box, or the PNG bytes


def _where(sample: Mapping[str, Any]) -> tuple[str, str]:
    return f"sample {sample.get('__key__')}", str(sample.get("__url__", ""))


def _bad(sample: Mapping[str, Any], why: str) -> BadSample:
    where, url = _where(sample)
    return BadSample("bad_mask", f"{where}: {why}", url)


def sample_regions(sample: Mapping[str, Any], caption: str) -> list[Region]:
    """The regions of a raw sample (nothing decoded yet): a ``.mask.png`` member with the
    sample's ``caption``, else the ``.json`` member's ``regions``; [] for neither.

    Raises:
        BadSample: ``bad_mask`` for a ``regions`` entry that is not a caption with one mask or
            box, or a ``.json`` that is not JSON while it is needed.
    """
    if MASK_MEMBER in sample:
        return [Region(caption, "png", sample[MASK_MEMBER])]
    raw = sample.get("json")
    if raw is None:
        return []
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise _bad(sample, f".json is not JSON ({err})") from None
    entries = meta.get("regions") if isinstance(meta, dict) else None
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise _bad(sample, f"'regions' must be a list (got {type(entries).__name__})")
    return [_region(sample, i, entry) for i, entry in enumerate(entries)]


def _region(sample: Mapping[str, Any], i: int, entry: Any) -> Region:
    if not isinstance(entry, dict):
        raise _bad(sample, f"regions[{i}] is not an object")
    text = entry.get("caption")
    if not isinstance(text, str) or not text.strip():
        raise _bad(sample, f"regions[{i}] has no caption")
    kinds = [k for k in ("mask", "bbox") if k in entry]
    if len(kinds) != 1:
        raise _bad(sample, f"regions[{i}] needs exactly one of 'mask' (RLE) or 'bbox'")
    kind = "rle" if kinds[0] == "mask" else "bbox"
    return Region(text.strip(), kind, entry[kinds[0]])


def decode_region(
    region: Region, size_hw: tuple[int, int], sample: Mapping[str, Any]
) -> np.ndarray:
    """A region's mask as uint8 [H, W] (0-255) for an image of ``size_hw``.

    Raises:
        BadSample: ``bad_mask`` when it cannot be decoded, has another size (a PNG's is read
            from its header, before its pixels), is empty, or the image is larger than
            MAX_DECODE_PIXELS.
    """
    h, w = size_hw
    if h * w > MAX_DECODE_PIXELS:
        raise _bad(sample, f"image {w}x{h} is larger than {MAX_DECODE_PIXELS} px for a mask")
    try:
        mask = (
            _png_mask(sample, region.data, h, w)
            if region.kind == "png"
            else _coco_mask(region, h, w)
        )
    except BadSample:
        raise
    except Exception as err:
        raise _bad(sample, f"{region.kind} mask not decodable ({err!r})") from None
    if mask.shape != (h, w):
        raise _bad(sample, f"{region.kind} mask is {mask.shape[1]}x{mask.shape[0]}, image {w}x{h}")
    if not mask.any():
        raise _bad(sample, f"{region.kind} mask of {region.caption!r} is empty")
    return mask


def _coco_mask(region: Region, h: int, w: int) -> np.ndarray:
    """COCO RLE (compressed or not) or an [x, y, w, h] box, decoded by pycocotools: 0/255."""
    from pycocotools import mask as mask_utils

    if region.kind == "bbox":
        box = np.asarray(region.data, dtype=np.float64)
        if box.shape != (4,) or not np.isfinite(box).all() or box[2] <= 0 or box[3] <= 0:
            raise ValueError(f"bbox must be [x, y, w, h] with w, h > 0 (got {region.data!r})")
        rle = mask_utils.frPyObjects(box[None], h, w)[0]
    else:
        rle = _rle(region.data, h, w)
    mask = mask_utils.decode(rle)
    # pycocotools decodes counts that do not cover the image without an error (the rest is
    # uninitialised memory): a valid RLE re-encodes to itself
    if mask.max(initial=0) > 1 or mask_utils.encode(mask)["counts"] != rle["counts"]:
        raise ValueError("RLE counts do not encode an h x w mask (corrupt or truncated)")
    return mask.astype(np.uint8) * 255


def _rle(data: Any, h: int, w: int) -> dict:
    """A COCO RLE dict in pycocotools' form; its ``size`` must be the image's."""
    from pycocotools import mask as mask_utils

    if not isinstance(data, dict) or "size" not in data or "counts" not in data:
        raise ValueError("an RLE mask is {'size': [h, w], 'counts': ...}")
    size = [int(v) for v in data["size"]]
    if size != [h, w]:
        raise ValueError(f"RLE size {size} is not the image's [h, w] = {[h, w]}")
    counts = data["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        if sum(int(c) for c in counts) != h * w:
            raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, not h * w = {h * w}")
        return mask_utils.frPyObjects({"size": size, "counts": counts}, h, w)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": size, "counts": counts}


def _png_mask(sample: Mapping[str, Any], data: bytes, h: int, w: int) -> np.ndarray:
    """A ``.mask.png``: grey levels (``L``; ``1`` as 0/255) as they are, a palette image's
    non-zero indices as 255, other modes through ``L``. Opened by the image decoders only
    (`open_image`), its size checked against the image's (h, w) from its header, before any
    pixel is decoded: a 20 KB PNG can claim 13000 x 13000."""
    try:
        img = open_image(data, "png", str(sample.get("__key__")), _where(sample)[1])
    except BadSample as err:
        raise _bad(sample, f"png mask not decodable ({err})") from None
    with img:
        if img.size != (w, h):
            raise _bad(sample, f"png mask is {img.width}x{img.height}, image {w}x{h}")
        img.load()
        if img.mode == "P":
            return (np.asarray(img) != 0).astype(np.uint8) * 255
        return np.asarray(img if img.mode == "L" else img.convert("L"), dtype=np.uint8).copy()


def pad_to_square(pixels_1CHW: torch.Tensor) -> torch.Tensor:
    """Zero-pad an image tensor to a square, centred (the shorter side split (d // 2, rest)), as
    the official Alpha-CLIP training data does before its resize."""
    h, w = pixels_1CHW.shape[-2:]
    d = abs(h - w)
    pad = (0, 0, d // 2, d - d // 2) if w > h else (d // 2, d - d // 2, 0, 0)
    return F.pad(pixels_1CHW, pad) if d else pixels_1CHW


class RegionViews:
    """Alpha-CLIP's per-sample transform: one region-text pair per sample and step.

    ``view="pad"`` (official code, ``Alpha_GRIT``): the whole image zero-padded to a square and
    resized to the image size, no colour augmentation unless ``color_aug``; the mask padded and
    resized with it. ``view="crop"``: one RandomResizedCrop(``scale``) view as CLIP's, the mask
    through the same crop (it may cut the region). Image and mask take the same antialiased
    bilinear resize (the official code resizes the image bicubic, the mask bilinear), so the
    mask follows the image exactly. Returns uint8 "views" [1, 3, S, S] and "alpha"
    [1, 1, S, S] (normalise with ``normalize_alpha`` on the device).
    """

    def __init__(
        self,
        image_size: int,
        full_image_prob: float = 0.1,
        view: str = "pad",
        scale: tuple[float, float] = (0.5, 1.0),
        color_aug: bool = False,
    ) -> None:
        if view not in ("pad", "crop"):
            raise ValueError(f"view must be pad or crop (got {view!r})")
        self.image_size, self.full_image_prob, self.view = image_size, full_image_prob, view
        self.color = colour_augment() if color_aug else None
        self.crop = ACLIPViews(image_size, 1, scale, color_aug=color_aug, normalize=False,
                               ema_view=False)  # fmt: skip

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        """A full-image pair (all-ones alpha) of an image without its sample."""
        return self._views(to_rgb(img), None)

    def from_sample(
        self, img: Image.Image, caption: str, sample: Mapping[str, Any]
    ) -> tuple[dict[str, torch.Tensor], str]:
        """Draw the pair: full (probability ``full_image_prob``, or no regions) or one region
        chosen uniformly; its mask decoded and through the image's views."""
        regions = sample_regions(sample, caption)
        full = bool(torch.rand(()) < self.full_image_prob)
        if full or not regions:
            return self._views(img, None), caption
        region = regions[int(torch.randint(len(regions), ()))]
        mask = decode_region(region, (img.height, img.width), sample)
        return self._views(img, torch.from_numpy(mask)), region.caption

    def _views(self, img: Image.Image, mask_HW: torch.Tensor | None) -> dict[str, torch.Tensor]:
        size = self.image_size
        if self.view == "crop":
            out = self.crop(img, mask_HW)
            if mask_HW is None:  # all ones: inside any crop
                out["alpha"] = torch.full((1, 1, size, size), FULL_ALPHA, dtype=torch.uint8)
            return {"views": out["views"], "alpha": out["alpha"]}
        pixels = pad_to_square(image_tensor(img))
        side = pixels.shape[-1]
        view = resize_box(pixels, (0, 0, side, side), size)
        if self.color is not None:
            view = _chw(self.color(to_pil(view)))
        if mask_HW is None:  # the official full pair: ones everywhere, the padding too
            alpha = torch.full((1, size, size), FULL_ALPHA, dtype=torch.uint8)
        else:
            padded = pad_to_square(mask_HW.view(1, 1, *mask_HW.shape))
            alpha = resize_box(padded, (0, 0, side, side), size)
        return {"views": view.contiguous()[None], "alpha": alpha.contiguous()[None]}


def _chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1)))


def box_of(mask_HW: np.ndarray) -> tuple[int, int, int, int]:
    """The pixel box (x0, y0, x1, y1) holding a mask's non-zero pixels (x1, y1 exclusive)."""
    ys, xs = np.nonzero(mask_HW)
    if not len(xs):
        raise ValueError("empty mask has no box")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def rle_of(mask_HW: np.ndarray) -> dict[str, Any]:
    """A binary mask as a compressed COCO RLE, JSON-ready (``counts`` as text)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray((mask_HW > 0).astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
