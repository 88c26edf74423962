"""A-CLIP's colour augmentation on float colour planes: Pillow's arithmetic, batched or not.

The view pipeline's colour ops (ColorJitter's brightness, contrast, saturation and hue,
grayscale, solarize; docs/design.md, A-CLIP step 1) as torch ops on float32 tensors
``[..., 3, H, W]`` that hold whole numbers 0..255, so that a chain of ops needs no uint8
conversions between ops. Each op reproduces, bit for bit, what its Pillow path computes on an
8-bit RGB image (tests/test_colour.py compares them on random images):

- brightness, contrast, saturation are Pillow's ``Image.blend(degenerate, image, factor)``
  (``ImageEnhance``, as torchvision's PIL functions call it): per byte
  ``(UINT8) clip(deg + (float)factor * (img - deg), 0, 255)`` in float32, truncated; the
  degenerate image is black, the rounded mean luma, or the luma image;
- luma is ``convert("L")``: ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16`` (exact in float32:
  every partial sum is an integer below 2^24);
- hue is :func:`aclip.data.views.adjust_hue` (our exact-HSV rotation), the same float32 ops in
  the same order;
- solarize is ``ImageOps.solarize(img, 128)``: ``v if v < 128 else 255 - v``.

Factors broadcast over the leading dimensions (a [B, 1, 1, 1] tensor gives each image its
own), so the same code serves one view on a loader core and a batch on the GPU. The ops work
in place (they overwrite and return ``x_3HW``): fresh buffers cost more than the arithmetic
on a loader core. Operands are contiguous planes; torch's CPU kernels are slow on operands
broadcast along the inner dimensions, or strided.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

_LUMA_WEIGHTS = (19595.0, 38470.0, 7471.0)
_HUE_OFFSETS = (5.0, 3.0, 1.0)  # n of R, G, B in the closed form of HSV -> RGB


def f32(value: float) -> float:
    """``value`` rounded to float32, as Pillow's C code receives a Python float factor."""
    return float(np.float32(value))


def _factor(value: float | Tensor) -> float | Tensor:
    return f32(value) if isinstance(value, float | int) else value.float()


def luma(x_3HW: Tensor) -> Tensor:
    """Pillow's ``convert("L")`` of RGB planes ``[..., 3, H, W]`` -> ``[..., H, W]``."""
    r, g, b = x_3HW.unbind(-3)
    total = torch.mul(r, _LUMA_WEIGHTS[0])
    total.add_(g, alpha=_LUMA_WEIGHTS[1])  # fused or not: every term is an integer < 2^24
    total.add_(b, alpha=_LUMA_WEIGHTS[2])
    total += 32768.0
    return total.mul_(1.0 / 65536.0).floor_()


def blend(x_3HW: Tensor, degenerate: Tensor | float, factor: float | Tensor) -> Tensor:
    """Pillow's ``Image.blend(degenerate, x, factor)``: ``deg + factor * (x - deg)`` in
    float32, clipped to [0, 255] and truncated (floored: it is >= 0), in place."""
    x_3HW -= degenerate
    x_3HW *= _factor(factor)
    x_3HW += degenerate
    return x_3HW.clamp_(0.0, 255.0).floor_()


def brightness(x_3HW: Tensor, factor: float | Tensor) -> Tensor:
    """``TF.adjust_brightness`` on PIL: blend with black (``0 + f * (x - 0)``), in place."""
    return x_3HW.mul_(_factor(factor)).clamp_(0.0, 255.0).floor_()


def contrast(x_3HW: Tensor, factor: float | Tensor) -> Tensor:
    """``TF.adjust_contrast`` on PIL: blend with the image's mean luma, rounded half up
    (``int(ImageStat.Stat(L).mean[0] + 0.5)``, in float64 as Pillow's Python code does), in
    place."""
    lum = luma(x_3HW)
    count = lum.shape[-1] * lum.shape[-2]
    mean = (lum.sum(dim=(-2, -1), dtype=torch.float64) / count + 0.5).floor_()
    return blend(x_3HW, mean.float()[..., None, None, None], factor)


def saturation(x_3HW: Tensor, factor: float | Tensor) -> Tensor:
    """``TF.adjust_saturation`` on PIL: blend with the luma image (``convert("L")``), in
    place: :func:`blend`'s operations, plane by plane (no broadcast along the planes)."""
    lum, factor = luma(x_3HW), _factor(factor)
    if isinstance(factor, Tensor):
        factor = factor.squeeze(-3)  # [..., 1, 1, 1] -> [..., 1, 1], as the planes
    for plane in x_3HW.unbind(-3):
        plane.sub_(lum).mul_(factor).add_(lum)
    return x_3HW.clamp_(0.0, 255.0).floor_()


def grayscale(x_3HW: Tensor) -> Tensor:
    """``TF.rgb_to_grayscale(img, 3)`` on PIL: the luma in all three planes, in place."""
    return x_3HW.copy_(luma(x_3HW).unsqueeze(-3).expand_as(x_3HW))


def solarize(x_3HW: Tensor) -> Tensor:
    """``ImageOps.solarize(img, 128)``: values of 128 and above become 255 - v, in place
    (``v + [v >= 128] * (255 - 2 v)``, whole numbers: exact; comparisons are slow here)."""
    upper = x_3HW.mul(1.0 / 128.0).floor_()  # 1 for 128..255, 0 below
    return x_3HW.add_(upper.mul_(x_3HW.mul(-2.0).add_(255.0)))


def hue(x_3HW: Tensor, factor: float | Tensor) -> Tensor:
    """:func:`aclip.data.views.adjust_hue` (exact HSV hue rotation by ``factor`` turns, then
    rounded), the same float32 operations in the same order, written into ``x_3HW``."""
    r, g, b = x_3HW.unbind(-3)
    vmax = torch.maximum(torch.maximum(r, g), b)
    chroma = vmax - torch.minimum(torch.minimum(r, g), b)
    is_r = r == vmax
    is_g = (g == vmax) & ~is_r
    # hue in sixths of a turn, times chroma: each branch is an integer, exact in float32
    hue6 = torch.where(is_g, b - r + 2.0 * chroma, r - g + 4.0 * chroma)
    hue6 = torch.where(is_r, g - b, hue6)
    hue6 /= chroma.clamp(min=1.0)
    if isinstance(factor, float | int):
        hue6 += f32(6.0 * factor)
    else:  # float32 factors: 6 * factor in float32 is the float32 rounding of the exact product
        hue6 += factor.float().squeeze(-3) * 6.0
    for plane, offset in zip(x_3HW.unbind(-3), _HUE_OFFSETS, strict=True):
        k = hue6 + offset
        k -= torch.floor(k * f32(1.0 / 6.0)).mul_(6.0)
        weight = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        torch.sub(vmax, weight.mul_(chroma), out=plane)
        plane.add_(0.5).floor_()
    return x_3HW
