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

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image, ImageFilter
from torch.nn import functional as F
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

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
        """Store a PIL image or a uint8 [3, H, W] tensor into ``out_CHW``, normalised if on."""
        out_CHW.copy_(_chw(pixels))
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
    Value (max) and chroma (max - min) are kept; only the hue moves. Branch-free numpy on
    colour planes: ``np.where`` and float ``mod`` are the slow numpy ops, so neither is used.
    Images not in RGB mode are returned unchanged (as torchvision does for L).
    """
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor must be in [-0.5, 0.5], got {hue_factor}")
    if img.mode != "RGB":
        return img
    r, g, b = (np.asarray(band, dtype=np.float32) for band in img.split())
    vmax = np.maximum(np.maximum(r, g), b)
    chroma = vmax - np.minimum(np.minimum(r, g), b)
    is_r = r == vmax
    is_g = np.greater(g == vmax, is_r)  # g is the max and r is not
    is_b = ~(is_r | is_g)
    hue6 = is_r * (g - b)  # hue in sixths of a turn, times chroma: [-1, 5] * chroma
    hue6 += is_g * (b - r + 2.0 * chroma)
    hue6 += is_b * (r - g + 4.0 * chroma)
    hue6 /= np.maximum(chroma, 1.0)
    hue6 += 6.0 * hue_factor
    return Image.merge("RGB", [_hsv_channel(hue6, vmax, chroma, n) for n in (5.0, 3.0, 1.0)])


def _hsv_channel(hue6: np.ndarray, vmax: np.ndarray, chroma: np.ndarray, n: float) -> Image.Image:
    """One RGB channel of HSV (hue in sixths, value, chroma): V - C * clip(min(k, 4 - k), 0, 1)
    with k = (n + hue6) mod 6; n = 5, 3, 1 for R, G, B (the closed form of HSV -> RGB)."""
    k = hue6 + n
    k -= 6.0 * np.floor(k * (1.0 / 6.0))
    weight = np.minimum(k, 4.0 - k)
    np.clip(weight, 0.0, 1.0, out=weight)
    out = vmax - chroma * weight
    out += 0.5  # round to nearest on the uint8 cast
    return Image.fromarray(out.astype(np.uint8))


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
        self.color = colour_augment() if color_aug else None
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

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        """Return {"views": [V,3,S,S], "ema": [3,S,S], "boxes": [V,4]} for one PIL image
        (without "ema" when ``ema_view=False``: a method without a teacher needs none)."""
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
                view = self.color(to_pil(view))
            self.normalize(view, view_out)
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
