"""``cliper`` (Sun et al., ICCV 2025; linsun449/cliper.code, ``attn_type='fused-attn'``,
``fuse_feature=True``): early-layer fusion. The per-head attention maps of every block but the
last are summed and normalised (:func:`fuse_attention`); every layer's embedding (the normalised
input ``norm1_i(x_i)`` of block i < L, and the raw input of the last block) goes through the last
block's ``norm1``, value projection, the fused attention and the out projection (no residual, no
FFN). The returned per-layer embeddings and the fused affinity feed CLIPer's map combination in
``aclip.dense.protocols``. Position embedding: bilinear to the size
(``modified_clip/model.py:165-174``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from aclip.dense.heads.base import DenseHead, HeadSpec, register_head
from aclip.dense.tower import (
    DenseOutput,
    embed_tokens,
    merge_heads,
    softmax_affinity,
    split_qkv,
    to_joint,
    value_proj,
    with_residual,
)


def fuse_attention(attn_sum_BHNN: Tensor) -> Tensor:
    """CLIPer's normalisation of the summed early-layer attention maps, per image and head:
    column-normalise, row-normalise, symmetrise, subtract each column's mean, clamp at 0,
    row-normalise (``custom_attn`` in cliper.code's ``modified_clip/model.py``).

    The official code normalises the summed maps *in place* inside a loop over the layers, so its
    k-th layer sees k+1 column/row passes (a Sinkhorn iteration per layer, a side effect of the
    in-place ``/=``); we apply the written steps once, the same map for every layer. A row left
    all zero by the clamp stays zero (the official division would give NaN there).
    """
    a_BHNN = attn_sum_BHNN / attn_sum_BHNN.sum(dim=-2, keepdim=True)
    a_BHNN = a_BHNN / a_BHNN.sum(dim=-1, keepdim=True)
    a_BHNN = (a_BHNN + a_BHNN.transpose(-2, -1)) / 2
    a_BHNN = (a_BHNN - a_BHNN.mean(dim=-2, keepdim=True)).clamp(min=0)
    return a_BHNN / a_BHNN.sum(dim=-1, keepdim=True).clamp(min=1e-12)


def forward(head: DenseHead, images_BCHW: Tensor) -> DenseOutput:
    """Every layer's embedding through the last block's value path with the fused attention
    (see the module docstring); ``head`` gives the model and the CLIPer options."""
    vit = head.clip.visual.vit
    x_BND, grid = embed_tokens(vit, images_BCHW, head.pos_interp)
    inputs, attn_sum_BHNN = [], None
    for blk in vit.blocks[:-1]:
        h_BND = blk.norm1(x_BND)
        inputs.append(h_BND)
        q_BHNd, k_BHNd, v_BHNd = split_qkv(blk.attn, h_BND)
        w_BHNN = softmax_affinity(q_BHNd, k_BHNd, blk.attn.scale)
        attn_sum_BHNN = w_BHNN if attn_sum_BHNN is None else attn_sum_BHNN + w_BHNN
        out_BND = merge_heads(blk.attn, torch.matmul(w_BHNN.to(v_BHNd.dtype), v_BHNd), h_BND)
        x_BND = with_residual(blk, x_BND, out_BND)
    inputs.append(x_BND)
    fused_BHNN = fuse_attention(attn_sum_BHNN)
    depth = len(inputs)
    selected = head.select_layer % depth
    layers = range(depth) if head.fuse_layers else [selected]
    last, prefix = vit.blocks[-1], vit.num_prefix_tokens
    embs = []
    for i in layers:
        u_BND = last.norm1(inputs[i])
        v_BHNd = value_proj(last.attn, u_BND)
        out_BND = merge_heads(last.attn, torch.matmul(fused_BHNN.to(v_BHNd.dtype), v_BHNd), u_BND)
        embs.append(F.normalize(to_joint(head.clip, out_BND[:, prefix:]), dim=-1))
    affinity_BNN = fused_BHNN.mean(dim=1)[:, prefix:, prefix:]
    index = selected if head.fuse_layers else 0
    return DenseOutput(torch.stack(embs), grid, index, affinity_BNN)


register_head(HeadSpec("cliper", pos_interp="cliper", forward=forward, min_depth=2))
