"""Token selection for the online views: relevance mapping and keep strategies.

A-CLIP (docs/design.md, steps 3-4): the EMA teacher yields a relevance score per patch of the EMA
view; each online view's box is cropped out of that map and resampled onto the view's patch grid,
and the top-k patches of each view are kept. ``random`` (FLIP) keeps a uniformly random subset
instead and ``none`` keeps every token.

Patch indices are row-major over ``grid_hw``; every returned index tensor is sorted ascending so
the kept tokens stay in raster order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import roi_align

STRATEGIES = ("none", "random", "attentive")


def num_keep(num_patches: int, keep_ratio: float) -> int:
    """Patches kept out of ``num_patches``: keep_ratio x num_patches rounded half up (0.5 x 49
    -> 25, as the papers count; Python's ``round`` would give 24), at least 1. A tolerance of
    1e-9 absorbs float error in the product (0.3 x 25 = 7.4999... -> 8)."""
    return max(1, math.floor(keep_ratio * num_patches + 0.5 + 1e-9))


def map_relevance_to_views(
    relevance_BN: Tensor,
    grid_hw: tuple[int, int],
    boxes_BV4: Tensor,
    out_hw: tuple[int, int],
) -> Tensor:
    """Crop each view's box out of the relevance map and resample it onto the view's patch grid.

    Args:
        relevance_BN: relevance per patch of the EMA view, row-major over ``grid_hw``.
        grid_hw: (grid_h, grid_w) of the EMA view's patch grid.
        boxes_BV4: (x0, y0, x1, y1) of each view, normalised to [0, 1] in EMA-view coordinates.
        out_hw: (out_h, out_w) patch grid of the online views.

    Returns:
        Tensor[B, V, out_h * out_w] (float32), row-major over ``out_hw``.

    The map is treated as an image whose pixel (i, j) covers [j, j+1) x [i, i+1) in grid units, so a
    box is scaled by (grid_w, grid_h). ``roi_align`` with ``aligned=True`` then places output bin
    centres at their exact continuous positions and, with ``sampling_ratio=1``, takes exactly one
    bilinear sample per output bin at its centre: plain bilinear resampling of the cropped region
    (the ``align_corners=False`` convention, edges clamped), with no extra area averaging. The full
    box onto the same grid is therefore the identity.
    """
    grid_h, grid_w = grid_hw
    batch, views = boxes_BV4.shape[:2]
    maps_B1HW = relevance_BN.float().reshape(batch, 1, grid_h, grid_w)
    scale_4 = boxes_BV4.new_tensor([grid_w, grid_h, grid_w, grid_h], dtype=torch.float32)
    boxes_K4 = (boxes_BV4.float() * scale_4).reshape(batch * views, 4)
    batch_idx_K1 = torch.arange(batch, device=boxes_K4.device, dtype=torch.float32)
    batch_idx_K1 = batch_idx_K1.repeat_interleave(views).unsqueeze(1)
    rois_K5 = torch.cat([batch_idx_K1, boxes_K4], dim=1)
    out_K1hw = roi_align(
        maps_B1HW, rois_K5, output_size=out_hw, spatial_scale=1.0, sampling_ratio=1, aligned=True
    )
    return out_K1hw.reshape(batch, views, out_hw[0] * out_hw[1])


def _block_patch_offsets(grid_hw: tuple[int, int], block_size: int, device) -> Tensor:
    """Patch indices of every block, Tensor[M, b*b] for M = (gh/b)*(gw/b) blocks (row-major)."""
    grid_h, grid_w = grid_hw
    b = block_size
    top_left_M = (
        torch.arange(0, grid_h, b, device=device)[:, None] * grid_w
        + torch.arange(0, grid_w, b, device=device)[None, :]
    ).reshape(-1)
    inner_bb = (
        torch.arange(b, device=device)[:, None] * grid_w + torch.arange(b, device=device)[None, :]
    ).reshape(-1)
    return top_left_M[:, None] + inner_bb[None, :]


def _check_grid(num_patches: int, grid_hw: tuple[int, int], k: int, block_size: int) -> None:
    grid_h, grid_w = grid_hw
    if grid_h * grid_w != num_patches:
        raise ValueError(f"grid {grid_hw} does not match {num_patches} patches")
    if not 1 <= k <= num_patches:
        raise ValueError(f"k={k} must be in [1, {num_patches}]")
    if block_size < 1 or grid_h % block_size or grid_w % block_size:
        raise ValueError(f"grid {grid_hw} is not divisible by block_size={block_size}")


def _keep_by_blocks(
    block_scores_BM: Tensor,
    patch_scores_BN: Tensor,
    k: int,
    grid_hw: tuple[int, int],
    block_size: int,
) -> Tensor:
    """Keep the top ceil(k/b^2) blocks, expand them to patches, trim to k by patch score."""
    b2 = block_size * block_size
    n_blocks = math.ceil(k / b2)
    top_blocks_BJ = block_scores_BM.topk(n_blocks, dim=1).indices
    offsets_Mb = _block_patch_offsets(grid_hw, block_size, block_scores_BM.device)
    cand_BC = offsets_Mb[top_blocks_BJ].flatten(1)  # C = n_blocks * b^2 >= k
    if cand_BC.shape[1] > k:
        cand_scores_BC = patch_scores_BN.gather(1, cand_BC)
        cand_BC = cand_BC.gather(1, cand_scores_BC.topk(k, dim=1).indices)
    return cand_BC.sort(dim=1).values


def topk_keep(scores_BN: Tensor, k: int, grid_hw: tuple[int, int], block_size: int = 1) -> Tensor:
    """Indices of the k highest-scoring patches per row, LongTensor[B, k] sorted ascending.

    With ``block_size`` b > 1 the scores are averaged over non-overlapping b x b blocks, the top
    ceil(k / b^2) blocks are kept and expanded to their patches, and if that gives more than k
    patches the lowest-scoring of them are dropped.
    """
    batch, num_patches = scores_BN.shape
    _check_grid(num_patches, grid_hw, k, block_size)
    scores_BN = scores_BN.float()
    if block_size == 1:
        return scores_BN.topk(k, dim=1).indices.sort(dim=1).values
    offsets_Mb = _block_patch_offsets(grid_hw, block_size, scores_BN.device)
    block_scores_BM = scores_BN[:, offsets_Mb].mean(dim=2)
    return _keep_by_blocks(block_scores_BM, scores_BN, k, grid_hw, block_size)


def random_keep(
    batch: int,
    num_patches: int,
    k: int,
    grid_hw: tuple[int, int],
    block_size: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniformly random k distinct patches per row (FLIP), LongTensor[batch, k] sorted ascending.

    Random numbers are drawn on the generator's device (so a seeded CPU generator gives the same
    indices whatever ``device`` is) and the result is moved to ``device``. With ``block_size`` > 1
    whole random blocks are kept (then trimmed to k at random).
    """
    _check_grid(num_patches, grid_hw, k, block_size)
    draw_device = generator.device if generator is not None else device
    noise_BN = torch.rand(batch, num_patches, generator=generator, device=draw_device)
    if block_size == 1:
        keep_BK = noise_BN.topk(k, dim=1).indices.sort(dim=1).values
    else:
        n_blocks = num_patches // (block_size * block_size)
        block_noise_BM = torch.rand(batch, n_blocks, generator=generator, device=draw_device)
        keep_BK = _keep_by_blocks(block_noise_BM, noise_BN, k, grid_hw, block_size)
    return keep_BK.to(device) if device is not None else keep_BK


class TokenSelector:
    """Chooses which patch tokens of each online view the student encodes.

    ``strategy``: "none" (all tokens), "random" (FLIP) or "attentive" (A-CLIP, top-k relevance).
    """

    def __init__(
        self,
        strategy: str,
        keep_ratio: float,
        grid_hw: tuple[int, int],
        block_size: int = 1,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown token strategy {strategy!r}; expected one of {STRATEGIES}")
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        self.strategy = strategy
        self.keep_ratio = keep_ratio
        self.grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
        self.block_size = block_size
        self.num_patches = self.grid_hw[0] * self.grid_hw[1]
        self.k = num_keep(self.num_patches, keep_ratio)
        self.keeps_all = strategy == "none" or self.k == self.num_patches
        if not self.keeps_all:
            _check_grid(self.num_patches, self.grid_hw, self.k, block_size)

    @property
    def needs_relevance(self) -> bool:
        """True when ``select`` needs the teacher's relevance (attentive strategy, masking on)."""
        return self.strategy == "attentive" and not self.keeps_all

    def select(
        self,
        relevance_BVN: Tensor | None,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor | None:
        """Kept patch indices, LongTensor[batch, k], or None to encode every token.

        For "attentive", ``relevance_BVN`` is the relevance already mapped onto the view grid and
        flattened over views ([B*V, N]); ``batch`` is its number of rows (B*V).
        """
        if self.keeps_all:
            return None
        if self.strategy == "random":
            return random_keep(
                batch, self.num_patches, self.k, self.grid_hw, self.block_size, generator, device
            )
        if relevance_BVN is None:
            raise ValueError("attentive token selection needs relevance_BVN")
        if relevance_BVN.shape != (batch, self.num_patches):
            raise ValueError(
                f"relevance_BVN has shape {tuple(relevance_BVN.shape)}, "
                f"expected ({batch}, {self.num_patches})"
            )
        keep_BK = topk_keep(relevance_BVN, self.k, self.grid_hw, self.block_size)
        return keep_BK.to(device) if device is not None else keep_BK
