"""``vanilla``: the last block as it is (its row in ClearCLIP's and SCLIP's comparisons, whose
position-embedding resampling it uses)."""

from timm.layers import Attention
from torch import Tensor

from aclip.dense.heads.base import HeadSpec, register_head
from aclip.dense.tower import softmax_affinity


def attention(attn: Attention, q_BHNd: Tensor, k_BHNd: Tensor) -> Tensor:
    """softmax(q kᵀ s): the block's own attention (used under ``ignore_residual``)."""
    return softmax_affinity(q_BHNd, k_BHNd, attn.scale)


register_head(HeadSpec("vanilla", pos_interp="clearclip", attention=attention, plain=True))
