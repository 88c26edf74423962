"""A-CLIP's views made on the device (``data.augment_on=gpu``).

The loader decodes each image on its CPU core and draws everything random exactly as the CPU
path does (the crop boxes, then each view's colour choices, from the same seeded RNG:
:class:`DeviceViewInputs`), but resizes and colours nothing: it sends the union box of the
crops, the only pixels any view reads, on a fixed-size uint8 canvas, with each view's box on
that canvas and its colour draws. :func:`augment_batch` then makes the whole batch's views on
the device: every crop + antialiased bilinear resize as two batched matrix products (the
separable filter of Pillow / torch ``antialias=True`` as weight matrices, one per sample), the
colour ops of :mod:`aclip.data.colour` with per-sample factors (the same float32 arithmetic as
the CPU path: equal pixels for equal inputs), and a true Gaussian blur (Pillow's is a box-blur
approximation: equal in distribution, not in pixels). The code runs on any device; the tests
run it on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

from aclip.data import colour
from aclip.data.views import ACLIPViews, boxes_in_union, image_tensor, to_rgb, union_box

DRAW_WIDTH = 12  # ColourDraw.as_row: jitter, order x4, factors x4, gray, sigma, solarize
BLUR_TAPS = 13  # 2 * ceil(3 * sigma_max) + 1 for sigma <= 2: the kernel does not truncate
CANVAS_KEYS = ("canvas", "view_boxes", "colour")


def canvas_size(image_size: int) -> int:
    """Default canvas side: 1.6x the image size, rounded up to 8 (360 px at 224: the union of
    crops of a 256 x 341 image fits; larger unions are shrunk to fit)."""
    return 8 * math.ceil(image_size * 1.6 / 8)


class DeviceViewInputs(ACLIPViews):
    """The loader's half of the GPU path: per image {"canvas" uint8 [3, C, C], "view_boxes"
    [V + 1, 4] (each view's pixel box on the canvas, then the EMA view's: the union), "colour"
    [V, 12] (the views' colour draws, zeros without colour augmentation), "boxes" [V, 4] (as
    the CPU path: each view's box in the union's normalised coordinates)}.

    The draws are the CPU path's, in its order (boxes, then each view's colour choices), so
    the same seed gives the same boxes and colour parameters on both paths.
    """

    def __init__(self, *args, canvas: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.canvas = canvas or canvas_size(self.image_size)

    def __call__(self, img: Image.Image) -> dict[str, Tensor]:
        """The canvas, boxes and draws of one PIL image."""
        img = to_rgb(img)
        boxes = self.sample_boxes(img)
        union = union_box(boxes)
        draws = torch.zeros(self.num_views, DRAW_WIDTH)
        if self.color is not None:
            for row in draws:
                row.copy_(torch.tensor(self.color.draw().as_row()))
        x0, y0, x1, y1 = union
        w, h = x1 - x0, y1 - y0
        shrink = min(1.0, self.canvas / w, self.canvas / h)
        pixels = image_tensor(img)
        if shrink < 1.0:  # rare (very long images): fit the union, keep the aspect
            tw = max(1, min(self.canvas, round(w * shrink)))
            th = max(1, min(self.canvas, round(h * shrink)))
            region = F.interpolate(pixels[:, :, y0:y1, x0:x1].contiguous(), size=(th, tw),
                                   mode="bilinear", antialias=True)[0]  # fmt: skip
        else:
            region, tw, th = pixels[0, :, y0:y1, x0:x1], w, h
        canvas = torch.zeros(3, self.canvas, self.canvas, dtype=torch.uint8)
        canvas[:, :th, :tw] = region
        sx, sy = tw / w, th / h
        rows = [((bx0 - x0) * sx, (by0 - y0) * sy, (bx1 - x0) * sx, (by1 - y0) * sy)
                for bx0, by0, bx1, by1 in [*boxes, union]]  # fmt: skip
        return {
            "canvas": canvas,
            "view_boxes": torch.tensor(rows, dtype=torch.float32),
            "colour": draws,
            "boxes": boxes_in_union(boxes, union),
        }


def resize_weights(start_B: Tensor, length_B: Tensor, out: int, size: int) -> Tensor:
    """Antialiased bilinear resampling of the span [start, start + length) of an axis of
    ``size`` pixels onto ``out`` pixels, as [B, out, size] weight matrices: Pillow's / torch's
    ``antialias=True`` triangle filter, widened by the scale when shrinking, over the span's
    pixels only (crop, then resize), normalised per output pixel."""
    start = start_B.float().view(-1, 1, 1)
    length = length_B.float().view(-1, 1, 1)
    scale = length / out
    support = scale.clamp(min=1.0)
    centre = start + (torch.arange(out, device=start.device).view(1, -1, 1) + 0.5) * scale
    pos = torch.arange(size, device=start.device, dtype=torch.float32).view(1, 1, -1)
    weight = (1.0 - ((pos + 0.5 - centre) / support).abs()).clamp(min=0.0)
    weight = weight * ((pos >= start.floor()) & (pos < (start + length).ceil()))
    return weight / weight.sum(dim=-1, keepdim=True).clamp(min=1e-12)


def crop_resize(canvas_B3HW: Tensor, boxes_B4: Tensor, out: int) -> Tensor:
    """Each sample's pixel box (x0, y0, x1, y1) of its canvas resized to out x out: float
    [B, 3, out, out], rounded to whole numbers in 0..255 (as a uint8 resize returns)."""
    _, _, height, width = canvas_B3HW.shape
    x0, y0, x1, y1 = boxes_B4.unbind(-1)
    rows = resize_weights(y0, y1 - y0, out, height)  # [B, out, H]
    cols = resize_weights(x0, x1 - x0, out, width)  # [B, out, W]
    resized = torch.matmul(rows.unsqueeze(1), canvas_B3HW.float())  # [B, 3, out, W]
    resized = torch.matmul(resized, cols.transpose(1, 2).unsqueeze(1))  # [B, 3, out, out]
    return resized.round_().clamp_(0.0, 255.0)


def gaussian_blur(x_B3HW: Tensor, sigma_B: Tensor) -> Tensor:
    """Per-sample Gaussian blur (sigma 0: unchanged, exactly), separable, reflect padding, the
    result rounded to whole numbers: one grouped convolution per axis for the whole batch."""
    batch, channels, height, width = x_B3HW.shape
    half = BLUR_TAPS // 2
    taps = torch.arange(-half, half + 1, device=x_B3HW.device, dtype=torch.float32)
    sigma = sigma_B.float().view(-1, 1)
    kernel = torch.exp(-0.5 * (taps / sigma.clamp(min=1e-6)) ** 2)
    kernel = torch.where(sigma > 0, kernel, (taps == 0).float())
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    flat = x_B3HW.reshape(1, batch * channels, height, width)
    flat = F.conv2d(F.pad(flat, (half, half, 0, 0), mode="reflect"),
                    kernel.view(-1, 1, 1, BLUR_TAPS), groups=batch * channels)  # fmt: skip
    flat = F.conv2d(F.pad(flat, (0, 0, half, half), mode="reflect"),
                    kernel.view(-1, 1, BLUR_TAPS, 1), groups=batch * channels)  # fmt: skip
    blurred = flat.view(batch, channels, height, width).round_().clamp_(0.0, 255.0)
    return torch.where(sigma.view(-1, 1, 1, 1) > 0, blurred, x_B3HW)


_JITTER_OPS = (colour.brightness, colour.contrast, colour.saturation, colour.hue)


def _masked(x_B3HW: Tensor, mask_B: Tensor, op, *args) -> Tensor:
    """``op`` on the samples of ``mask_B``, the others unchanged (no host synchronisation)."""
    return torch.where(mask_B.view(-1, 1, 1, 1), op(x_B3HW.clone(), *args), x_B3HW)


def colour_batch(x_B3HW: Tensor, draws_B12: Tensor) -> Tensor:
    """Each sample's colour draws (:meth:`ColourDraw.as_row`) applied to its float planes: the
    ops of :mod:`aclip.data.colour` in each sample's order, then grayscale, blur, solarize."""
    jitter = draws_B12[:, 0] > 0
    order = draws_B12[:, 1:5].long()
    factors = draws_B12[:, 5:9].view(-1, 4, 1, 1, 1)
    for pos in range(4):
        for op_id, op in enumerate(_JITTER_OPS):
            mask = jitter & (order[:, pos] == op_id)
            x_B3HW = _masked(x_B3HW, mask, op, factors[:, op_id])
    x_B3HW = _masked(x_B3HW, draws_B12[:, 9] > 0, colour.grayscale)
    x_B3HW = gaussian_blur(x_B3HW, draws_B12[:, 10])
    return _masked(x_B3HW, draws_B12[:, 11] > 0, colour.solarize)


def augment_batch(
    batch: Mapping[str, Tensor], image_size: int, ema_size: int | None = None
) -> dict[str, Tensor]:
    """The device's half of the GPU path: {"views": uint8 [B, V, 3, S, S], "ema": uint8
    [B, 3, E, E]} from a batch of :class:`DeviceViewInputs` samples (on the batch's device);
    ``ema_size`` is the EMA view's side (default ``image_size``; 0: no EMA view)."""
    canvas, boxes, draws = (batch[k] for k in CANVAS_KEYS)
    views = boxes.shape[1] - 1
    out = {}
    if ema_size != 0:
        ema = crop_resize(canvas, boxes[:, views], ema_size or image_size)
        out["ema"] = ema.to(torch.uint8)
    made = []
    for v in range(views):
        view = colour_batch(crop_resize(canvas, boxes[:, v], image_size), draws[:, v])
        made.append(view.to(torch.uint8))
    return out | {"views": torch.stack(made, dim=1)}


def on_device(batch: Mapping[str, Tensor], device: torch.device, image_size: int,
              ema_size: int | None) -> dict[str, Tensor]:  # fmt: skip
    """``batch`` with its views made on ``device`` if it came from :class:`DeviceViewInputs`
    (its canvas keys replaced by "views" and "ema"); any other batch is returned as it is."""
    if "canvas" not in batch:
        return dict(batch)
    moved = {k: batch[k].to(device, non_blocking=True) for k in CANVAS_KEYS}
    rest = {k: v for k, v in batch.items() if k not in CANVAS_KEYS}
    return rest | augment_batch(moved, image_size, ema_size)
