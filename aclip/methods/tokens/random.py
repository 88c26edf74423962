"""``mask.strategy=random`` (FLIP, Li et al., CVPR 2023): a uniformly random subset of k patches
per view, optionally whole random b x b blocks (``mask.block_size``)."""

from __future__ import annotations

import torch
from torch import Tensor

from aclip.methods.tokens.base import TokenStrategy, check_grid, keep_by_blocks, register_strategy


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
    check_grid(num_patches, grid_hw, k, block_size)
    draw_device = generator.device if generator is not None else device
    noise_BN = torch.rand(batch, num_patches, generator=generator, device=draw_device)
    if block_size == 1:
        keep_BK = noise_BN.topk(k, dim=1).indices.sort(dim=1).values
    else:
        n_blocks = num_patches // (block_size * block_size)
        block_noise_BM = torch.rand(batch, n_blocks, generator=generator, device=draw_device)
        keep_BK = keep_by_blocks(block_noise_BM, noise_BN, k, grid_hw, block_size)
    return keep_BK.to(device) if device is not None else keep_BK


@register_strategy
class Random(TokenStrategy):
    """FLIP's random masking; the draws come from the selector's generator."""

    name = "random"

    def keep(
        self,
        relevance_BVN: Tensor | None,
        batch: int,
        generator: torch.Generator | None,
        device: torch.device | str | None,
    ) -> Tensor:
        """k random distinct patches per row (``relevance_BVN`` is ignored)."""
        return random_keep(
            batch, self.num_patches, self.k, self.grid_hw, self.block_size, generator, device
        )
