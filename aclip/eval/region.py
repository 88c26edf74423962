"""Region zero-shot classification (Alpha-CLIP's ImageNet-S protocol): image + mask -> class.

The protocol of the official eval (SunzeY/AlphaCLIP ``eval/imagenet_s_zs_test``): image and
mask are centre-cropped together to a square (the shorter side), resized to the model's size
(the image bicubic, the mask bilinear), the image normalised with CLIP's mean and std, the
mask as alpha ((a - 0.5) / 0.26); classes are scored by one template (``a photo of a {}.``);
the metrics are mean per-class top-1 and top-5 accuracy (each class's accuracy over its
samples, averaged over the classes that have samples).

Rows, side by side, each the same samples and classifier:

- ``full``: the whole image, the alpha conv left out (the RGB path of the tower);
- ``all_ones``: the whole image with an all-ones alpha (Alpha-CLIP's whole-image mode);
- ``crop``: the region's box (made square about its centre, inside the image) cropped and
  resized: the usual way to point a plain CLIP at a region;
- ``blackout``: the whole image with the pixels outside the region set to black;
- ``alpha``: the whole image with the region as alpha.

``crop`` and ``blackout`` feed an alpha tower an all-ones alpha; a tower without an alpha conv
has no ``all_ones`` and ``alpha`` rows (None). :func:`region_zeroshot` takes a CLIP, so a
training loop can call it as the CLI does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from tqdm import tqdm

from aclip.data.views import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from aclip.eval.evaluate import zero_shot_classifier
from aclip.model import normalize_alpha
from aclip.model.clip import CLIP

ROWS = ("full", "all_ones", "crop", "blackout", "alpha")
ALPHA_ROWS = ("all_ones", "alpha")
TEMPLATE = "a photo of a {}."  # the official eval's one template


def centre_square(image: Image.Image, mask_HW: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    """Image and mask centre-cropped together to a square of the shorter side (the official
    ``crop_center``: start = side // 2 - crop // 2)."""
    w, h = image.size
    side = min(w, h)
    top, left = h // 2 - side // 2, w // 2 - side // 2
    crop = image.crop((left, top, left + side, top + side))
    return crop, mask_HW[top : top + side, left : left + side]


def square_box(mask_HW: np.ndarray) -> tuple[int, int, int, int]:
    """The region's bounding box made square about its centre (side = its longer side),
    shifted to lie inside the image: (x0, y0, x1, y1)."""
    ys, xs = np.nonzero(mask_HW)
    h, w = mask_HW.shape
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    side = min(max(x1 - x0, y1 - y0), h, w)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    left = min(max(cx - side // 2, 0), w - side)
    top = min(max(cy - side // 2, 0), h - side)
    return left, top, left + side, top + side


def _image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    resized = TF.resize(image, [size, size], InterpolationMode.BICUBIC)
    return TF.normalize(TF.to_tensor(resized), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


class RegionTransform:
    """(image, mask, label) -> the tensors of every row: ``image``, ``alpha`` (normalised),
    ``crop``, ``blackout`` and ``label``."""

    def __init__(self, image_size: int) -> None:
        self.size = image_size

    def __call__(self, item: tuple[Image.Image, np.ndarray, int]) -> dict[str, torch.Tensor]:
        """The row inputs of one sample."""
        image, mask, label = item
        image, mask = centre_square(image.convert("RGB"), mask)
        if not mask.any():
            mask = np.full_like(mask, 255)  # region outside the centre square: all of it
        size = self.size
        mask_img = TF.resize(Image.fromarray(mask), [size, size], InterpolationMode.BILINEAR)
        alpha = normalize_alpha(torch.from_numpy(np.asarray(mask_img).copy())[None])
        black = np.asarray(image) * (mask >= 128)[..., None].astype(np.uint8)
        return {
            "image": _image_tensor(image, size),
            "alpha": alpha,
            "crop": _image_tensor(image.crop(square_box(mask)), size),
            "blackout": _image_tensor(Image.fromarray(black), size),
            "label": torch.tensor(label),
        }


def mean_per_class_topk(logits_NC: torch.Tensor, labels_N: torch.Tensor, k: int) -> float:
    """Top-k accuracy per class, averaged over the classes that have samples (the official
    eval's ``acc1`` / ``acc5``)."""
    num_classes = logits_NC.shape[1]
    k = min(k, num_classes)
    per_class_C = MulticlassAccuracy(num_classes, top_k=k, average="none")(logits_NC, labels_N)
    present_C = torch.bincount(labels_N, minlength=num_classes) > 0
    return per_class_C[present_C].mean().item()


def _row_inputs(
    batch: dict[str, torch.Tensor], has_alpha: bool, device: torch.device | str
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, bool]]:
    """(images, alpha, use_alpha) per row; all-ones alpha is the tower's own (alpha=None)."""
    image, alpha = batch["image"].to(device), batch["alpha"].to(device)
    rows = {
        "full": (image, None, False),
        "crop": (batch["crop"].to(device), None, has_alpha),
        "blackout": (batch["blackout"].to(device), None, has_alpha),
    }
    if has_alpha:
        rows |= {"all_ones": (image, None, True), "alpha": (image, alpha, True)}
    return rows


@torch.no_grad()
def region_logits(
    model: CLIP,
    classifier_DC: torch.Tensor,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Logits [N, C] per row and labels [N] over batches of :class:`RegionTransform` dicts."""
    has_alpha = getattr(model.visual, "alpha_conv", None) is not None
    logits: dict[str, list[torch.Tensor]] = {}
    labels = []
    for batch in tqdm(batches, desc="region zero-shot", disable=not progress):
        for row, (images, alpha, use_alpha) in _row_inputs(batch, has_alpha, device).items():
            emb = model.encode_image(images, None, True, alpha, use_alpha)
            logits.setdefault(row, []).append((100.0 * emb @ classifier_DC).float().cpu())
        labels.append(batch["label"].cpu())
    if not labels:
        raise ValueError("the region set gave no sample")
    return {row: torch.cat(parts) for row, parts in logits.items()}, torch.cat(labels)


def region_zeroshot(
    model: CLIP,
    tokenizer: Callable[[list[str]], torch.Tensor],
    dataset: torch.utils.data.Dataset | torch.utils.data.IterableDataset,
    classnames: Sequence[str],
    image_size: int,
    templates: Sequence[str] = (TEMPLATE,),
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    progress: bool = False,
    workers: int = 0,
) -> dict[str, object]:
    """The rows of the module docstring for ``model`` on ``dataset`` (items: RGB image, uint8
    mask [H, W], class index; None items are left out): ``{row: {"top1", "top5"}}`` (None for
    the alpha rows of a tower without an alpha conv), plus ``n`` and ``classes``."""
    was_training = model.training
    model.eval()
    try:
        classifier = zero_shot_classifier(model, tokenizer, classnames, templates, device)
        mapped = _Mapped(dataset, RegionTransform(image_size))
        loader = DataLoader(mapped, batch_size=batch_size, num_workers=workers)
        logits, labels = region_logits(model, classifier, loader, device, progress)
    finally:
        model.train(was_training)
    out: dict[str, object] = {}
    for row in ROWS:
        if row not in logits:
            out[row] = None
            continue
        out[row] = {
            "top1": mean_per_class_topk(logits[row], labels, 1),
            "top5": mean_per_class_topk(logits[row], labels, 5),
        }
    return out | {"n": len(labels), "classes": int(torch.unique(labels).numel())}


class _Mapped(torch.utils.data.IterableDataset):
    """A dataset's items through the row transform, None items (no region) left out."""

    def __init__(self, dataset: torch.utils.data.Dataset, transform: RegionTransform) -> None:
        self.dataset, self.transform = dataset, transform

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if isinstance(self.dataset, torch.utils.data.IterableDataset):
            items = iter(self.dataset)
        else:
            info = torch.utils.data.get_worker_info()
            start, step = (info.id, info.num_workers) if info else (0, 1)
            items = (self.dataset[i] for i in range(start, len(self.dataset), step))
        for item in items:
            if item is not None:
                yield self.transform(item)


def format_table(results: dict[str, object]) -> str:
    """The rows as a text table (top-1 / top-5 in %)."""
    lines = [f"{'row':<10} {'top1':>7} {'top5':>7}"]
    for row in ROWS:
        metrics = results.get(row)
        if metrics is None:
            lines.append(f"{row:<10} {'n/a':>7} {'n/a':>7}")
        else:
            lines.append(f"{row:<10} {100 * metrics['top1']:7.2f} {100 * metrics['top5']:7.2f}")
    return "\n".join(lines)


def region_on_wds(
    model: CLIP,
    tokenizer: Callable[[list[str]], torch.Tensor],
    root: str,
    image_size: int,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> dict[str, float]:
    """The region rows on a wds region set, flat (``<row>/top1``, ``<row>/top5``, ``n``), for
    evaluation during training (``eval.region_sets``)."""
    from aclip.data.sets.regions import WdsRegionSet

    dataset = WdsRegionSet(root)
    rows = region_zeroshot(model, tokenizer, dataset, dataset.classnames, image_size,
                           device=device, batch_size=batch_size)  # fmt: skip
    flat: dict[str, float] = {"n": float(rows["n"])}
    for row in ROWS:
        if isinstance(rows.get(row), dict):
            flat |= {f"{row}/{metric}": value for metric, value in rows[row].items()}
    return flat
