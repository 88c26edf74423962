"""A-CLIP view sampling: two (or more) online crops, their union EMA view, and the crop boxes.

A-CLIP step 1 (docs/design.md): each online crop box is drawn like RandomResizedCrop (scale
0.5-1.0); the EMA view is the smallest box holding all the crops, resized to the model's image
size with no colour augmentation; each crop's box is kept in the EMA view's normalised
coordinates so that the teacher's relevance map can be cropped onto each online view. No
horizontal flip: it would break the box correspondence.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image, ImageFilter
from torch.nn import functional as F
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from aclip.data import colour

OPENAI_CLIP_MEAN: tuple[float, float, float] = tuple(OPENAI_DATASET_MEAN)
OPENAI_CLIP_STD: tuple[float, float, float] = tuple(OPENAI_DATASET_STD)
_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def to_rgb(img: Image.Image) -> Image.Image:
    """Return `img` as an 8-bit RGB image (handles L, LA, P, RGBA, CMYK, I, I;16, F)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def _chw(pixels: Image.Image | torch.Tensor) -> torch.Tensor:
    """A PIL RGB image as uint8 [3, H, W] (numpy's transpose copy: the cheapest way to planes);
    tensors pass through."""
    if isinstance(pixels, torch.Tensor):
        return pixels
    return torch.from_numpy(np.ascontiguousarray(np.asarray(pixels).transpose(2, 0, 1)))


class _Normalize:
    """uint8 RGB pixels -> normalised float CHW (= ToTensor + Normalize), written in place.

    The float ops run on whole colour planes: ~3x faster than normalising an HWC float tensor,
    whose size-3 inner dimension defeats vectorisation. ``enabled=False`` stores the uint8
    pixels as they are (see :func:`normalize_images`).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], enabled: bool = True) -> None:
        self.shift = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255.0
        self.scale = 1.0 / (torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255.0)
        self.enabled = enabled

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the stored pixels."""
        return torch.float32 if self.enabled else torch.uint8

    def __call__(self, pixels: Image.Image | torch.Tensor, out_CHW: torch.Tensor) -> None:
        """Store a PIL image, a uint8 [3, H, W] tensor or float planes holding whole numbers
        (:class:`PlanarColour`) into ``out_CHW``, normalised if on."""
        pixels = _chw(pixels)
        if pixels.is_floating_point() and not self.enabled:  # numpy's cast: 7x torch's here
            np.copyto(out_CHW.numpy(), pixels.numpy(), casting="unsafe")
            return
        out_CHW.copy_(pixels)
        if self.enabled:
            out_CHW.sub_(self.shift).mul_(self.scale)


def normalize_images(
    images: torch.Tensor,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 images [..., 3, H, W] (``ACLIPViews(normalize=False)``) -> normalised ``dtype``, on
    their device: the same values as the loader's own normalisation, 4x fewer bytes to move.
    The constants are made once per device (no host-to-device copy per call)."""
    shift, scale = _norm_constants(tuple(mean), tuple(std), images.device)
    return ((images.float() - shift) * scale).to(dtype)


def model_input(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Loader images as the model takes them: uint8 pixels (``ACLIPViews(normalize=False)``)
    are normalised here, on their device; float images are taken as already normalised."""
    if images.dtype == torch.uint8:
        return normalize_images(images, dtype=dtype)
    return images.to(dtype)


@functools.lru_cache(maxsize=8)
def _norm_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    norm = _Normalize(mean, std)
    return norm.shift.to(device), norm.scale.to(device)


def image_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 [1, 3, H, W] tensor (channels-last memory, one copy)."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).unsqueeze(0)


def resize_box(image_13HW: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """The pixel box (x0, y0, x1, y1) of a uint8 image resized to size x size: [3, S, S] uint8.

    Antialiased bilinear on uint8 (torch's vectorised path, same filter as Pillow's BILINEAR
    resize and equal to it inside the view; Pillow also reads pixels outside the box at the
    view's edges, this reads the box only, as crop-then-resize does). ~2x faster than Pillow.
    """
    x0, y0, x1, y1 = box
    crop = image_13HW[:, :, y0:y1, x0:x1].contiguous(memory_format=torch.channels_last)
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)
    return out[0]


def resize_mask(
    mask_HW: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], size: int
) -> torch.Tensor:
    """A uint8 mask [H, W] through each box's crop and resize as :func:`resize_box` does the
    image (the same antialiased bilinear, equal per channel): [V, 1, S, S] uint8."""
    mask_11HW = mask_HW.view(1, 1, *mask_HW.shape[-2:])
    return torch.stack([resize_box(mask_11HW, box, size) for box in boxes])


def to_pil(pixels_3HW: torch.Tensor) -> Image.Image:
    """A uint8 [3, H, W] tensor (channels-last memory) as a PIL RGB image."""
    return Image.fromarray(pixels_3HW.permute(1, 2, 0).contiguous().numpy())


class PILGaussianBlur:
    """Gaussian blur with sigma ~ U(lo, hi) drawn from torch's RNG, done by Pillow.

    Same blur as torchvision's GaussianBlur with a kernel wide enough not to truncate
    (sigma <= 2 here), about 5x faster on PIL images.
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        lo, hi = self.sigma
        sigma = lo + (hi - lo) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


def adjust_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    """Rotate the HSV hue of an RGB image by ``hue_factor`` turns (in [-0.5, 0.5]).

    The same operation as torchvision's ``adjust_hue`` (exact HSV arithmetic, as its tensor
    path; within 1 level of it after rounding), 2-3x faster than its PIL path, which round-trips
    through PIL's uint8 HSV (that quantises hue to 256 steps, so it is off by up to ~15 levels).
    Value (max) and chroma (max - min) are kept; only the hue moves (:func:`hue_planes`).
    Images not in RGB mode are returned unchanged (as torchvision does for L).
    """
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor must be in [-0.5, 0.5], got {hue_factor}")
    if img.mode != "RGB":
        return img
    planes = [np.asarray(band, dtype=np.float32) for band in img.split()]
    out = hue_planes(planes, hue_factor).astype(np.uint8)
    return Image.merge("RGB", [Image.fromarray(plane) for plane in out])


def hue_planes(rgb: Sequence[np.ndarray], hue_factor: float, out: np.ndarray | None = None
               ) -> np.ndarray:  # fmt: skip
    """:func:`adjust_hue` on float32 R, G, B planes holding whole numbers 0..255: the rotated
    planes [3, H, W], rounded to whole numbers (float32; into ``out`` if given, which may be
    the input). Branch-free numpy on colour planes (``np.where`` and float ``mod`` are the slow
    numpy ops, so neither is used), every temporary written in place."""
    r, g, b = rgb
    vmax = np.maximum(r, g)
    np.maximum(vmax, b, out=vmax)
    chroma = np.minimum(r, g)
    np.minimum(chroma, b, out=chroma)
    np.subtract(vmax, chroma, out=chroma)
    is_r = r == vmax
    is_g = np.greater(g == vmax, is_r)  # g is the max and r is not
    is_b = ~(is_r | is_g)
    hue6 = g - b  # hue in sixths of a turn, times chroma: [-1, 5] * chroma
    hue6 *= is_r
    tmp = np.multiply(chroma, 2.0)
    tmp += b - r
    tmp *= is_g
    hue6 += tmp
    np.multiply(chroma, 4.0, out=tmp)
    tmp += r - g
    tmp *= is_b
    hue6 += tmp
    hue6 /= np.maximum(chroma, 1.0, out=tmp)
    hue6 += 6.0 * hue_factor
    if out is None:
        out = np.empty((3, *hue6.shape), dtype=np.float32)
    for plane, n in zip(out, (5.0, 3.0, 1.0), strict=True):
        _hsv_channel(hue6, vmax, chroma, n, plane, tmp)
    return out


def _hsv_channel(hue6: np.ndarray, vmax: np.ndarray, chroma: np.ndarray, n: float,
                 k: np.ndarray, tmp: np.ndarray) -> None:  # fmt: skip
    """One RGB channel of HSV (hue in sixths, value, chroma), into ``k``:
    V - C * clip(min(k, 4 - k), 0, 1) with k = (n + hue6) mod 6; n = 5, 3, 1 for R, G, B (the
    closed form of HSV -> RGB), rounded to the nearest whole number (halves up, as the uint8
    cast of ``x + 0.5``). ``tmp`` is scratch space."""
    np.add(hue6, n, out=k)
    np.multiply(k, 1.0 / 6.0, out=tmp)
    np.floor(tmp, out=tmp)
    tmp *= 6.0
    k -= tmp
    np.subtract(4.0, k, out=tmp)
    np.minimum(k, tmp, out=k)
    np.clip(k, 0.0, 1.0, out=k)
    k *= chroma  # chroma * weight
    np.subtract(vmax, k, out=k)
    k += 0.5
    np.floor(k, out=k)


class ColorJitter(T.ColorJitter):
    """torchvision's ColorJitter (same parameter draws from torch's RNG, same random order of
    the four ops) with the hue step done by the fast :func:`adjust_hue`; PIL images only."""

    def forward(self, img: Image.Image) -> Image.Image:
        """Apply brightness, contrast, saturation and hue jitter in a random order."""
        order, bright, contrast, sat, hue = self.get_params(
            self.brightness, self.contrast, self.saturation, self.hue
        )
        for op in order.tolist():
            if op == 0 and bright is not None:
                img = TF.adjust_brightness(img, bright)
            elif op == 1 and contrast is not None:
                img = TF.adjust_contrast(img, contrast)
            elif op == 2 and sat is not None:
                img = TF.adjust_saturation(img, sat)
            elif op == 3 and hue is not None:
                img = adjust_hue(img, hue)
        return img


def colour_augment() -> T.Compose:
    """Per-view colour augmentation on PIL images (docs/design.md, A-CLIP step 1)."""
    return T.Compose(
        [
            T.RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([PILGaussianBlur((0.1, 2.0))], p=0.1),
            T.RandomSolarize(threshold=128, p=0.2),
        ]
    )


@dataclass(frozen=True)
class ColourDraw:
    """The random choices of :func:`colour_augment` for one view, in the order they are drawn:
    colour jitter applied or not, its op order and factors (brightness, contrast, saturation,
    hue), grayscale, the blur's sigma (None: no blur) and solarize."""

    order: tuple[int, ...] | None  # None: no colour jitter
    factors: tuple[float, float, float, float]
    gray: bool
    blur_sigma: float | None
    solarize: bool

    def as_row(self) -> list[float]:
        """12 numbers (for a batch on the GPU): jitter, order x4, factors x4, gray, sigma (0: no
        blur), solarize."""
        order = self.order or (0, 1, 2, 3)
        flags = [float(self.gray), self.blur_sigma or 0.0, float(self.solarize)]
        return [float(self.order is not None), *map(float, order), *self.factors, *flags]


class PlanarColour:
    """:func:`colour_augment` on float colour planes [3, H, W] (whole numbers 0..255; ops in
    :mod:`aclip.data.colour`): the same draws from torch's RNG in the same order, and the same
    pixels, bit for bit (tests/test_colour.py), without PIL images except for the blur (Pillow's
    box-blur approximation of a Gaussian, p=0.1). :meth:`draw` alone makes the choices (for the
    GPU path, which applies them to a batch on the device)."""

    P_JITTER, P_GRAY, P_BLUR, P_SOLARIZE = 0.8, 0.2, 0.1, 0.2
    SIGMA = (0.1, 2.0)

    def __init__(self) -> None:
        jitter = T.ColorJitter(0.4, 0.4, 0.2, 0.1)  # torchvision's parameter ranges
        self.ranges = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)

    def draw(self) -> ColourDraw:
        """Draw one view's choices exactly as ``colour_augment()`` does (RandomApply tests
        ``p < rand``, RandomGrayscale ``rand < p``, the blur its sigma, RandomSolarize
        ``rand < p``)."""
        order, factors = None, (1.0, 1.0, 1.0, 0.0)
        if torch.rand(1) <= self.P_JITTER:  # RandomApply skips when p < rand
            idx, b, c, s, h = T.ColorJitter.get_params(*self.ranges)
            order, factors = tuple(idx.tolist()), (b, c, s, h)
        gray = bool(torch.rand(1) < self.P_GRAY)
        sigma = None
        if torch.rand(1) <= self.P_BLUR:
            lo, hi = self.SIGMA
            sigma = lo + (hi - lo) * torch.rand(()).item()
        return ColourDraw(order, factors, gray, sigma, torch.rand(1).item() < self.P_SOLARIZE)

    @staticmethod
    def apply(x_3HW: torch.Tensor, draw: ColourDraw) -> torch.Tensor:
        """The drawn ops on float planes (contiguous [3, H, W], which may be overwritten: pass
        planes you own) -> the augmented planes."""
        if draw.order is not None:
            b, c, s, h = draw.factors
            for op in draw.order:
                if op == 0:
                    x_3HW = colour.brightness(x_3HW, b)
                elif op == 1:
                    x_3HW = colour.contrast(x_3HW, c)
                elif op == 2:
                    x_3HW = colour.saturation(x_3HW, s)
                else:
                    hue_planes(x_3HW.numpy(), h, out=x_3HW.numpy())  # in place
        if draw.gray:
            x_3HW = colour.grayscale(x_3HW)
        if draw.blur_sigma is not None:
            pil = Image.fromarray(np.ascontiguousarray(x_3HW.permute(1, 2, 0).numpy(), np.uint8))
            blurred = pil.filter(ImageFilter.GaussianBlur(radius=draw.blur_sigma))
            x_3HW = torch.from_numpy(np.asarray(blurred).transpose(2, 0, 1).astype(np.float32))
        if draw.solarize:
            x_3HW = colour.solarize(x_3HW)
        return x_3HW

    def __call__(self, x_3HW: torch.Tensor) -> torch.Tensor:
        """Draw and apply."""
        return self.apply(x_3HW, self.draw())


def union_box(boxes: Sequence[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """Smallest (x0, y0, x1, y1) box holding all the given (x0, y0, x1, y1) boxes."""
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def boxes_in_union(
    boxes: Sequence[tuple[int, int, int, int]], union: tuple[int, int, int, int]
) -> torch.Tensor:
    """Express pixel boxes in the union box's normalised [0, 1] coordinates -> [V, 4]."""
    ux0, uy0, ux1, uy1 = union
    w, h = float(ux1 - ux0), float(uy1 - uy0)
    rows = [
        ((x0 - ux0) / w, (y0 - uy0) / h, (x1 - ux0) / w, (y1 - uy0) / h) for x0, y0, x1, y1 in boxes
    ]
    return torch.tensor(rows, dtype=torch.float32)


class ACLIPViews:
    """Sample the online views, the EMA (union) view and the crop boxes of one image.

    Randomness comes from torch's global RNG only (box sampling and colour ops), so seeding
    `torch.manual_seed` makes a call reproducible (the EMA view draws nothing, so
    ``ema_view=False`` leaves the draws as they are; ``ema_size`` is the EMA view's side, the
    teacher's resolution, default ``image_size``). With ``normalize=False`` the views and the
    EMA view are returned as uint8 pixels, for :func:`normalize_images` on the GPU (4x fewer
    bytes through collation, shared memory and the host-to-device copy).
    """

    def __init__(
        self,
        image_size: int,
        num_views: int = 2,
        scale: tuple[float, float] = (0.5, 1.0),
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        color_aug: bool = True,
        normalize: bool = True,
        ema_view: bool = True,
        ema_size: int | None = None,
    ) -> None:
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        self.image_size = image_size
        self.num_views = num_views
        self.scale = (float(scale[0]), float(scale[1]))
        self.color = PlanarColour() if color_aug else None
        self.normalize = _Normalize(mean, std, enabled=normalize)
        self.ema_view = ema_view
        self.ema_size = ema_size or image_size

    def sample_boxes(self, img: Image.Image) -> list[tuple[int, int, int, int]]:
        """Draw `num_views` RandomResizedCrop boxes as pixel (x0, y0, x1, y1)."""
        boxes = []
        for _ in range(self.num_views):
            top, left, h, w = T.RandomResizedCrop.get_params(img, list(self.scale), list(_RATIO))
            boxes.append((left, top, left + w, top + h))
        return boxes

    def __call__(
        self, img: Image.Image, mask_HW: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Return {"views": [V,3,S,S], "ema": [3,S,S], "boxes": [V,4]} for one PIL image
        (without "ema" when ``ema_view=False``: a method without a teacher needs none).

        With a uint8 mask [H, W] of the image's size (Alpha-CLIP's alpha, 0-255) also "alpha"
        [V,1,S,S] uint8: the mask through each view's own crop and resize (the same op as the
        pixels'; no colour augmentation). It draws nothing: the views are those without it."""
        img = to_rgb(img)
        boxes = self.sample_boxes(img)
        union = union_box(boxes)
        pixels, size = image_tensor(img), self.image_size
        out: dict[str, torch.Tensor] = {}
        if self.ema_view:
            ema_size = self.ema_size
            out["ema"] = torch.empty(3, ema_size, ema_size, dtype=self.normalize.dtype)
            self.normalize(resize_box(pixels, union, ema_size), out["ema"])
        views = torch.empty(self.num_views, 3, size, size, dtype=self.normalize.dtype)
        for view_out, box in zip(views, boxes, strict=True):
            view = resize_box(pixels, box, size)
            if self.color is not None:
                view = self.color(torch.empty(view.shape).copy_(view))  # float planes
            self.normalize(view, view_out)
        if mask_HW is not None:
            out["alpha"] = resize_mask(mask_HW, boxes, size)
        return out | {"views": views, "boxes": boxes_in_union(boxes, union)}


def eval_transform(
    image_size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> T.Compose:
    """Evaluation transform: RGB, resize shorter side (bicubic), centre crop, normalise."""
    return T.Compose(
        [
            to_rgb,
            T.Resize(image_size, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
