"""The pieces of a CLIP image tower every dense head reads: the token sequence on any grid (the
position embedding resampled as each head's official code does), q/k/v of a block's attention,
the heads' merge and output projection, the feed-forward, and the way into the joint space.

A head is a *view* of the model's own weights, never a copy: the tower's blocks run as they are up
to the last one, whose q/k/v are read from its own ``attn.qkv`` (after timm's ``q_norm`` /
``k_norm``), mixed as the head says and sent through its own ``attn.proj``; the tower's final norm
and ``CLIP.image_proj`` then take every patch token into the joint space. Works for any timm
``VisionTransformer`` made of standard timm ``Block`` s (the CLIP-architecture ``vit_*_clip_*``
towers that ``aclip.interop`` imports, and aclip's own towers). The heads themselves are in
:mod:`aclip.dense.heads`, one file each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Attention, resample_abs_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor

from aclip.model.clip import CLIP

# position-embedding resampling on another grid: ``head`` = each head's own
# (``HeadSpec.pos_interp``)
POS_INTERP: tuple[str, ...] = ("head", "clearclip", "maskclip", "cliper", "timm")


@dataclass
class DenseOutput:
    """What a head gives for a batch of images.

    ``emb_LBNE``: L2-normalised patch embeddings in the joint space, per layer (L = 1 except for
    ``cliper``, which gives one per block input), prefix tokens removed, row-major over
    ``grid_hw``. ``selected``: the index into L of the layer the head's answer is read from.
    ``affinity_BNN``: ``cliper`` only, the fused attention averaged over heads, among patches.
    """

    emb_LBNE: Tensor
    grid_hw: tuple[int, int]
    selected: int = -1
    affinity_BNN: Tensor | None = None


def tower_problems(vit: VisionTransformer) -> list[str]:
    """Why the dense heads cannot run on ``vit`` (empty when they can)."""
    problems = []
    for i, blk in enumerate(vit.blocks):
        if type(blk) is not Block or not isinstance(blk.attn, Attention):
            problems.append(f"block {i} is a {type(blk).__name__}, not a timm Block with Attention")
    if vit.global_pool == "map":
        problems.append("attention-pool ('map') towers have no per-token path to the projection")
    if len(vit.blocks) == 0:
        problems.append("the tower has no blocks")
    return problems


def resample_pos_embed(
    pos_1MD: Tensor,
    new_hw: tuple[int, int],
    old_hw: tuple[int, int],
    num_prefix: int,
    mode: str = "timm",
) -> Tensor:
    """A position embedding [1, prefix + h0*w0, D] resampled to the grid ``new_hw`` (prefix
    entries kept): [1, prefix + h*w, D]; on its own grid it is returned unchanged. ``mode``:

    - ``clearclip``: bicubic with ``scale_factor=((h + 0.1) / h0, (w + 0.1) / w0)``, the factor
      (not the size) setting the sampling positions (mc-lan/ClearCLIP
      open_clip/transformer.py:569-587 and wangf3014/SCLIP clip/model.py:263-281, which
      interpolate only when the token count differs; a grid of another shape but the same count
      is resampled here, where they would add the embedding of the square grid unchanged).
    - ``maskclip``: bicubic to the size, ``align_corners=False`` (chongzhou96/MaskCLIP
      mmseg/models/backbones/vit.py:383-410, ``interpolate_mode='bicubic'`` in its configs).
    - ``cliper``: bilinear to the size (linsun449/cliper.code modified_clip/model.py:165-174).
    - ``timm``: timm's ``resample_abs_pos_embed`` (bicubic to the size, antialiased when it
      shrinks).
    """
    if tuple(new_hw) == tuple(old_hw):
        return pos_1MD
    if mode == "timm":
        return resample_abs_pos_embed(
            pos_1MD, new_size=list(new_hw), old_size=list(old_hw), num_prefix_tokens=num_prefix
        )
    (h, w), (h0, w0) = new_hw, old_hw
    prefix_1PD, grid_1ND = pos_1MD[:, :num_prefix], pos_1MD[:, num_prefix:]
    grid_1Dhw = grid_1ND.reshape(1, h0, w0, -1).permute(0, 3, 1, 2)
    if mode == "clearclip":
        scale = ((h + 0.1) / h0, (w + 0.1) / w0)
        out_1Dhw = F.interpolate(grid_1Dhw, scale_factor=scale, mode="bicubic")
    elif mode == "maskclip":
        out_1Dhw = F.interpolate(grid_1Dhw, size=(h, w), mode="bicubic", align_corners=False)
    elif mode == "cliper":
        out_1Dhw = F.interpolate(grid_1Dhw, size=(h, w), mode="bilinear")
    else:
        raise ValueError(f"pos_interp: {mode!r} is not one of {', '.join(POS_INTERP[1:])}")
    if tuple(out_1Dhw.shape[-2:]) != (h, w):  # (ClearCLIP asserts this too)
        raise ValueError(f"{mode} resampling gave {tuple(out_1Dhw.shape[-2:])}, not {(h, w)}")
    return torch.cat([prefix_1PD, out_1Dhw.flatten(2).transpose(1, 2)], dim=1)


def embed_tokens(
    vit: VisionTransformer, images_BCHW: Tensor, pos_interp: str = "timm"
) -> tuple[Tensor, tuple[int, int]]:
    """The token sequence entering the blocks for images of any size divisible by the patch:
    [B, prefix + h*w, D] and (h, w). The position embedding is resampled to (h, w) from the
    tower's own grid by :func:`resample_pos_embed` (``pos_interp``: its mode); on that grid it is
    the tower's own, unchanged. Prefix tokens and the order of the additions are timm's
    ``_pos_embed``.
    """
    pe = vit.patch_embed
    patch_hw = pe.patch_size
    height, width = images_BCHW.shape[-2:]
    if height % patch_hw[0] or width % patch_hw[1]:
        raise ValueError(f"image {height}x{width} is not a multiple of the patch {patch_hw}")
    x_BDhw = pe.proj(images_BCHW)
    grid = (int(x_BDhw.shape[-2]), int(x_BDhw.shape[-1]))
    x_BND = pe.norm(x_BDhw.flatten(2).transpose(1, 2))
    prefix = [
        t.expand(x_BND.shape[0], -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None
    ]
    if vit.pos_embed is None:
        x_BND = torch.cat(prefix + [x_BND], dim=1)
    else:
        pos_1ND = resample_pos_embed(
            vit.pos_embed,
            grid,
            tuple(pe.grid_size),
            0 if vit.no_embed_class else vit.num_prefix_tokens,
            pos_interp,
        )
        if vit.no_embed_class:
            x_BND = torch.cat(prefix + [x_BND + pos_1ND], dim=1)
        else:
            x_BND = torch.cat(prefix + [x_BND], dim=1) + pos_1ND
    return vit.norm_pre(vit.patch_drop(vit.pos_drop(x_BND))), grid


def split_qkv(attn: Attention, x_BND: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v [B, H, N, d] of ``attn`` on its (already normalised) input, as timm computes them
    (``qkv`` then ``q_norm`` / ``k_norm``)."""
    batch, tokens, _ = x_BND.shape
    qkv = attn.qkv(x_BND).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)
    q_BHNd, k_BHNd, v_BHNd = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q_BHNd), attn.k_norm(k_BHNd), v_BHNd


def value_proj(attn: Attention, x_BND: Tensor) -> Tensor:
    """Only v [B, H, N, d] of ``attn``: the value rows of its ``qkv`` weight and bias."""
    dim = attn.num_heads * attn.head_dim
    weight = attn.qkv.weight[2 * dim :]
    bias = None if attn.qkv.bias is None else attn.qkv.bias[2 * dim :]
    batch, tokens, _ = x_BND.shape
    v_BNHd = F.linear(x_BND, weight, bias).reshape(batch, tokens, attn.num_heads, attn.head_dim)
    return v_BNHd.transpose(1, 2)


def merge_heads(attn: Attention, out_BHNd: Tensor, x_BND: Tensor) -> Tensor:
    """Heads concatenated, then ``attn``'s own output path (``norm``, the optional gate on the
    block's normalised input ``x_BND``, ``proj``): [B, N, D]."""
    batch, _, tokens, _ = out_BHNd.shape
    out_BND = attn.norm(out_BHNd.transpose(1, 2).reshape(batch, tokens, -1))
    if getattr(attn, "gate", None) is not None:
        out_BND = out_BND * attn.gate(x_BND).sigmoid()
    return attn.proj_drop(attn.proj(out_BND))


def softmax_affinity(a_BHNd: Tensor, b_BHNd: Tensor, scale: float) -> Tensor:
    """softmax(a bᵀ · scale) over the last axis: [B, H, N, N], in float32."""
    logits_BHNN = torch.matmul(a_BHNd.float(), b_BHNd.float().transpose(-2, -1)) * scale
    return logits_BHNN.softmax(dim=-1)


def ffn(blk: Block, x_BND: Tensor) -> Tensor:
    """The block's feed-forward with its residual: x + ls2(mlp(norm2(x)))."""
    return x_BND + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x_BND))))


def with_residual(blk: Block, x_BND: Tensor, attended_BND: Tensor) -> Tensor:
    """The block around an attention output: the residual, then the feed-forward (timm's order)."""
    return ffn(blk, x_BND + blk.drop_path1(blk.ls1(attended_BND)))


def to_joint(clip: CLIP, tokens_BND: Tensor) -> Tensor:
    """Tokens through the tower's final norm (and ``fc_norm``, identity for token pooling) and
    ``CLIP.image_proj``: [B, N, embed_dim], not normalised."""
    vit = clip.visual.vit
    return clip.image_proj(vit.fc_norm(vit.norm(tokens_BND)))
