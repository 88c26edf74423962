"""What every token strategy shares: the strategy registry and the helpers of selection.

A token strategy (``mask.strategy``) chooses which patch tokens of each online view the student
encodes; each lives in its own file of this package (``none``, ``random`` = FLIP, ``attentive`` =
A-CLIP) as a :class:`TokenStrategy` subclass decorated with :func:`register_strategy`, and
:class:`~aclip.methods.tokens.selector.TokenSelector` picks one by name. This module holds the
registry, the kept-token count (:func:`num_keep`), the mapping of the teacher's relevance onto the
views (:func:`map_relevance_to_views`, A-CLIP step 3 in docs/design.md) and the grid / block
helpers the strategies use.

Patch indices are row-major over ``grid_hw``; every returned index tensor is sorted ascending so
the kept tokens stay in raster order.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor
from torchvision.ops import roi_align


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


def block_patch_offsets(
    grid_hw: tuple[int, int], block_size: int, device: torch.device | str | None
) -> Tensor:
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


def check_grid(num_patches: int, grid_hw: tuple[int, int], k: int, block_size: int) -> None:
    """ValueError unless ``grid_hw`` has ``num_patches`` patches, 1 <= k <= num_patches and the
    grid divides into ``block_size`` x ``block_size`` blocks."""
    grid_h, grid_w = grid_hw
    if grid_h * grid_w != num_patches:
        raise ValueError(f"grid {grid_hw} does not match {num_patches} patches")
    if not 1 <= k <= num_patches:
        raise ValueError(f"k={k} must be in [1, {num_patches}]")
    if block_size < 1 or grid_h % block_size or grid_w % block_size:
        raise ValueError(f"grid {grid_hw} is not divisible by block_size={block_size}")


def keep_by_blocks(
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
    offsets_Mb = block_patch_offsets(grid_hw, block_size, block_scores_BM.device)
    cand_BC = offsets_Mb[top_blocks_BJ].flatten(1)  # C = n_blocks * b^2 >= k
    if cand_BC.shape[1] > k:
        cand_scores_BC = patch_scores_BN.gather(1, cand_BC)
        cand_BC = cand_BC.gather(1, cand_scores_BC.topk(k, dim=1).indices)
    return cand_BC.sort(dim=1).values


class TokenStrategy:
    """One way of choosing the kept patch tokens, built for one patch grid and keep count.

    Adding a strategy: a new file in this package with a subclass that sets ``name`` (the
    ``mask.strategy`` value), implements :meth:`keep` and is decorated with
    :func:`register_strategy`, and its import in ``aclip/methods/tokens/__init__.py``.
    ``keeps_every_token`` marks a strategy that never drops tokens (the selector then encodes all
    of them without calling :meth:`keep`); ``needs_relevance`` one whose :meth:`keep` reads the
    EMA teacher's relevance mapped onto the views.
    """

    name: ClassVar[str] = ""
    keeps_every_token: ClassVar[bool] = False
    needs_relevance: ClassVar[bool] = False

    def __init__(self, k: int, grid_hw: tuple[int, int], block_size: int) -> None:
        self.k = k
        self.grid_hw = grid_hw
        self.block_size = block_size
        self.num_patches = grid_hw[0] * grid_hw[1]

    def keep(
        self,
        relevance_BVN: Tensor | None,
        batch: int,
        generator: torch.Generator | None,
        device: torch.device | str | None,
    ) -> Tensor:
        """Kept patch indices, LongTensor[batch, k] sorted ascending, on ``device`` (if given).

        ``relevance_BVN`` ([batch, N], checked by the selector) is given to strategies that
        need it and None otherwise; random draws come from ``generator``.
        """
        raise NotImplementedError


STRATEGIES: dict[str, type[TokenStrategy]] = {}


def register_strategy(cls: type[TokenStrategy]) -> type[TokenStrategy]:
    """Class decorator: make ``cls`` selectable as ``mask.strategy=<cls.name>``."""
    if not cls.name or cls.name in STRATEGIES:
        raise ValueError(f"token strategy name {cls.name!r} is empty or taken")
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(name: str) -> type[TokenStrategy]:
    """The strategy class registered as ``name``; ValueError naming the registered ones."""
    if name not in STRATEGIES:
        raise ValueError(
            f"unknown token strategy {name!r}; expected one of {', '.join(sorted(STRATEGIES))}"
        )
    return STRATEGIES[name]
