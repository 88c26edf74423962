"""Pictures for tensorboard: which tokens the selection kept, and the teacher's relevance."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torchvision.utils import make_grid


def denormalize(images_BCHW: torch.Tensor) -> torch.Tensor:
    """Undo the CLIP normalisation; values clamped to [0, 1]."""
    mean = torch.tensor(OPENAI_DATASET_MEAN, device=images_BCHW.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, device=images_BCHW.device).view(1, 3, 1, 1)
    return (images_BCHW.float() * std + mean).clamp(0, 1)


def keep_mask_image(keep_idx_BK: torch.Tensor, grid_hw: tuple[int, int], size: int) -> torch.Tensor:
    """A [B, 1, size, size] map that is 1 on kept patches and 0 on dropped ones."""
    batch = keep_idx_BK.shape[0]
    mask_BN = torch.zeros(batch, grid_hw[0] * grid_hw[1], device=keep_idx_BK.device)
    mask_BN.scatter_(1, keep_idx_BK, 1.0)
    return F.interpolate(mask_BN.view(batch, 1, *grid_hw), size=(size, size), mode="nearest")


def relevance_image(
    relevance_BN: torch.Tensor, grid_hw: tuple[int, int], size: int
) -> torch.Tensor:
    """Relevance scaled to [0, 1] per image, upsampled to [B, 3, size, size] as a red heat map."""
    rel = relevance_BN.float().view(-1, 1, *grid_hw)
    lo = rel.amin(dim=(2, 3), keepdim=True)
    hi = rel.amax(dim=(2, 3), keepdim=True)
    rel = F.interpolate((rel - lo) / (hi - lo + 1e-12), size=(size, size), mode="bilinear")
    return torch.cat([rel, torch.zeros_like(rel), 1 - rel], dim=1)


def kept_tokens_grid(
    views_BCHW: torch.Tensor,
    keep_idx_BK: torch.Tensor | None,
    grid_hw: tuple[int, int],
    ema_BCHW: torch.Tensor | None = None,
    relevance_BN: torch.Tensor | None = None,
    relevance_grid_hw: tuple[int, int] | None = None,
) -> torch.Tensor:
    """One row per sample: EMA view, relevance heat map, online view with dropped patches dim.

    The relevance lies on ``relevance_grid_hw`` (default ``grid_hw``: the teacher's grid when it
    sees the EMA view at another resolution); the EMA view is shown at the views' size."""
    size = views_BCHW.shape[-1]
    view = denormalize(views_BCHW)
    if keep_idx_BK is not None:
        mask = keep_mask_image(keep_idx_BK, grid_hw, size)
        view = view * (0.25 + 0.75 * mask)
    columns = [view]
    if ema_BCHW is not None and relevance_BN is not None:
        ema = denormalize(ema_BCHW.to(view.device))
        if ema.shape[-1] != size:
            ema = F.interpolate(ema, size=(size, size), mode="bilinear", antialias=True)
        rel_grid = relevance_grid_hw or grid_hw
        columns = [ema, relevance_image(relevance_BN.to(view.device), rel_grid, size), view]
    tiles = torch.stack(columns, dim=1).flatten(0, 1)
    return make_grid(tiles.cpu(), nrow=len(columns), padding=2)
