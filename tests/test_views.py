"""Tests for aclip.data.views: box geometry, crop/EMA correspondence, shapes, determinism."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.ops import roi_align
from torchvision.transforms import functional as TF

from aclip.data.views import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ACLIPViews,
    ColorJitter,
    adjust_hue,
    boxes_in_union,
    eval_transform,
    model_input,
    normalize_images,
    to_rgb,
    union_box,
)


def gradient_image(w: int = 200, h: int = 160) -> Image.Image:
    """Smooth image: R ramps with x, G ramps with y, B constant (known pixel values)."""
    xs = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    ys = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    arr = np.stack([xs, ys, np.full_like(xs, 90.0)], -1)
    return Image.fromarray(arr.round().astype(np.uint8))


def test_union_and_normalised_boxes():
    boxes = [(10, 20, 50, 60), (30, 5, 90, 40)]
    union = union_box(boxes)
    assert union == (10, 5, 90, 60)
    norm = boxes_in_union(boxes, union)
    expected = torch.tensor(
        [[0.0, 15 / 55, 40 / 80, 1.0], [20 / 80, 0.0, 1.0, 35 / 55]], dtype=torch.float32
    )
    torch.testing.assert_close(norm, expected)


@pytest.mark.parametrize("seed", range(5))
def test_boxes_in_range_and_union_touches_edges(seed):
    torch.manual_seed(seed)
    out = ACLIPViews(32, num_views=2)(gradient_image())
    boxes = out["boxes"]
    assert boxes.shape == (2, 4)
    assert (boxes >= 0).all() and (boxes <= 1).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert boxes[:, 0].min().item() == 0.0 and boxes[:, 1].min().item() == 0.0
    assert boxes[:, 2].max().item() == 1.0 and boxes[:, 3].max().item() == 1.0


def test_crop_area_scale_range():
    views = ACLIPViews(16, num_views=1, scale=(0.5, 1.0))
    img = gradient_image(300, 200)
    for seed in range(20):
        torch.manual_seed(seed)
        (x0, y0, x1, y1) = views.sample_boxes(img)[0]
        area = (x1 - x0) * (y1 - y0) / (300 * 200)
        assert 0.5 - 0.02 <= area <= 1.0
        assert 0 <= x0 < x1 <= 300 and 0 <= y0 < y1 <= 200


@pytest.mark.parametrize("seed", range(4))
def test_online_view_matches_ema_region_under_box(seed):
    """With colour aug off, view v == the EMA view resampled under boxes[v] (box correspondence)."""
    torch.manual_seed(seed)
    size = 48
    out = ACLIPViews(size, num_views=2, color_aug=False)(gradient_image())
    ema = out["ema"][None]  # [1, 3, S, S]
    for v in range(2):
        box = out["boxes"][v] * size
        rois = torch.cat([torch.zeros(1), box])[None]
        region = roi_align(ema, rois, output_size=size, spatial_scale=1.0, aligned=True)[0]
        err = (region - out["views"][v]).abs()
        # 1 pixel step of the ramp is ~ 255 / 200 / 255 / 0.27 = 0.02 in normalised units.
        assert err[:, 2:-2, 2:-2].mean() < 0.01, err.mean()
        assert err[:, 2:-2, 2:-2].max() < 0.05, err.max()


def test_online_view_pixel_values_match_original():
    """Without colour aug the view is the box of the original, bilinearly resized, normalised."""
    torch.manual_seed(0)
    img = gradient_image()
    views = ACLIPViews(40, num_views=1, color_aug=False)
    torch.manual_seed(0)
    (x0, y0, x1, y1) = views.sample_boxes(img)[0]
    torch.manual_seed(0)
    out = views(img)
    ref = np.asarray(img.resize((40, 40), Image.Resampling.BILINEAR, box=(x0, y0, x1, y1)))
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    ref_t = (torch.from_numpy(ref.copy()).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(out["views"][0], ref_t, atol=1e-5, rtol=0)


def test_shapes_dtypes_and_colour_aug_changes_pixels():
    torch.manual_seed(0)
    out = ACLIPViews(32, num_views=3)(gradient_image())
    assert out["views"].shape == (3, 3, 32, 32) and out["views"].dtype == torch.float32
    assert out["ema"].shape == (3, 32, 32) and out["ema"].dtype == torch.float32
    assert out["boxes"].shape == (3, 4) and out["boxes"].dtype == torch.float32
    # Normalised range of uint8 pixels under CLIP mean/std.
    assert out["views"].min() >= -1.80 and out["views"].max() <= 2.15
    changed = 0
    for seed in range(10):
        torch.manual_seed(seed)
        a = ACLIPViews(32, num_views=1)(gradient_image())
        torch.manual_seed(seed)
        b = ACLIPViews(32, num_views=1, color_aug=False)(gradient_image())
        changed += int(not torch.allclose(a["views"], b["views"]))
        torch.testing.assert_close(a["boxes"], b["boxes"])  # colour ops do not move boxes
    assert changed >= 6  # P(no colour op applied) = 0.2 * 0.8 * 0.9 * 0.8 ~ 0.12


def test_determinism_under_seed():
    img = gradient_image()
    views = ACLIPViews(32, num_views=2)
    torch.manual_seed(123)
    a = views(img)
    torch.manual_seed(123)
    b = views(img)
    torch.manual_seed(124)
    c = views(img)
    for k in ("views", "ema", "boxes"):
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["boxes"], c["boxes"])


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16", "I", "LA"])
def test_non_rgb_modes(mode):
    base = gradient_image(64, 48)
    if mode == "I;16":
        arr = (np.asarray(base.convert("L")).astype(np.uint16) * 257).astype(np.uint16)
        img = Image.fromarray(arr)
        assert img.mode == "I;16"
    elif mode == "I":
        img = base.convert("L").convert("I")
    else:
        img = base.convert(mode)
    rgb = to_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == (64, 48)
    if mode in ("I;16", "I", "L"):
        np.testing.assert_allclose(np.asarray(rgb)[..., 0], np.asarray(base.convert("L")), atol=1)
    out = ACLIPViews(24)(img)
    assert out["views"].shape == (2, 3, 24, 24)


def test_eval_transform_matches_formula():
    img = gradient_image(120, 80)
    t = eval_transform(40)(img)
    assert t.shape == (3, 40, 40)
    # Resize shorter side 80 -> 40 (x0.5), centre crop width 60 -> 40: columns 10..50.
    resized = img.resize((60, 40), Image.Resampling.BICUBIC)
    ref = np.asarray(resized)[:, 10:50].astype(np.float32) / 255
    mean, std = np.array(OPENAI_CLIP_MEAN), np.array(OPENAI_CLIP_STD)
    ref_t = torch.from_numpy(((ref - mean) / std).transpose(2, 0, 1)).float()
    torch.testing.assert_close(t, ref_t, atol=0.05, rtol=0)


def _random_rgb(seed: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    arr[:4] = arr[:4, :, :1]  # some grey pixels (zero chroma)
    arr[4:8, :, 0] = arr[4:8, :, 1]  # and ties between the max channels
    return Image.fromarray(arr)


@pytest.mark.parametrize("factor", [-0.5, -0.1, -0.037, 0.0, 0.05, 0.1, 0.5])
def test_fast_hue_matches_torchvision_hsv_hue(factor):
    """Same HSV hue rotation as torchvision's (exact) tensor path, within one uint8 level."""
    img = _random_rgb(int(abs(factor) * 1000))
    ours = torch.from_numpy(np.asarray(adjust_hue(img, factor)).astype(np.int16))
    ref = TF.adjust_hue(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), factor)
    diff = (ours.permute(2, 0, 1) - ref.to(torch.int16)).abs()
    assert diff.max() <= 1, diff.max()
    if factor == 0.0:
        assert np.array_equal(np.asarray(adjust_hue(img, factor)), np.asarray(img))


def test_fast_hue_keeps_value_and_chroma_and_refuses_bad_factors():
    img = _random_rgb(7)
    arr, out = np.asarray(img).astype(int), np.asarray(adjust_hue(img, 0.3)).astype(int)
    assert np.abs(out.max(-1) - arr.max(-1)).max() <= 1
    assert np.abs((out.max(-1) - out.min(-1)) - (arr.max(-1) - arr.min(-1))).max() <= 1
    grey = img.convert("L")
    assert adjust_hue(grey, 0.2) is grey
    with pytest.raises(ValueError):
        adjust_hue(img, 0.6)


def test_colour_jitter_draws_like_torchvision():
    """Our ColorJitter takes the same parameter draws from torch's RNG, in the same order, as
    torchvision's: without hue the outputs are identical, and the RNG ends in the same state."""
    img = gradient_image(64, 48)
    for seed in range(5):
        torch.manual_seed(seed)
        ours = np.asarray(ColorJitter(0.4, 0.4, 0.2)(img))
        after_ours = torch.rand(1)
        torch.manual_seed(seed)
        ref = np.asarray(T.ColorJitter(0.4, 0.4, 0.2)(img))
        assert np.array_equal(ours, ref) and torch.equal(after_ours, torch.rand(1))
        torch.manual_seed(seed)
        ColorJitter(0.4, 0.4, 0.2, 0.1)(img)
        after_ours = torch.rand(1)
        torch.manual_seed(seed)
        T.ColorJitter(0.4, 0.4, 0.2, 0.1)(img)
        assert torch.equal(after_ours, torch.rand(1))


def test_uint8_output_normalised_later_equals_normalised_output():
    img = gradient_image()
    torch.manual_seed(3)
    ref = ACLIPViews(32, num_views=2)(img)
    torch.manual_seed(3)
    raw = ACLIPViews(32, num_views=2, normalize=False)(img)
    assert raw["views"].dtype == torch.uint8 and raw["ema"].dtype == torch.uint8
    torch.testing.assert_close(raw["boxes"], ref["boxes"])
    for key in ("views", "ema"):
        torch.testing.assert_close(normalize_images(raw[key]), ref[key], rtol=0, atol=1e-5)
        torch.testing.assert_close(model_input(raw[key]), ref[key], rtol=0, atol=1e-5)
        assert model_input(ref[key]) is ref[key]  # float: already normalised
        assert model_input(raw[key], torch.bfloat16).dtype == torch.bfloat16
