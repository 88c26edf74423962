"""``clearclip`` (Lan et al., ECCV 2024; mc-lan/ClearCLIP, ``model_type='ClearCLIP'``,
``ignore_residual=True``): softmax(q qᵀ s) v on norm1(x), then the out projection; no residual, no
feed-forward (d = head width, s = d^-1/2)."""

from timm.layers import Attention
from torch import Tensor

from aclip.dense.heads.base import HeadSpec, register_head
from aclip.dense.tower import softmax_affinity


def attention(attn: Attention, q_BHNd: Tensor, k_BHNd: Tensor) -> Tensor:
    """softmax(q qᵀ s): [B, H, N, N]."""
    return softmax_affinity(q_BHNd, q_BHNd, attn.scale)


register_head(HeadSpec("clearclip", pos_interp="clearclip", attention=attention, residual=False))
