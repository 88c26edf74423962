"""``mask.strategy=attentive`` (A-CLIP, docs/design.md step 4): the k patches of each view that the
EMA teacher finds most relevant, optionally chosen by b x b blocks (``mask.block_size``)."""

from __future__ import annotations

import torch
from torch import Tensor

from aclip.methods.tokens.base import (
    TokenStrategy,
    block_patch_offsets,
    check_grid,
    keep_by_blocks,
    register_strategy,
)


def topk_keep(scores_BN: Tensor, k: int, grid_hw: tuple[int, int], block_size: int = 1) -> Tensor:
    """Indices of the k highest-scoring patches per row, LongTensor[B, k] sorted ascending.

    With ``block_size`` b > 1 the scores are averaged over non-overlapping b x b blocks, the top
    ceil(k / b^2) blocks are kept and expanded to their patches, and if that gives more than k
    patches the lowest-scoring of them are dropped.
    """
    batch, num_patches = scores_BN.shape
    check_grid(num_patches, grid_hw, k, block_size)
    scores_BN = scores_BN.float()
    if block_size == 1:
        return scores_BN.topk(k, dim=1).indices.sort(dim=1).values
    offsets_Mb = block_patch_offsets(grid_hw, block_size, scores_BN.device)
    block_scores_BM = scores_BN[:, offsets_Mb].mean(dim=2)
    return keep_by_blocks(block_scores_BM, scores_BN, k, grid_hw, block_size)


@register_strategy
class Attentive(TokenStrategy):
    """Top-k relevance: the teacher's relevance mapped onto each view picks its kept tokens."""

    name = "attentive"
    needs_relevance = True

    def keep(
        self,
        relevance_BVN: Tensor | None,
        batch: int,
        generator: torch.Generator | None,
        device: torch.device | str | None,
    ) -> Tensor:
        """The k most relevant patches of each row of ``relevance_BVN`` ([B*V, N])."""
        keep_BK = topk_keep(relevance_BVN, self.k, self.grid_hw, self.block_size)
        return keep_BK.to(device) if device is not None else keep_BK
