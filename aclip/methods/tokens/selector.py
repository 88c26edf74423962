"""The token selector a method builds once per run: the ``mask.strategy`` it names, for the
student's patch grid and ``mask.keep_ratio``."""

from __future__ import annotations

import torch
from torch import Tensor

from aclip.methods.tokens.base import check_grid, get_strategy, num_keep


class TokenSelector:
    """Chooses which patch tokens of each online view the student encodes.

    ``strategy``: a registered token strategy (aclip/methods/tokens/): "none" (all tokens),
    "random" (FLIP), "attentive" (A-CLIP, top-k relevance), "gaussian" (GLIP, centre-biased
    random), or any strategy a newer file registers.
    """

    def __init__(
        self,
        strategy: str,
        keep_ratio: float,
        grid_hw: tuple[int, int],
        block_size: int = 1,
    ) -> None:
        strategy_cls = get_strategy(strategy)
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        self.strategy = strategy
        self.keep_ratio = keep_ratio
        self.grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
        self.block_size = block_size
        self.num_patches = self.grid_hw[0] * self.grid_hw[1]
        self.k = num_keep(self.num_patches, keep_ratio)
        self.keeps_all = strategy_cls.keeps_every_token or self.k == self.num_patches
        if not self.keeps_all:
            check_grid(self.num_patches, self.grid_hw, self.k, block_size)
        self._strategy = strategy_cls(self.k, self.grid_hw, block_size)

    @property
    def needs_relevance(self) -> bool:
        """True when ``select`` needs the teacher's relevance (attentive strategy, masking on)."""
        return self._strategy.needs_relevance and not self.keeps_all

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
        if self._strategy.needs_relevance:
            self._check_relevance(relevance_BVN, batch)
        return self._strategy.keep(relevance_BVN, batch, generator, device)

    def _check_relevance(self, relevance_BVN: Tensor | None, batch: int) -> None:
        if relevance_BVN is None:
            raise ValueError(f"{self.strategy} token selection needs relevance_BVN")
        if relevance_BVN.shape != (batch, self.num_patches):
            raise ValueError(
                f"relevance_BVN has shape {tuple(relevance_BVN.shape)}, "
                f"expected ({batch}, {self.num_patches})"
            )
