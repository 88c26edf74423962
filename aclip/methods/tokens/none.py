"""``mask.strategy=none``: every patch token is encoded (plain CLIP, and A-CLIP without masking)."""

from __future__ import annotations

import torch
from torch import Tensor

from aclip.methods.tokens.base import TokenStrategy, register_strategy


@register_strategy
class KeepAll(TokenStrategy):
    """Keeps every token: the selector returns None (no gather) instead of calling :meth:`keep`."""

    name = "none"
    keeps_every_token = True

    def keep(
        self,
        relevance_BVN: Tensor | None,
        batch: int,
        generator: torch.Generator | None,
        device: torch.device | str | None,
    ) -> Tensor:
        """All patch indices of each row, LongTensor[batch, N]."""
        return torch.arange(self.num_patches, device=device).expand(batch, -1)
