"""Segmentation metrics: mIoU and pixel accuracy as mmseg's ``IoUMetric`` counts them."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from aclip.data.sets.segmentation import IGNORE_INDEX


class SegMetric:
    """mIoU and pixel accuracy as mmseg's ``IoUMetric`` counts them: per class, intersection,
    union, label and prediction areas summed over all images (pixels labelled ``ignore_index``
    left out; predictions outside the classes count for no class); IoU = intersection / union,
    averaged over the classes whose union is not empty; pixel accuracy = correct / labelled."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.intersect = torch.zeros(num_classes, dtype=torch.float64)
        self.area_pred = torch.zeros(num_classes, dtype=torch.float64)
        self.area_label = torch.zeros(num_classes, dtype=torch.float64)
        self.images = 0

    def update(self, pred_HW: Tensor | np.ndarray, label_HW: Tensor | np.ndarray) -> None:
        """Add one image's prediction and label map (same shape)."""
        pred, label = torch.as_tensor(pred_HW).long().cpu(), torch.as_tensor(label_HW).long().cpu()
        if pred.shape != label.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} vs label {tuple(label.shape)}")
        keep = label != self.ignore_index
        pred, label = pred[keep], label[keep]
        n = self.num_classes
        in_range = (pred >= 0) & (pred < n)
        self.area_pred += torch.bincount(pred[in_range], minlength=n)[:n].double()
        self.area_label += torch.bincount(label, minlength=n)[:n].double()
        self.intersect += torch.bincount(label[pred == label], minlength=n)[:n].double()
        self.images += 1

    def compute(self) -> dict[str, Any]:
        """``mIoU``, ``aAcc`` (pixel accuracy), ``mAcc``, per-class ``IoU`` / ``Acc`` (None for
        a class absent from labels and predictions), and ``n`` images."""
        union = self.area_pred + self.area_label - self.intersect
        iou = torch.where(union > 0, self.intersect / union.clamp(min=1), torch.nan)
        acc = torch.where(self.area_label > 0, self.intersect / self.area_label.clamp(min=1),
                          torch.nan)  # fmt: skip
        labelled = self.area_label.sum()
        return {
            "mIoU": float(torch.nanmean(iou)) if (union > 0).any() else float("nan"),
            "aAcc": float(self.intersect.sum() / labelled) if labelled > 0 else float("nan"),
            "mAcc": float(torch.nanmean(acc)) if (self.area_label > 0).any() else float("nan"),
            "IoU": [None if math.isnan(v) else v for v in iou.tolist()],
            "Acc": [None if math.isnan(v) else v for v in acc.tolist()],
            "n": self.images,
        }
