"""``sclip`` (Wang et al., ECCV 2024; wangf3014/SCLIP): attention softmax(q qᵀ s) + softmax(k kᵀ s)
in the last block (d = head width, s = d^-1/2), residual and feed-forward kept as in its official
``clip/model.py``; its position-embedding resampling (``clip/model.py:263-281``) is ClearCLIP's."""

from timm.layers import Attention
from torch import Tensor

from aclip.dense.heads.base import HeadSpec, register_head
from aclip.dense.tower import softmax_affinity


def attention(attn: Attention, q_BHNd: Tensor, k_BHNd: Tensor) -> Tensor:
    """softmax(q qᵀ s) + softmax(k kᵀ s): [B, H, N, N]."""
    return softmax_affinity(q_BHNd, q_BHNd, attn.scale) + softmax_affinity(
        k_BHNd, k_BHNd, attn.scale
    )


register_head(HeadSpec("sclip", pos_interp="clearclip", attention=attention))
