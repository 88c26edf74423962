"""The colour ops on float planes (aclip.data.colour, PlanarColour) against Pillow's own ops and
the PIL view pipeline they replaced: the same pixels bit for bit, the same random draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from aclip.data import colour
from aclip.data.views import (
    ACLIPViews,
    PlanarColour,
    _Normalize,
    adjust_hue,
    boxes_in_union,
    colour_augment,
    image_tensor,
    resize_box,
    to_pil,
    to_rgb,
    union_box,
)


def planes(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as contiguous float32 planes [3, H, W]."""
    arr = np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))
    return torch.from_numpy(arr.astype(np.float32))


def images(n: int = 12) -> list[Image.Image]:
    """Random-noise, smooth, saturated, grey and extreme images (ties, zero chroma, 0 and 255)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        h, w = 23 + i, 31 + 2 * i
        kind = i % 4
        if kind == 0:
            arr = rng.integers(0, 256, (h, w, 3))
        elif kind == 1:
            yy, xx = np.mgrid[0:h, 0:w]
            arr = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) % 256], -1)
        elif kind == 2:
            arr = rng.choice([0, 1, 127, 128, 254, 255], (h, w, 3))
        else:
            arr = np.repeat(rng.integers(0, 256, (h, w, 1)), 3, -1)
            arr[: h // 2, :, 0] = arr[: h // 2, :, 1]  # ties between two max channels
        out.append(Image.fromarray(arr.astype(np.uint8)))
    return out


FACTORS = [0.0, 0.3, 0.6, 0.8765432, 1.0, 1.2345678, 1.4, 2.5]
HUES = [-0.5, -0.1, -0.0370001, 0.0, 0.02, 0.0999999, 0.5]


@pytest.mark.parametrize(
    ("ours", "pil"),
    [
        (colour.brightness, TF.adjust_brightness),
        (colour.contrast, TF.adjust_contrast),
        (colour.saturation, TF.adjust_saturation),
    ],
)
def test_blend_ops_equal_pillow_bit_for_bit(ours, pil):
    for img in images():
        x = planes(img)
        for factor in FACTORS + [float(torch.empty(1).uniform_(0.6, 1.4)) for _ in range(4)]:
            assert torch.equal(ours(x.clone(), factor), planes(pil(img, factor))), factor


def test_hue_grayscale_solarize_equal_their_pil_paths():
    for img in images():
        x = planes(img)
        for factor in HUES:
            ref = planes(adjust_hue(img, factor))
            assert torch.equal(colour.hue(x.clone(), factor), ref), factor  # torch (the GPU path)
            hue_only = _draw(order=(3,), factors=(1, 1, 1, factor))
            numpy_planes = PlanarColour.apply(x.clone(), hue_only)
            assert torch.equal(numpy_planes, ref)  # numpy (the CPU path)
        assert torch.equal(colour.grayscale(x.clone()), planes(TF.rgb_to_grayscale(img, 3)))
        assert torch.equal(colour.solarize(x.clone()), planes(TF.solarize(img, 128)))


def test_ops_take_one_factor_per_image_of_a_batch():
    batch = torch.stack([planes(img.resize((20, 16))) for img in images(4)])
    factors = torch.tensor([0.7, 1.0, 1.3, 0.9]).view(4, 1, 1, 1)
    hues = torch.tensor([-0.1, 0.0, 0.05, 0.1]).view(4, 1, 1, 1)
    for op, fs in ((colour.brightness, factors), (colour.contrast, factors),
                   (colour.saturation, factors), (colour.hue, hues)):  # fmt: skip
        out = op(batch.clone(), fs)
        for i in range(4):
            assert torch.equal(out[i], op(batch[i].clone(), float(fs[i]))), op.__name__


def _draw(order=None, factors=(1.0, 1.0, 1.0, 0.0), gray=False, sigma=None, solarize=False):
    from aclip.data.views import ColourDraw

    return ColourDraw(order, factors, gray, sigma, solarize)


def test_planar_colour_draws_like_colour_augment_and_gives_its_pixels():
    """Same draws from torch's RNG (the RNG ends in the same state) and the same pixels as the
    PIL pipeline, over many seeds (every op, order, grayscale, blur and solarize occur)."""
    planar, reference = PlanarColour(), colour_augment()
    seen = {"jitter": 0, "gray": 0, "blur": 0, "solarize": 0}
    for seed in range(120):
        img = images()[seed % 12]
        torch.manual_seed(seed)
        ref = reference(img)
        after_ref = torch.rand(1)
        torch.manual_seed(seed)
        draw = planar.draw()
        out = planar.apply(planes(img), draw)  # planes it may overwrite
        assert torch.equal(torch.rand(1), after_ref), seed
        assert torch.equal(out, planes(ref)), (seed, draw)
        seen["jitter"] += draw.order is not None
        seen["gray"] += draw.gray
        seen["blur"] += draw.blur_sigma is not None
        seen["solarize"] += draw.solarize
    assert min(seen.values()) >= 5, seen


def reference_views(views: ACLIPViews, img: Image.Image) -> dict[str, torch.Tensor]:
    """The view pipeline before the planar colour ops: PIL colour augmentation per view."""
    img = to_rgb(img)
    boxes = views.sample_boxes(img)
    union = union_box(boxes)
    pixels, size, norm = image_tensor(img), views.image_size, views.normalize
    ema = torch.empty(3, views.ema_size, views.ema_size, dtype=norm.dtype)
    norm(resize_box(pixels, union, views.ema_size), ema)
    out = torch.empty(views.num_views, 3, size, size, dtype=norm.dtype)
    augment = colour_augment()
    for view_out, box in zip(out, boxes, strict=True):
        norm(augment(to_pil(resize_box(pixels, box, size))), view_out)
    return {"ema": ema, "views": out, "boxes": boxes_in_union(boxes, union)}


@pytest.mark.parametrize("normalize", [False, True])
def test_views_are_the_pil_pipelines_views_bit_for_bit(normalize):
    rng = np.random.default_rng(1)
    views = ACLIPViews(40, num_views=2, normalize=normalize)
    for seed in range(40):
        h, w = rng.integers(40, 90, 2)
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        torch.manual_seed(seed)
        ref = reference_views(views, img)
        after_ref = torch.rand(1)
        torch.manual_seed(seed)
        out = views(img)
        assert torch.equal(torch.rand(1), after_ref)
        for key in ("views", "ema", "boxes"):
            assert torch.equal(out[key], ref[key]), (seed, key)


def test_float_planes_are_stored_as_the_uint8_or_normalised_pixels():
    img = images(1)[0]
    x = planes(img)
    for enabled in (False, True):
        norm = _Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), enabled=enabled)
        a, b = torch.empty(x.shape, dtype=norm.dtype), torch.empty(x.shape, dtype=norm.dtype)
        norm(x, a)
        norm(img, b)
        assert torch.equal(a, b)
