"""``mask.strategy=gaussian`` (GLIP, Gaussian masking; MingliangLiang3/GLIP,
``src/open_clip/transformer.py`` PatchDropout with ``normal_maksing``): FLIP's random masking
biased towards the image centre.

Each patch scores ``U(0, 1) + pdf - 1`` and the top-k scores are kept, ``pdf`` the density of a
centred bivariate normal with covariance 0.2 * I evaluated on the patch grid placed on
[-1, 1]^2 (``linspace(-1, 1, n)`` per axis). The official code calls scipy's
``multivariate_normal(mean=[0, 0], cov=[[0.2, 0], [0, 0.2]]).pdf``, i.e. the *normalised*
density ``exp(-(x^2 + y^2) / (2 * 0.2)) / (2 * pi * 0.2)`` (peak ~0.80, ~0.0005 at a corner),
and subtracts ``1 - pdf`` from the uniform noise; we compute the same in float64 (as its numpy
pdf is). Departures, on purpose:

- GLIP builds the grid from ``grid_size[0]`` only (square grids); here rows and columns each
  get their own ``linspace(-1, 1, ·)``, which is the same on a square grid.
- GLIP keeps ``max(1, int(L * (1 - p)))`` patches (rounding down: 0.5 x 49 -> 24); we keep
  :func:`~aclip.methods.tokens.base.num_keep` (half up: 25), the one rounding rule every
  strategy shares, so strategies compare at equal token counts.
- GLIP draws its noise with the global CPU RNG; here it comes from the selector's generator
  (on the generator's device, so a seeded CPU generator gives the same indices anywhere).

With ``mask.block_size`` b > 1 (GLIP has no blocks) the same rule scores b x b blocks: the
Gaussian is evaluated on the block grid (``linspace(-1, 1, rows / b)`` x ``linspace(-1, 1,
cols / b)``), each block scores ``U(0, 1) + pdf_block - 1``, the top ceil(k / b^2) blocks are
kept and trimmed to k by the patches' own scores, as ``random`` does with its blocks.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from aclip.methods.tokens.base import TokenStrategy, check_grid, keep_by_blocks, register_strategy

GLIP_VARIANCE = 0.2  # the per-axis variance ("std" in GLIP's code, used as the covariance)


def gaussian_pdf(grid_hw: tuple[int, int], variance: float = GLIP_VARIANCE) -> Tensor:
    """Density of N(0, variance * I) at the patch centres on [-1, 1]^2, float64 Tensor[rows *
    cols], row-major (rows along y, columns along x)."""
    rows, cols = grid_hw
    y_H = torch.linspace(-1.0, 1.0, rows, dtype=torch.float64)
    x_W = torch.linspace(-1.0, 1.0, cols, dtype=torch.float64)
    sq_HW = y_H[:, None] ** 2 + x_W[None, :] ** 2
    return (torch.exp(-sq_HW / (2 * variance)) / (2 * math.pi * variance)).reshape(-1)


@functools.lru_cache(maxsize=16)
def _cached_pdf(grid_hw: tuple[int, int], device: torch.device) -> Tensor:
    """:func:`gaussian_pdf` on ``device``, computed once per grid and device (never modified)."""
    return gaussian_pdf(grid_hw).to(device)


def gaussian_keep(
    batch: int,
    k: int,
    grid_hw: tuple[int, int],
    block_size: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """GLIP's Gaussian masking: top-k of U(0,1) + pdf - 1 per row, LongTensor[batch, k] sorted
    ascending, on ``device`` (if given).

    Draws: ``torch.rand(batch, N)`` (float32) from ``generator`` on its device, then, with
    ``block_size`` > 1, ``torch.rand(batch, M)`` for the M blocks (the order ``random`` uses).
    """
    num_patches = grid_hw[0] * grid_hw[1]
    check_grid(num_patches, grid_hw, k, block_size)
    draw_device = generator.device if generator is not None else device
    noise_BN = torch.rand(batch, num_patches, generator=generator, device=draw_device)
    score_BN = noise_BN.double() + _cached_pdf(grid_hw, noise_BN.device) - 1.0
    if block_size == 1:
        keep_BK = score_BN.topk(k, dim=1).indices.sort(dim=1).values
    else:
        block_hw = (grid_hw[0] // block_size, grid_hw[1] // block_size)
        block_noise_BM = torch.rand(batch, block_hw[0] * block_hw[1], generator=generator,
                                    device=draw_device)  # fmt: skip
        pdf_M = _cached_pdf(block_hw, block_noise_BM.device)
        block_score_BM = block_noise_BM.double() + pdf_M - 1.0
        keep_BK = keep_by_blocks(block_score_BM, score_BN, k, grid_hw, block_size)
    return keep_BK.to(device) if device is not None else keep_BK


@register_strategy
class Gaussian(TokenStrategy):
    """GLIP's Gaussian masking (centre patches kept more often); needs no relevance, so FLIP
    (one view, no teacher) and A-CLIP (views, SSL, EMA) both run it."""

    name = "gaussian"

    def keep(
        self,
        relevance_BVN: Tensor | None,
        batch: int,
        generator: torch.Generator | None,
        device: torch.device | str | None,
    ) -> Tensor:
        """k patches per row by Gaussian-biased noise (``relevance_BVN`` is ignored)."""
        return gaussian_keep(batch, self.k, self.grid_hw, self.block_size, generator, device)
