"""The GPU view path (data.augment_on=gpu), its device code run on CPU tensors: the same
random draws as the CPU path, exact equality where the operations are the same (colour ops on
equal inputs), the resize against torch's antialiased resize, and the views' statistics against
the CPU path's on the same samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_config
from PIL import Image, ImageFilter
from torch.nn import functional as F

from aclip.data.gpu_views import (
    DeviceViewInputs,
    augment_batch,
    colour_batch,
    crop_resize,
    gaussian_blur,
)
from aclip.data.transform import collate
from aclip.data.views import ACLIPViews, ColourDraw, PlanarColour, image_tensor, resize_box


def photo(seed: int, h: int = 70, w: int = 90) -> Image.Image:
    """Smooth colour texture (a low-pass of noise: resizes and blurs behave as on photos)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 6 + 2, w // 6 + 2, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def test_crop_resize_is_torchs_antialiased_resize_of_the_crop():
    img = photo(0, 80, 100)
    canvas = image_tensor(img)[0]
    boxes = [(0, 0, 100, 80), (10, 5, 70, 65), (30, 20, 48, 36), (1, 2, 99, 41)]
    for size in (24, 40, 64):  # down- and up-scaling
        ours = crop_resize(canvas[None].expand(4, -1, -1, -1),
                           torch.tensor(boxes, dtype=torch.float32), size)  # fmt: skip
        for out, (x0, y0, x1, y1) in zip(ours, boxes, strict=True):
            crop = canvas[None, :, y0:y1, x0:x1].float()
            ref = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0]
            assert (out - ref).abs().max() <= 0.5 + 1e-3  # equal before rounding
            cpu_u8 = resize_box(image_tensor(img), (x0, y0, x1, y1), size).float()
            diff = (out - cpu_u8).abs()
            # the uint8 kernel rounds between its two passes: ~10 % of pixels differ by one level
            assert diff.max() <= 1 and diff.mean() < 0.3


def _cpu_and_device(seed: int, img: Image.Image, size: int = 32):
    """One sample through both loaders' halves (32 px: a 56-px canvas, as 224 px from 256-px
    images: the union box fits)."""
    torch.manual_seed(seed)
    cpu = ACLIPViews(size, normalize=False)(img)
    after_cpu = torch.rand(1)
    torch.manual_seed(seed)
    dev = DeviceViewInputs(size, normalize=False)(img)
    assert torch.equal(torch.rand(1), after_cpu)  # the same draws, in the same order
    return cpu, dev


def test_device_inputs_draw_what_the_cpu_path_draws():
    planar = PlanarColour()
    for seed in range(10):
        img = photo(seed, 40, 52)
        cpu, dev = _cpu_and_device(seed, img)
        assert torch.equal(cpu["boxes"], dev["boxes"])
        torch.manual_seed(seed)
        ACLIPViews(32).sample_boxes(img)
        expected = torch.tensor([planar.draw().as_row() for _ in range(2)])
        assert torch.equal(dev["colour"], expected)
        assert dev["canvas"].shape == (3, 56, 56) and dev["view_boxes"].shape == (3, 4)
        x0, y0, x1, y1 = dev["view_boxes"][2].tolist()  # the union, at the canvas's corner
        assert (x0, y0) == (0, 0) and torch.equal(
            dev["canvas"][:, int(y1) :], torch.zeros_like(dev["canvas"][:, int(y1) :])
        )


def test_a_union_larger_than_the_canvas_is_shrunk_to_fit():
    img = photo(1, 100, 100)  # every crop is >= 71 px wide or high: the union exceeds 56
    torch.manual_seed(0)
    dev = DeviceViewInputs(32, normalize=False)(img)
    boxes = dev["view_boxes"]
    assert boxes[:, 2:].max() <= 56 and boxes[2, 2:].max() == 56  # its long side fills it
    made = augment_batch(collate([dev]), 32)
    assert made["views"].shape == (1, 2, 3, 32, 32) and made["ema"].shape == (1, 3, 32, 32)


def test_colour_ops_on_the_device_equal_the_cpu_path_on_equal_inputs():
    """Given the same resized pixels and draws, the batched ops give the CPU path's pixels
    exactly (blur aside: Pillow's box blur is another filter)."""
    planar, views, draws = PlanarColour(), [], []
    for seed in range(24):
        torch.manual_seed(seed)
        draw = planar.draw()
        draw = ColourDraw(draw.order, draw.factors, draw.gray, None, draw.solarize)
        views.append(image_tensor(photo(seed, 32, 32))[0].float())
        draws.append(draw)
    batch = torch.stack(views)
    out = colour_batch(batch.clone(), torch.tensor([d.as_row() for d in draws]))
    for i, draw in enumerate(draws):
        assert torch.equal(out[i], PlanarColour.apply(views[i].clone(), draw)), draw


def test_gaussian_blur_matches_pillows_blur_in_distribution():
    img = photo(3, 64, 64)
    x = image_tensor(img)[0].float()
    sigmas = torch.tensor([0.0, 0.5, 1.2, 2.0])
    out = gaussian_blur(x[None].expand(4, -1, -1, -1).contiguous(), sigmas)
    assert torch.equal(out[0], x)  # sigma 0: unchanged
    for i in (1, 2, 3):
        pil = Image.fromarray(np.asarray(img)).filter(ImageFilter.GaussianBlur(float(sigmas[i])))
        ref = torch.from_numpy(np.asarray(pil).transpose(2, 0, 1).astype(np.float32))
        inner = (out[i] - ref)[:, 4:-4, 4:-4].abs()
        assert inner.mean() < 1.0 and inner.max() <= 6, (float(sigmas[i]), inner.mean())
        assert (out[i] - x).abs().mean() > 0.3  # it did blur


def test_device_views_have_the_cpu_views_statistics():
    """The same 96 samples through both paths: the EMA view and the un-augmented views agree to
    a level, and the augmented views' pixel statistics agree."""
    cpu_samples, dev_samples = [], []
    for seed in range(96):
        cpu, dev = _cpu_and_device(seed, photo(seed, 40, 52))
        cpu_samples.append(cpu)
        dev_samples.append(dev)
    cpu, dev = collate(cpu_samples), collate(dev_samples)
    made = augment_batch(dev, 32)
    assert made["views"].dtype == torch.uint8 and made["views"].shape == cpu["views"].shape
    ema_diff = (made["ema"].float() - cpu["ema"].float()).abs()
    assert ema_diff.max() <= 1 and ema_diff.mean() < 0.3  # as in the resize test
    plain = dev["colour"][:, :, 0] == 0  # no jitter ...
    plain &= (dev["colour"][:, :, 9:12] == 0).all(-1)  # ... nor grayscale, blur, solarize
    assert plain.sum() >= 5
    a, b = made["views"][plain].float(), cpu["views"][plain].float()
    assert (a - b).abs().max() <= 1
    a, b = made["views"].float(), cpu["views"].float()
    assert (a.mean() - b.mean()).abs() < 0.5
    assert (a.std() / b.std() - 1).abs() < 0.01
    per_view = (a.mean(dim=(2, 3, 4)) - b.mean(dim=(2, 3, 4))).abs()
    assert per_view.median() < 0.5 and (a == b).float().mean() > 0.5


@pytest.mark.parametrize("method", ["aclip", "clip"])
def test_a_method_trains_on_device_views(tmp_path, method):
    """augment_on=gpu through the method's loss: the batch of canvases becomes the views on
    the device, and the loss is the CPU batch's to within the resize's rounding."""
    from aclip.methods import get_method
    from aclip.methods.base import RunContext

    extra = {"method": method} | ({"mask.num_views": 1, "loss.w_simclr": 0,
                                   "loss.w_byol": 0} if method == "clip" else {})  # fmt: skip
    losses = []
    for where in ("cpu", "gpu"):
        cfg = tiny_config(str(tmp_path), **extra, **{"data.augment_on": where})
        ctx = RunContext(torch.device("cpu"), 0, 1, 100, torch.float32, False)
        m = get_method(cfg.method)(cfg, ctx)
        torch.manual_seed(0)
        student = m.build_student()
        m.attach(student)
        views = m.sample_views()
        assert isinstance(views, DeviceViewInputs) == (where == "gpu")
        samples = []
        for seed in range(8):
            torch.manual_seed(seed)
            sample = views(photo(seed))
            sample["tokens"] = torch.tensor([49406, 320, 1125, 49407] + [0] * 12)
            samples.append(sample)
        batch = collate(samples)
        student.eval()  # no dropout; BatchNorm in eval: the two batches are compared alone
        losses.append(float(m.loss(student, batch, step=0).total.detach()))
        if method == "aclip":  # the trainer's pictures, from a stream batch (with scalars)
            grid = m.images(batch | {"skipped": torch.tensor(0)}, step=0, n=2)
            assert grid["masking/kept_tokens"].shape[0] == 3
    assert np.isfinite(losses).all() and abs(losses[0] - losses[1]) < 0.05 * abs(losses[0])
