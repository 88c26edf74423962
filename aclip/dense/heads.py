"""Training-free dense heads on a CLIP image tower: per-patch embeddings in the joint space.

A head is a *view* of the model's own weights, never a copy: the tower's blocks run as they are up
to the last one, whose q/k/v are read from its own ``attn.qkv`` (after timm's ``q_norm`` /
``k_norm``), mixed as the head says and sent through its own ``attn.proj``; the tower's final norm
and ``CLIP.image_proj`` then take every patch token into the joint space. Works for any timm
``VisionTransformer`` made of standard timm ``Block`` s (the CLIP-architecture ``vit_*_clip_*``
towers that ``aclip.interop`` imports, and aclip's own towers); other grids than the training one
resample the position embedding as each head's official code does (:func:`resample_pos_embed`).

Heads (formulas in the functions below; d = head width, s = d^-1/2):

- ``vanilla``: the last block as it is.
- ``maskclip`` (Zhou et al., ECCV 2022; chongzhou96/MaskCLIP): the last block's attention replaced
  by the identity, i.e. only the value path ``proj(v)``. Its official ViT backbone keeps the
  block's residual and feed-forward around it (``v += x; v = ffn(norm2(v), identity=v)`` in
  ``mmseg/models/backbones/vit.py``), and so do we (ClearCLIP's re-implementation drops them:
  ``ignore_residual``).
- ``sclip`` (Wang et al., ECCV 2024; wangf3014/SCLIP): attention softmax(q qᵀ s) + softmax(k kᵀ s)
  in the last block, residual and feed-forward kept as in its official ``clip/model.py``.
- ``clearclip`` (Lan et al., ECCV 2024; mc-lan/ClearCLIP, ``model_type='ClearCLIP'``,
  ``ignore_residual=True``): softmax(q qᵀ s) v on norm1(x), then the out projection; no residual,
  no feed-forward.
- ``cliper`` (Sun et al., ICCV 2025; linsun449/cliper.code, ``attn_type='fused-attn'``,
  ``fuse_feature=True``): early-layer fusion. The per-head attention maps of every block but the
  last are summed and normalised (:func:`fuse_attention`); every layer's embedding (the normalised
  input ``norm1_i(x_i)`` of block i < L, and the raw input of the last block) goes through the last
  block's ``norm1``, value projection, the fused attention and the out projection (no residual, no
  FFN). The returned per-layer embeddings and the fused affinity feed CLIPer's map combination in
  ``aclip.dense.segment``.

``ignore_residual`` (ClearCLIP's ``base_config.py`` sets it for every ``model_type``, so its
vanilla, MaskCLIP and SCLIP comparison rows run so): ``vanilla``, ``maskclip`` and ``sclip`` give
their last block's attention output alone, ``proj(A v)``, without residual and feed-forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Attention, resample_abs_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor

from aclip.model.clip import CLIP

HEADS: tuple[str, ...] = ("vanilla", "maskclip", "sclip", "clearclip", "cliper")
# position-embedding resampling on another grid: ``head`` = each head's own (HEAD_POS_INTERP)
POS_INTERP: tuple[str, ...] = ("head", "clearclip", "maskclip", "cliper", "timm")
HEAD_POS_INTERP = {
    "vanilla": "clearclip",  # its row in ClearCLIP's and SCLIP's comparisons
    "maskclip": "maskclip",
    "sclip": "clearclip",  # SCLIP's clip/model.py:263-281 is the same function
    "clearclip": "clearclip",
    "cliper": "cliper",
}


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


def _ffn(blk: Block, x_BND: Tensor) -> Tensor:
    return x_BND + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x_BND))))


def _with_residual(blk: Block, x_BND: Tensor, attended_BND: Tensor) -> Tensor:
    return _ffn(blk, x_BND + blk.drop_path1(blk.ls1(attended_BND)))


def _attention_weights(head: str, attn: Attention, q_BHNd: Tensor, k_BHNd: Tensor) -> Tensor:
    """The last block's attention [B, H, N, N] under ``head`` (maskclip: not called)."""
    if head == "vanilla":
        return softmax_affinity(q_BHNd, k_BHNd, attn.scale)
    if head == "sclip":
        return softmax_affinity(q_BHNd, q_BHNd, attn.scale) + softmax_affinity(
            k_BHNd, k_BHNd, attn.scale
        )
    if head == "clearclip":
        return softmax_affinity(q_BHNd, q_BHNd, attn.scale)
    raise ValueError(f"unknown dense head {head!r} for the last block (one of {HEADS[:4]})")


def last_block(head: str, blk: Block, x_BND: Tensor, ignore_residual: bool = False) -> Tensor:
    """The last block's output [B, N, D] under ``head`` (one of vanilla, maskclip, sclip,
    clearclip); see the module docstring for each formula and its source.

    ``ignore_residual``: ClearCLIP's switch (``VisionTransformer.forward`` in its
    ``open_clip/transformer.py:524-526``; ``base_config.py`` sets it for every ``model_type``):
    the attention output alone, ``proj(A v)`` on norm1(x), without the residual, the feed-forward
    and layer scale. ``clearclip`` always runs so (its method)."""
    if head == "vanilla" and not ignore_residual:
        return blk(x_BND)
    attn = blk.attn
    h_BND = blk.norm1(x_BND)
    q_BHNd, k_BHNd, v_BHNd = split_qkv(attn, h_BND)
    if head == "maskclip":  # identity attention: each token takes its own value
        out_BHNd = v_BHNd
    else:
        w_BHNN = _attention_weights(head, attn, q_BHNd, k_BHNd)
        out_BHNd = torch.matmul(w_BHNN.to(v_BHNd.dtype), v_BHNd)
    attended_BND = merge_heads(attn, out_BHNd, h_BND)
    if ignore_residual or head == "clearclip":  # (ClearCLIP's code has no layer scale either)
        return attended_BND
    return _with_residual(blk, x_BND, attended_BND)


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


def to_joint(clip: CLIP, tokens_BND: Tensor) -> Tensor:
    """Tokens through the tower's final norm (and ``fc_norm``, identity for token pooling) and
    ``CLIP.image_proj``: [B, N, embed_dim], not normalised."""
    vit = clip.visual.vit
    return clip.image_proj(vit.fc_norm(vit.norm(tokens_BND)))


class DenseHead:
    """A dense head over ``clip``'s image tower (a view: it holds the model, copies nothing).

    ``head``: one of :data:`HEADS`. ``cliper`` options: ``select_layer`` (index into the block
    inputs, -1 = the last block's input, as CLIPer's ``select_layer``) and ``fuse_layers``
    (CLIPer's ``fuse_feature``: embed every layer; False embeds only the selected one).
    ``ignore_residual``: ClearCLIP's variant of ``vanilla`` / ``maskclip`` / ``sclip`` (the last
    block's attention output alone, see :func:`last_block`; ``clearclip`` and ``cliper`` have no
    residual or FFN in their last block anyway). ``pos_interp``: how the position embedding is
    resampled on another grid (:data:`POS_INTERP`; ``head``: each head's official code's,
    :data:`HEAD_POS_INTERP`).
    Call it on normalised images [B, 3, H, W] (H, W multiples of the patch) under no_grad.
    """

    def __init__(
        self,
        clip: CLIP,
        head: str = "clearclip",
        select_layer: int = -1,
        fuse_layers: bool = True,
        ignore_residual: bool = False,
        pos_interp: str = "head",
    ) -> None:
        if head not in HEADS:
            raise ValueError(f"unknown dense head {head!r}; choose one of {', '.join(HEADS)}")
        problems = tower_problems(clip.visual.vit)
        if problems:
            raise ValueError("the dense heads cannot run on this tower: " + "; ".join(problems))
        depth = len(clip.visual.vit.blocks)
        if head == "cliper" and depth < 2:
            raise ValueError("cliper fuses the attention of the blocks before the last: needs >= 2")
        if not -depth <= select_layer < depth:
            raise ValueError(f"select_layer {select_layer} is outside the {depth} block inputs")
        if pos_interp not in POS_INTERP:
            raise ValueError(f"pos_interp: {pos_interp!r} is not one of {', '.join(POS_INTERP)}")
        self.clip, self.head = clip, head
        self.select_layer, self.fuse_layers = select_layer, fuse_layers
        self.ignore_residual = ignore_residual
        self.pos_interp = HEAD_POS_INTERP[head] if pos_interp == "head" else pos_interp

    @property
    def patch_size(self) -> tuple[int, int]:
        """The tower's patch size (height, width)."""
        return tuple(self.clip.visual.vit.patch_embed.patch_size)

    def __call__(self, images_BCHW: Tensor) -> DenseOutput:
        """Per-patch joint-space embeddings of ``images_BCHW`` (see :class:`DenseOutput`)."""
        if self.head == "cliper":
            return self._cliper(images_BCHW)
        vit = self.clip.visual.vit
        x_BND, grid = embed_tokens(vit, images_BCHW, self.pos_interp)
        for blk in vit.blocks[:-1]:
            x_BND = blk(x_BND)
        x_BND = last_block(self.head, vit.blocks[-1], x_BND, self.ignore_residual)
        emb_BNE = to_joint(self.clip, x_BND[:, vit.num_prefix_tokens :])
        return DenseOutput(F.normalize(emb_BNE, dim=-1).unsqueeze(0), grid, 0)

    def _cliper(self, images_BCHW: Tensor) -> DenseOutput:
        vit = self.clip.visual.vit
        x_BND, grid = embed_tokens(vit, images_BCHW, self.pos_interp)
        inputs, attn_sum_BHNN = [], None
        for blk in vit.blocks[:-1]:
            h_BND = blk.norm1(x_BND)
            inputs.append(h_BND)
            q_BHNd, k_BHNd, v_BHNd = split_qkv(blk.attn, h_BND)
            w_BHNN = softmax_affinity(q_BHNd, k_BHNd, blk.attn.scale)
            attn_sum_BHNN = w_BHNN if attn_sum_BHNN is None else attn_sum_BHNN + w_BHNN
            out_BND = merge_heads(blk.attn, torch.matmul(w_BHNN.to(v_BHNd.dtype), v_BHNd), h_BND)
            x_BND = _with_residual(blk, x_BND, out_BND)
        inputs.append(x_BND)
        fused_BHNN = fuse_attention(attn_sum_BHNN)
        depth = len(inputs)
        selected = self.select_layer % depth
        layers = range(depth) if self.fuse_layers else [selected]
        last, prefix = vit.blocks[-1], vit.num_prefix_tokens
        embs = []
        for i in layers:
            u_BND = last.norm1(inputs[i])
            v_BHNd = value_proj(last.attn, u_BND)
            out_BND = merge_heads(
                last.attn, torch.matmul(fused_BHNN.to(v_BHNd.dtype), v_BHNd), u_BND
            )
            embs.append(F.normalize(to_joint(self.clip, out_BND[:, prefix:]), dim=-1))
        affinity_BNN = fused_BHNN.mean(dim=1)[:, prefix:, prefix:]
        index = selected if self.fuse_layers else 0
        return DenseOutput(torch.stack(embs), grid, index, affinity_BNN)
