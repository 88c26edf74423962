"""Architecture: whether a timm ViT is a CLIP-architecture image tower (and why not), its
sizes, the timm ``vit_*_clip_*`` name and kwargs that rebuild it, and module signatures to
compare two towers by."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

import timm
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from aclip.config import ModelConfig
from aclip.interop.weights import LN_EPS, NotExpressible


@dataclass(frozen=True)
class ClipVisionArch:
    """What defines a CLIP (OpenAI / open_clip native) ViT image tower."""

    width: int
    layers: int
    heads: int
    patch_size: int
    image_size: int
    mlp_hidden: int
    act: str  # gelu | quick_gelu


def _is_clip_ln(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.LayerNorm)
        and abs(module.eps - LN_EPS) < 1e-12
        and module.elementwise_affine
        and module.bias is not None
    )


def activation_name(module: nn.Module) -> str | None:
    """``gelu`` (exact GELU, torch's or timm's), ``quick_gelu``, or None for anything else."""
    name = type(module).__name__
    if name == "GELU" and getattr(module, "approximate", "none") == "none":
        return "gelu"
    return "quick_gelu" if name == "QuickGELU" else None


def _block_problems(blk: nn.Module) -> list[str]:
    if type(blk) is not Block or not isinstance(blk.attn, Attention) or type(blk.mlp) is not Mlp:
        return [f"a {type(blk).__name__}, not timm's plain Block/Attention/Mlp"]
    attn, mlp = blk.attn, blk.mlp
    problems = []
    if not (_is_clip_ln(blk.norm1) and _is_clip_ln(blk.norm2)):
        problems.append(f"norms are not LayerNorm(eps={LN_EPS})")
    if not all(isinstance(m, nn.Identity) for m in (blk.ls1, blk.ls2, mlp.norm, attn.norm)):
        problems.append("layer scale or extra norms")
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
        problems.append("qk-norm")
    if any(lin.bias is None for lin in (attn.qkv, attn.proj, mlp.fc1, mlp.fc2)):
        problems.append("a linear layer without bias")
    if activation_name(mlp.act) is None:
        problems.append(f"activation {type(mlp.act).__name__}, not GELU/QuickGELU")
    return problems


def _blocks_problems(blocks: nn.Sequential) -> list[str]:
    """Each kind of block problem once, with the blocks that have it."""
    where: dict[str, list[int]] = {}
    for i, blk in enumerate(blocks):
        for problem in _block_problems(blk):
            where.setdefault(problem, []).append(i)
    n = len(blocks)
    return [
        f"{'all blocks' if len(idx) == n else 'blocks ' + ','.join(map(str, idx))}: {problem}"
        for problem, idx in where.items()
    ]


def clip_vision_problems(vit: VisionTransformer) -> list[str]:
    """Why this timm ViT is not a CLIP-architecture tower (empty when it is one).

    A CLIP tower (OpenAI's, open_clip's native ``VisionTransformer``, timm's ``vit_*_clip_*``):
    bias-free patch conv, one class token, learned position embedding over it and the patches,
    LayerNorm before the blocks (``ln_pre`` = ``norm_pre``), plain pre-LN blocks with biases and
    GELU/QuickGELU, final LayerNorm (``ln_post`` = ``norm``) and the class token pooled; all
    LayerNorms with eps 1e-5.
    """
    problems = []
    if not vit.has_class_token or vit.num_prefix_tokens != 1:
        problems.append("needs one class token and no register tokens")
    if vit.no_embed_class or vit.pos_embed is None:
        problems.append("needs a learned position embedding over the class token and patches")
    if vit.global_pool != "token" or not isinstance(vit.fc_norm, nn.Identity):
        problems.append(f"pools by global_pool={vit.global_pool!r}; CLIP takes the class token")
    if not _is_clip_ln(vit.norm_pre):
        problems.append(f"no LayerNorm(eps={LN_EPS}) before the blocks (ln_pre; timm pre_norm)")
    if not _is_clip_ln(vit.norm):
        problems.append(f"no final LayerNorm(eps={LN_EPS}) (ln_post)")
    proj = vit.patch_embed.proj
    if not isinstance(proj, nn.Conv2d):
        problems.append(f"the patch embedding is a {type(proj).__name__} (model.patch_stem=conv); "
                        "CLIP's conv1 is one patch convolution")  # fmt: skip
    elif proj.bias is not None:
        problems.append("the patch embedding has a bias (CLIP's conv1 has none)")
    if not isinstance(vit.patch_embed.norm, nn.Identity):
        problems.append("the patch embedding has a norm")
    ph, pw = vit.patch_embed.patch_size
    if ph != pw or len(set(vit.patch_embed.img_size)) != 1:
        problems.append("needs square patches and a square image")
    return problems + _blocks_problems(vit.blocks)


def clip_vision_arch(vit: VisionTransformer) -> ClipVisionArch:
    """The CLIP architecture of ``vit``; ``NotExpressible`` names why it has none."""
    problems = clip_vision_problems(vit)
    if problems:
        raise NotExpressible("not a CLIP-architecture vision tower: " + "; ".join(problems))
    blk = vit.blocks[0]
    acts = {activation_name(b.mlp.act) for b in vit.blocks}
    if len(acts) != 1:
        raise NotExpressible(f"blocks mix activations {sorted(acts)}")
    return ClipVisionArch(
        width=int(vit.embed_dim),
        layers=len(vit.blocks),
        heads=int(blk.attn.num_heads),
        patch_size=int(vit.patch_embed.proj.kernel_size[0]),
        image_size=int(vit.patch_embed.img_size[0]),
        mlp_hidden=int(blk.mlp.fc1.out_features),
        act=acts.pop(),
    )


# timm's CLIP tower sizes: (width, layers, heads, mlp hidden) -> the name's size word
_TIMM_CLIP_SIZES = {
    (256, 10, 4, 1024): "xsmall",
    (512, 12, 8, 2048): "medium",
    (640, 12, 10, 2560): "betwixt",
    (768, 12, 12, 3072): "base",
    (1024, 24, 16, 4096): "large",
    (1280, 32, 16, 5120): "huge",
    (1408, 40, 16, 6144): "giant",
    (1664, 48, 16, 8192): "gigantic",
}


def timm_vision_config(arch: ClipVisionArch) -> tuple[str, dict[str, Any]]:
    """A timm model name and kwargs that build exactly ``arch`` (at ``arch.image_size``, passed
    as ``model.image_size``): the matching ``vit_*_clip_*`` name where timm registers one, else
    ``vit_base_patch16_clip_224`` with the sizes as kwargs."""
    size = _TIMM_CLIP_SIZES.get((arch.width, arch.layers, arch.heads, arch.mlp_hidden))
    quick = arch.act == "quick_gelu"
    if size is not None:
        for qg, extra in ((quick, {}), (False, {"act_layer": "quick_gelu"} if quick else {})):
            for res in (arch.image_size, 224):
                name = f"vit_{size}_patch{arch.patch_size}_clip_{'quickgelu_' if qg else ''}{res}"
                if timm.is_model(name):
                    return name, dict(extra)
    kwargs: dict[str, Any] = {
        "patch_size": arch.patch_size,
        "embed_dim": arch.width,
        "depth": arch.layers,
        "num_heads": arch.heads,
    }
    if arch.mlp_hidden != 4 * arch.width:
        kwargs["mlp_ratio"] = _ratio(arch.mlp_hidden, arch.width)
    name = "vit_base_patch16_clip_quickgelu_224" if quick else "vit_base_patch16_clip_224"
    return name, kwargs


def _ratio(hidden: int, width: int) -> float:
    """An MLP ratio r with int(width * r) == hidden (timm and open_clip both truncate)."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def _model_config(
    arch: ClipVisionArch | None,
    text: dict[str, int],
    text_act: str,
    embed_dim: int,
    vision: tuple[str, dict[str, Any], int] | None = None,
) -> ModelConfig:
    if arch is not None:
        name, kwargs = timm_vision_config(arch)
        vision = (name, kwargs, arch.image_size)
    assert vision is not None
    return ModelConfig(
        vision_model=vision[0],
        vision_kwargs=vision[1],
        image_size=vision[2],
        embed_dim=embed_dim,
        context_length=text["context_length"],
        vocab_size=text["vocab_size"],
        text_width=text["width"],
        text_layers=text["layers"],
        text_heads=text["heads"],
        text_act=text_act,
    )


def _signature(module: nn.Module) -> list[str]:
    """The module's structure as lines, dropout rates aside (training-time only)."""
    text = re.sub(r"Dropout\(p=[^)]*\)", "Dropout()", repr(module))
    text = re.sub(r"DropPath\([^)]*\)", "Identity()", text)
    return text.splitlines()


def _first_difference(ours: list[str], theirs: list[str]) -> str:
    for line in difflib.unified_diff(theirs, ours, lineterm="", n=0):
        if line[:1] in "+-" and not line.startswith(("+++", "---")):
            return line[1:].strip()
    return "(same lines, different order)"
