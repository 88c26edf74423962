"""What a dense head is, the registry of heads, and :class:`DenseHead`, which runs one.

A head is a :class:`HeadSpec` registered from its own file in this package (``vanilla.py``,
``maskclip.py``, ...): most heads change only the tower's last block (its attention weights, and
whether the residual and feed-forward stay around it); a head with its own way through the tower
(CLIPer's early-layer fusion) gives ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import Tensor

from aclip.dense.tower import (
    POS_INTERP,
    DenseOutput,
    embed_tokens,
    merge_heads,
    split_qkv,
    to_joint,
    tower_problems,
    with_residual,
)
from aclip.model.clip import CLIP

# the last block's attention weights [B, H, N, N] from its attention module, q and k [B, H, N, d]
AttentionFn = Callable[[Attention, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class HeadSpec:
    """One dense head.

    ``pos_interp``: how its official code resamples the position embedding on another grid (one
    of :data:`aclip.dense.tower.POS_INTERP` but ``head``). ``attention``: the last block's
    attention weights; None = the identity (each token takes its own value, MaskCLIP).
    ``plain``: the last block runs as it is (unless ``ignore_residual``). ``residual``: the
    block's residual and feed-forward stay around the new attention (unless ``ignore_residual``).
    ``forward``: a head with its own way through the tower, ``forward(dense_head, images_BCHW)``
    (the fields above then unused). ``min_depth``: the fewest blocks it needs.
    """

    name: str
    pos_interp: str
    attention: AttentionFn | None = None
    plain: bool = False
    residual: bool = True
    forward: Callable[[DenseHead, Tensor], DenseOutput] | None = None
    min_depth: int = 1


_HEADS: dict[str, HeadSpec] = {}


def register_head(spec: HeadSpec) -> HeadSpec:
    """Make ``spec`` a head of :class:`DenseHead` (and of ``evals.segmentation --head``)."""
    if spec.name in _HEADS:
        raise ValueError(f"dense head {spec.name!r} is registered twice")
    if spec.pos_interp not in POS_INTERP[1:]:
        raise ValueError(f"head {spec.name!r}: pos_interp {spec.pos_interp!r} is not a mode")
    _HEADS[spec.name] = spec
    return spec


def head_names() -> tuple[str, ...]:
    """The registered heads, in registration order."""
    return tuple(_HEADS)


def get_head(name: str) -> HeadSpec:
    """The head called ``name``; a ValueError naming the registered ones otherwise."""
    if name not in _HEADS:
        raise ValueError(f"unknown dense head {name!r}; choose one of {', '.join(_HEADS)}")
    return _HEADS[name]


def last_block(head: str, blk: Block, x_BND: Tensor, ignore_residual: bool = False) -> Tensor:
    """The last block's output [B, N, D] under ``head`` (a head that changes only the last
    block); see each head's file for its formula and source.

    ``ignore_residual``: ClearCLIP's switch (``VisionTransformer.forward`` in its
    ``open_clip/transformer.py:524-526``; ``base_config.py`` sets it for every ``model_type``):
    the attention output alone, ``proj(A v)`` on norm1(x), without the residual, the feed-forward
    and layer scale. ``clearclip`` always runs so (its method)."""
    spec = get_head(head)
    if spec.forward is not None:
        raise ValueError(f"dense head {head!r} has its own forward, not a last block")
    if spec.plain and not ignore_residual:
        return blk(x_BND)
    attn = blk.attn
    h_BND = blk.norm1(x_BND)
    q_BHNd, k_BHNd, v_BHNd = split_qkv(attn, h_BND)
    if spec.attention is None:  # identity attention: each token takes its own value
        out_BHNd = v_BHNd
    else:
        w_BHNN = spec.attention(attn, q_BHNd, k_BHNd)
        out_BHNd = torch.matmul(w_BHNN.to(v_BHNd.dtype), v_BHNd)
    attended_BND = merge_heads(attn, out_BHNd, h_BND)
    if ignore_residual or not spec.residual:  # (ClearCLIP's code has no layer scale either)
        return attended_BND
    return with_residual(blk, x_BND, attended_BND)


class DenseHead:
    """A dense head over ``clip``'s image tower (a view: it holds the model, copies nothing).

    ``head``: a registered head (:func:`head_names`). ``cliper`` options: ``select_layer`` (index
    into the block inputs, -1 = the last block's input, as CLIPer's ``select_layer``) and
    ``fuse_layers`` (CLIPer's ``fuse_feature``: embed every layer; False embeds only the selected
    one). ``ignore_residual``: ClearCLIP's variant of ``vanilla`` / ``maskclip`` / ``sclip`` (the
    last block's attention output alone, see :func:`last_block`; ``clearclip`` and ``cliper``
    have no residual or FFN in their last block anyway). ``pos_interp``: how the position
    embedding is resampled on another grid (:data:`aclip.dense.tower.POS_INTERP`; ``head``: the
    head's official code's, ``HeadSpec.pos_interp``).
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
        spec = get_head(head)
        problems = tower_problems(clip.visual.vit)
        if problems:
            raise ValueError("the dense heads cannot run on this tower: " + "; ".join(problems))
        depth = len(clip.visual.vit.blocks)
        if depth < spec.min_depth:
            raise ValueError(
                f"{head} fuses the attention of the blocks before the last: needs >= "
                f"{spec.min_depth}"
            )
        if not -depth <= select_layer < depth:
            raise ValueError(f"select_layer {select_layer} is outside the {depth} block inputs")
        if pos_interp not in POS_INTERP:
            raise ValueError(f"pos_interp: {pos_interp!r} is not one of {', '.join(POS_INTERP)}")
        self.clip, self.head, self.spec = clip, head, spec
        self.select_layer, self.fuse_layers = select_layer, fuse_layers
        self.ignore_residual = ignore_residual
        self.pos_interp = spec.pos_interp if pos_interp == "head" else pos_interp

    @property
    def patch_size(self) -> tuple[int, int]:
        """The tower's patch size (height, width)."""
        return tuple(self.clip.visual.vit.patch_embed.patch_size)

    def __call__(self, images_BCHW: Tensor) -> DenseOutput:
        """Per-patch joint-space embeddings of ``images_BCHW`` (see :class:`DenseOutput`)."""
        if self.spec.forward is not None:
            return self.spec.forward(self, images_BCHW)
        vit = self.clip.visual.vit
        x_BND, grid = embed_tokens(vit, images_BCHW, self.pos_interp)
        for blk in vit.blocks[:-1]:
            x_BND = blk(x_BND)
        x_BND = last_block(self.head, vit.blocks[-1], x_BND, self.ignore_residual)
        emb_BNE = to_joint(self.clip, x_BND[:, vit.num_prefix_tokens :])
        return DenseOutput(F.normalize(emb_BNE, dim=-1).unsqueeze(0), grid, 0)
