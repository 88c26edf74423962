"""Pretrained CLIP weights in and out: OpenAI releases, open_clip checkpoints and folders, timm.

Everything here is a pure function on state dicts and models; nothing is downloaded.

In: ``read_weights`` turns any of

- an OpenAI release (a TorchScript archive, or a plain state dict in its layout:
  ``visual.conv1.weight``, ``visual.transformer.resblocks.N.attn.in_proj_weight``, ...),
- an open_clip checkpoint (``.pt``/``.bin``/``.pth``/``.safetensors``; ``state_dict`` wrappers and
  ``module.`` prefixes are unwrapped) with its model name or its ``open_clip_config.json``,
- an open_clip ``local-dir`` folder (``open_clip_config.json`` + weights),
- an aclip run (through ``aclip.train.checkpoint.load_eval_model``)

into aclip's ``CLIP`` state-dict layout plus the ``ModelConfig`` that represents the model exactly
(vision tower as a timm ``vit_*_clip_*`` model, text tower sizes and activation). ``load_clip``
builds that model; ``init_from`` loads the weights into an existing model and refuses a key,
shape or architecture that does not fit, naming it. A model with another image size gets the
position embedding resampled (timm's ``resample_abs_pos_embed``); a shorter context length
truncates the text position embedding.

Out: ``export_open_clip`` writes a folder that ``open_clip.create_model_and_transforms(
"local-dir:DIR")`` loads strictly; ``to_openai_state_dict`` gives OpenAI's layout (which timm's
``checkpoint_filter_fn`` reads); ``export_timm`` writes a timm ``local-dir`` folder of the vision
tower. A model open_clip cannot express is refused with the reason (``NotExpressible``).
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import Any

import timm
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import load_file, save_file
from timm.layers import Attention, Mlp, resample_abs_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from aclip.config import ConfigError, ModelConfig
from aclip.interop import safe_load
from aclip.interop.torchscript import TorchScriptReadError, read_torchscript_state_dict
from aclip.model import build_clip
from aclip.model.clip import CLIP

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
LOCAL_DIR = "local-dir:"
# keys of OpenAI's TorchScript archives that are not weights, and the causal mask (a constant
# derived from the context length) that a scripted open_clip model lists as a buffer
NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
OPENAI_HEAD_WIDTH = 64  # OpenAI's towers have 64-wide heads (as open_clip's build from OpenAI)
LN_EPS = 1e-5  # CLIP's LayerNorms (OpenAI, open_clip, timm vit_*_clip_*)
ALPHA_KEY = "visual.alpha_conv.weight"  # Alpha-CLIP's alpha conv (model.alpha_channel)


class WeightsError(ValueError):
    """Weights that cannot be read, or that do not fit the model: names the keys and shapes."""


class NotExpressible(ValueError):
    """A model that the requested format (open_clip, OpenAI layout) cannot represent."""


@dataclass(frozen=True)
class Preprocess:
    """The image preprocessing a model expects (open_clip's ``preprocess_cfg`` fields)."""

    size: int
    mean: tuple[float, ...] = tuple(OPENAI_DATASET_MEAN)
    std: tuple[float, ...] = tuple(OPENAI_DATASET_STD)
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def to_open_clip(self) -> dict[str, Any]:
        """As open_clip's ``preprocess_cfg`` (``open_clip_config.json``)."""
        cfg = asdict(self)
        cfg["mean"], cfg["std"] = list(self.mean), list(self.std)
        return cfg

    def transform(self) -> Callable:
        """The evaluation transform: aclip's own for bicubic shortest-side resize + centre
        crop (the same steps as open_clip's), open_clip's ``image_transform_v2`` otherwise."""
        if self.interpolation == "bicubic" and self.resize_mode == "shortest":
            from aclip.data.views import eval_transform

            return eval_transform(self.size, self.mean, self.std)
        from open_clip.transform import PreprocessCfg, image_transform_v2

        return image_transform_v2(PreprocessCfg(**asdict(self)), is_train=False)


@dataclass
class Weights:
    """Weights in aclip's ``CLIP`` layout, with the config that represents them exactly."""

    state_dict: dict[str, Tensor]
    model_cfg: ModelConfig
    preprocess: Preprocess
    source: str  # openai | open_clip | aclip
    layout: str = "aclip"  # the file's key layout: openai | open_clip_timm | aclip
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ key layouts
_VISION_BLOCK = [
    ("ln_1.{p}", "norm1.{p}"),
    ("attn.in_proj_{p}", "attn.qkv.{p}"),
    ("attn.out_proj.{p}", "attn.proj.{p}"),
    ("ln_2.{p}", "norm2.{p}"),
    ("mlp.c_fc.{p}", "mlp.fc1.{p}"),
    ("mlp.c_proj.{p}", "mlp.fc2.{p}"),
]
_TEXT_BLOCK = [
    ("ln_1.{p}", "ln1.{p}"),
    ("attn.in_proj_{p}", "attn.qkv.{p}"),
    ("attn.out_proj.{p}", "attn.proj.{p}"),
    ("ln_2.{p}", "ln2.{p}"),
    ("mlp.c_fc.{p}", "fc1.{p}"),
    ("mlp.c_proj.{p}", "fc2.{p}"),
]
# (OpenAI / open_clip key, aclip key, reshape); the reshape names how the tensors differ
_TEXT_RULES = [
    ("token_embedding.weight", "text.token_embedding.weight", None),
    ("positional_embedding", "text.positional_embedding", None),
    *[(f"transformer.resblocks.{{i}}.{o}", f"text.blocks.{{i}}.{a}", None) for o, a in _TEXT_BLOCK],
    ("ln_final.{p}", "text.ln_final.{p}", None),
    ("text_projection", "text_proj.weight", "transpose"),
    ("logit_scale", "logit_scale", "scalar"),
]
OPENAI_RULES = [
    ("visual.conv1.weight", "visual.vit.patch_embed.proj.weight", None),
    ("visual.class_embedding", "visual.vit.cls_token", "cls"),
    ("visual.positional_embedding", "visual.vit.pos_embed", "pos"),
    ("visual.ln_pre.{p}", "visual.vit.norm_pre.{p}", None),
    *[
        (f"visual.transformer.resblocks.{{i}}.{o}", f"visual.vit.blocks.{{i}}.{a}", None)
        for o, a in _VISION_BLOCK
    ],
    ("visual.ln_post.{p}", "visual.vit.norm.{p}", None),
    ("visual.proj", "image_proj.weight", "transpose"),
    *_TEXT_RULES,
]
# open_clip with a timm trunk (``TimmModel``: ``visual.trunk`` + ``visual.head.proj``)
TIMM_TRUNK_RULES = [
    ("visual.trunk.{rest}", "visual.vit.{rest}", None),
    ("visual.head.proj.weight", "image_proj.weight", None),
    *_TEXT_RULES,
]
LAYOUT_RULES = {"openai": OPENAI_RULES, "open_clip_timm": TIMM_TRUNK_RULES}
_FIELDS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)", "rest": r"(?P<rest>.+)"}


@cache
def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    body = "".join(_FIELDS[p[1:-1]] if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(body + r"\Z")


def _reshape(kind: str | None, value: Tensor, to_aclip: bool, key: str) -> Tensor:
    """OpenAI ↔ aclip tensor shapes: cls [W] ↔ [1,1,W], pos [N,W] ↔ [1,N,W], matrices
    [in,out] ↔ [out,in], logit scale [] ↔ [1]."""
    want = {"cls": 1, "pos": 2, "transpose": 2}.get(kind or "")
    if to_aclip is False and kind in ("cls", "pos"):
        want = 3
    if want is not None and value.dim() != want:
        raise WeightsError(f"{key}: expected a {want}-D tensor, got shape {tuple(value.shape)}")
    if kind == "scalar" and value.numel() != 1:
        raise WeightsError(f"{key}: expected one value, got shape {tuple(value.shape)}")
    if kind == "transpose":
        return value.t().contiguous()
    if kind == "scalar":
        return value.reshape(1) if to_aclip else value.reshape(())
    if kind == "cls":
        return value.reshape(1, 1, -1) if to_aclip else value.reshape(-1)
    if kind == "pos":
        return value.unsqueeze(0) if to_aclip else value[0]
    return value


def _compiled(
    rules: list[tuple[str, str, str | None]], to_aclip: bool
) -> list[tuple[re.Pattern, str, str | None]]:
    src_i, dst_i = (0, 1) if to_aclip else (1, 0)
    return [(_pattern(r[src_i]), r[dst_i], r[2]) for r in rules]


def rename_key(
    key: str, rules: list[tuple[str, str, str | None]], to_aclip: bool
) -> tuple[str, str | None] | None:
    """``key``'s name in the other layout and the reshape it needs; None if no rule knows it."""
    for pattern, target, kind in _compiled(rules, to_aclip):
        match = pattern.match(key)
        if match:
            return target.format(**match.groupdict()), kind
    return None


def convert_keys(
    state_dict: Mapping[str, Tensor], rules: list[tuple[str, str, str | None]], to_aclip: bool
) -> dict[str, Tensor]:
    """Rename (and reshape) every key by ``rules``; refuse keys no rule knows, naming them."""
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        renamed = rename_key(key, rules, to_aclip)
        if renamed is None:
            unknown.append(key)
        else:
            out[renamed[0]] = _reshape(renamed[1], value, to_aclip, key)
    if unknown:
        raise WeightsError(f"keys this layout does not know: {_listed(unknown)}")
    return out


def _listed(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


# ------------------------------------------------------------------ architecture
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


# ------------------------------------------------------------------ config inference
def _shape(sd: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise WeightsError(f"missing key {key}")
    return tuple(sd[key].shape)


def _count_blocks(sd: Mapping[str, Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if found != set(range(len(found))):
        raise WeightsError(f"{prefix}N: block numbers {sorted(found)} are not 0..{len(found) - 1}")
    return len(found)


def _heads(width: int, head_width: int, what: str) -> int:
    if width % head_width:
        raise WeightsError(f"{what} width {width} is not a multiple of the head width {head_width}")
    return width // head_width


def openai_model_config(sd: Mapping[str, Tensor], quick_gelu: bool = True) -> ModelConfig:
    """The ModelConfig of an OpenAI-layout ViT state dict, from its shapes (as OpenAI's own
    ``build_clip`` reads them: 64-wide heads; both towers QuickGELU unless ``quick_gelu=False``).
    """
    if "visual.proj" not in sd:
        raise WeightsError("no visual.proj: only ViT image towers are supported (not ResNets)")
    width, _, patch, patch_w = _shape(sd, "visual.conv1.weight")
    npos, pos_w = _shape(sd, "visual.positional_embedding")
    grid = math.isqrt(npos - 1)
    if grid * grid != npos - 1 or patch != patch_w or pos_w != width:
        raise WeightsError(
            f"visual.positional_embedding {(npos, pos_w)} / visual.conv1.weight "
            f"{_shape(sd, 'visual.conv1.weight')}: need 1 + a square grid of width-{width} patches"
        )
    embed_dim = _shape(sd, "text_projection")[1]
    if _shape(sd, "visual.proj") != (width, embed_dim):
        raise WeightsError(f"visual.proj is {_shape(sd, 'visual.proj')}, want {(width, embed_dim)}")
    text_w = _shape(sd, "ln_final.weight")[0]
    act = "quick_gelu" if quick_gelu else "gelu"
    arch = ClipVisionArch(
        width=width,
        layers=_count_blocks(sd, "visual.transformer.resblocks."),
        heads=_heads(width, OPENAI_HEAD_WIDTH, "vision"),
        patch_size=patch,
        image_size=patch * grid,
        mlp_hidden=_shape(sd, "visual.transformer.resblocks.0.mlp.c_fc.weight")[0],
        act=act,
    )
    text = {
        "context_length": _shape(sd, "positional_embedding")[0],
        "vocab_size": _shape(sd, "token_embedding.weight")[0],
        "width": text_w,
        "layers": _count_blocks(sd, "transformer.resblocks."),
        "heads": _heads(text_w, OPENAI_HEAD_WIDTH, "text"),
    }
    return _model_config(arch, text, act, embed_dim)


# open_clip config keys aclip represents: the sizes it reads, options accepted with any value
# (training-time only, or not part of the weights) and options that must keep their default
_OC_TOP = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "custom_text"}
_OC_TOP_ANY = {"init_logit_scale", "nonscalar_logit_scale"}
_OC_TOP_FIXED = {"init_logit_bias": None}
_OC_VISION = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size"}
_OC_VISION_ANY = {"patch_dropout", "output_tokens", "timm_model_pretrained", "timm_drop",
                  "timm_drop_path"}  # fmt: skip
_OC_VISION_FIXED: dict[str, Any] = {
    "ls_init_value": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "final_ln_after_pool": False,
    "pool_type": "tok",
    "act_kwargs": None,
    "norm_kwargs": None,
    "block_type": "default",
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
}
_OC_TIMM = {"timm_model_name", "timm_pool", "timm_proj", "timm_proj_bias", "image_size"}
_OC_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_OC_TEXT_ANY = {"pad_id", "eos_id", "output_tokens", "tokenizer_kwargs", "tokenizer_mode"}
_OC_TEXT_FIXED: dict[str, Any] = {
    **{k: v for k, v in _OC_VISION_FIXED.items() if not k.startswith(("attn", "no_ln", "pos_e"))},
    "embed_cls": False,
    "no_causal_mask": False,
    "pool_type": "argmax",
    "proj_bias": False,
    "proj_type": "linear",
    "hf_model_name": None,
    "hf_tokenizer_name": None,
}


def _refuse_unsupported(
    cfg: Mapping[str, Any], known: set[str], any_value: set[str], fixed: dict, where: str
) -> None:
    bad = []
    for key, value in cfg.items():
        if key in known or key in any_value:
            continue
        if key not in fixed:
            bad.append(f"{where}.{key}={value!r} (unknown to aclip)")
        elif value != fixed[key] and not (key == "block_type" and value is None):
            bad.append(f"{where}.{key}={value!r} (aclip has {fixed[key]!r})")
    if bad:
        raise WeightsError("open_clip config options aclip cannot represent: " + "; ".join(bad))


def _square(size: Any, what: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise WeightsError(f"{what} {list(size)}: only square images are supported")
        size = size[0]
    return int(size)


def open_clip_model_config(model_cfg: Mapping[str, Any]) -> ModelConfig:
    """The ModelConfig of an open_clip ``model_cfg`` (its registry JSON / ``open_clip_config.json``
    ``model_cfg``); refuses options aclip does not represent, naming them."""
    _refuse_unsupported(model_cfg, _OC_TOP, _OC_TOP_ANY, _OC_TOP_FIXED, "model_cfg")
    vcfg, tcfg = dict(model_cfg["vision_cfg"]), dict(model_cfg["text_cfg"])
    timm_name = vcfg.get("timm_model_name")
    known = _OC_TIMM if timm_name else _OC_VISION
    _refuse_unsupported(vcfg, known, _OC_VISION_ANY, _OC_VISION_FIXED, "vision")
    _refuse_unsupported(tcfg, _OC_TEXT, _OC_TEXT_ANY, _OC_TEXT_FIXED, "text")
    if float(tcfg.get("mlp_ratio", 4.0)) != 4.0:
        raise WeightsError(f"text.mlp_ratio={tcfg['mlp_ratio']}: aclip's text MLP is 4x wide")
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    text = {
        "context_length": int(tcfg.get("context_length", 77)),
        "vocab_size": int(tcfg.get("vocab_size", 49408)),
        "width": int(tcfg.get("width", 512)),
        "layers": int(tcfg.get("layers", 12)),
        "heads": int(tcfg.get("heads", 8)),
    }
    image_size = _square(vcfg.get("image_size", 224), "vision.image_size")
    embed_dim = int(model_cfg["embed_dim"])
    if timm_name:
        return _model_config(None, text, act, embed_dim, _timm_trunk(vcfg, image_size))
    if isinstance(vcfg.get("layers", 12), (list, tuple)):
        raise WeightsError("vision.layers is a list: ResNet image towers are not supported")
    width = int(vcfg.get("width", 768))
    arch = ClipVisionArch(
        width=width,
        layers=int(vcfg.get("layers", 12)),
        heads=_heads(width, int(vcfg.get("head_width", 64)), "vision"),
        patch_size=int(vcfg.get("patch_size", 16)),
        image_size=image_size,
        mlp_hidden=int(width * float(vcfg.get("mlp_ratio", 4.0))),
        act=act,
    )
    return _model_config(arch, text, act, embed_dim)


def _timm_trunk(vcfg: Mapping[str, Any], image_size: int) -> tuple[str, dict[str, Any], int]:
    """An open_clip ``TimmModel`` vision tower as (timm name, kwargs, image size)."""
    pool, proj = vcfg.get("timm_pool", "avg"), vcfg.get("timm_proj", "linear")
    if proj != "linear" or vcfg.get("timm_proj_bias", False):
        raise WeightsError(
            f"vision.timm_proj={proj!r}, timm_proj_bias={vcfg.get('timm_proj_bias', False)}: "
            "aclip's image projection is one bias-free linear layer (timm_proj='linear')"
        )
    name = str(vcfg["timm_model_name"])
    with torch.device("meta"):
        trunk = timm.create_model(name, pretrained=False)
    if not isinstance(trunk, VisionTransformer):
        raise WeightsError(f"vision.timm_model_name={name}: not a timm VisionTransformer")
    if pool == trunk.global_pool:
        return name, {}, image_size
    if pool == "avg" and trunk.global_pool == "token":  # TimmModel resets the pool only
        return name, {"global_pool": "avg", "fc_norm": False}, image_size
    raise WeightsError(f"vision.timm_pool={pool!r} on {name}: aclip supports token or avg")


# ------------------------------------------------------------------ reading files
def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in n or n.endswith("constants.pkl") for n in archive.namelist())


def read_state_dict(path: str | Path) -> tuple[dict[str, Tensor], bool]:
    """A checkpoint file's tensors, unwrapped: (state dict, whether it was a TorchScript archive).

    ``.safetensors`` by safetensors; TorchScript archives (OpenAI's releases) as data, nothing in
    them run (``aclip.interop.torchscript``; the keys of ``torch.jit.load(path).state_dict()``, the
    non-weight ones dropped); anything else by ``torch.load(weights_only=True)``, taking
    ``state_dict`` / ``model`` / ``module`` wrappers and stripping ``module.`` / ``_orig_mod.``.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    jit = False
    if path.suffix == ".safetensors":
        obj: Any = load_file(str(path), device="cpu")
    elif _is_torchscript(path):
        try:
            obj, jit = read_torchscript_state_dict(path), True
        except TorchScriptReadError as err:
            raise WeightsError(f"{path}: {err}") from None
    else:
        try:
            obj = safe_load.load(path)  # weights_only=True; says what a non-checkpoint file is
        except Exception as err:
            raise WeightsError(f"{path}: not a readable checkpoint ({err})") from err
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: holds no state dict of tensors")
    out = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        if key not in NON_WEIGHT_KEYS:
            out[key] = value
    return out, jit


def layout_of(sd: Mapping[str, Tensor]) -> str:
    """``openai`` (OpenAI and open_clip's native ViT CLIP), ``open_clip_timm`` (open_clip with a
    timm trunk), ``open_clip_custom_text`` (open_clip's CustomTextCLIP: text under ``text.``),
    or ``aclip``; refuses anything else, saying what it found."""
    keys = set(sd)
    if any(k.startswith("visual.vit.") for k in keys) or "image_proj.weight" in keys:
        return "aclip"
    if "text.text_projection" in keys or any(k.startswith("text.transformer.") for k in keys):
        if any(k.startswith("text.transformer.embeddings") for k in keys):
            raise WeightsError("a Hugging Face text tower (hf_model_name) is not supported")
        return "open_clip_custom_text"
    if any(k.startswith("visual.trunk.") for k in keys):
        return "open_clip_timm"
    if "visual.conv1.weight" in keys or "visual.class_embedding" in keys:
        return "openai"
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in keys):
        raise WeightsError("a ResNet image tower: aclip's image tower is a ViT")
    raise WeightsError(f"not a CLIP state dict this reader knows (keys: {_listed(sorted(keys))})")


def _base_layout(sd: Mapping[str, Tensor]) -> str:
    """``layout_of``, with open_clip's CustomTextCLIP read as the layout of its image side."""
    layout = layout_of(sd)
    if layout == "open_clip_custom_text":
        return "open_clip_timm" if any(k.startswith("visual.trunk.") for k in sd) else "openai"
    return layout


def to_aclip_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Any supported open_clip / OpenAI layout in aclip's ``CLIP`` layout (fp32 copies)."""
    layout = _base_layout(sd)
    if layout_of(sd) == "open_clip_custom_text":
        sd = {k.removeprefix("text."): v for k, v in sd.items()}
    out = dict(sd) if layout == "aclip" else convert_keys(sd, LAYOUT_RULES[layout], to_aclip=True)
    return {k: v.detach().to(torch.float32, copy=True) for k, v in out.items()}


def _open_clip_cfg_from(model_name: str | Path) -> dict[str, Any]:
    """An open_clip model_cfg from a registry name or an ``open_clip_config.json`` path."""
    import open_clip

    path = Path(model_name)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise WeightsError(f"{path}: no such open_clip config file")
        cfg = json.loads(path.read_text())
        return dict(cfg.get("model_cfg", cfg))
    cfg = open_clip.get_model_config(str(model_name))
    if cfg is None:
        raise WeightsError(f"open_clip knows no model {model_name!r} (open_clip.list_models())")
    return dict(cfg)


def _preprocess_from(cfg: Mapping[str, Any] | None, size: int) -> Preprocess:
    cfg = dict(cfg or {})
    return Preprocess(
        size=_square(cfg.get("size", size), "preprocess_cfg.size"),
        mean=tuple(cfg.get("mean", OPENAI_DATASET_MEAN)),
        std=tuple(cfg.get("std", OPENAI_DATASET_STD)),
        interpolation=cfg.get("interpolation", "bicubic"),
        resize_mode=cfg.get("resize_mode", "shortest"),
    )


def _aclip_run(path: Path) -> bool:
    from aclip.train.checkpoint import MODEL_STATES

    if path.is_file():
        return path.name == MODEL_STATES
    return any((d / "latest").is_file() or (d / MODEL_STATES).is_file()
               for d in (path, path / "checkpoints"))  # fmt: skip


def read_weights(
    path: str | Path,
    model_name: str | Path | None = None,
    *,
    use_ema: bool = False,
    quick_gelu: bool | None = None,
) -> Weights:
    """Weights of any supported source in aclip's layout, with the ModelConfig and preprocess.

    ``path``: an aclip run (run dir, checkpoints dir, tag dir or model-states file; ``use_ema``
    takes the EMA image side), an open_clip folder (``local-dir:DIR`` or a folder holding
    ``open_clip_config.json``), or a weights file. ``model_name``: the open_clip registry name or
    an ``open_clip_config.json`` for a file; without it the file is read as an OpenAI release
    (shapes give the sizes; QuickGELU, as OpenAI trained, unless ``quick_gelu=False``);
    ``quick_gelu`` also overrides an open_clip config's flag (as open_clip's force_quick_gelu).
    """
    spec = str(path)
    folder = Path(spec.removeprefix(LOCAL_DIR))
    is_open_clip_dir = spec.startswith(LOCAL_DIR) or (folder / OPEN_CLIP_CONFIG).is_file()
    if not is_open_clip_dir and _aclip_run(folder):
        return _read_aclip_run(folder, use_ema)
    if use_ema:
        raise WeightsError(f"{path}: use_ema needs an aclip run (only it holds an EMA teacher)")
    if is_open_clip_dir:
        return _read_open_clip_dir(folder, quick_gelu)
    if folder.is_dir():
        raise WeightsError(f"{path}: a folder that is neither an aclip run nor an open_clip folder")
    raw, jit = read_state_dict(folder)
    if model_name is not None:
        cfg = _open_clip_cfg_from(model_name)
        return _from_open_clip_cfg(raw, cfg, None, str(path), quick_gelu)
    if layout_of(raw) not in ("openai", "open_clip_custom_text"):
        raise WeightsError(
            f"{path}: a {layout_of(raw)} state dict carries no architecture; give its open_clip "
            "model name or open_clip_config.json"
        )
    sd = {k.removeprefix("text."): v for k, v in raw.items()}
    cfg = openai_model_config(sd, quick_gelu=True if quick_gelu is None else quick_gelu)
    note = f"read as OpenAI weights ({'TorchScript' if jit else 'state dict'}, {cfg.text_act})"
    pre = Preprocess(cfg.image_size)
    return Weights(to_aclip_state_dict(sd), cfg, pre, "openai", "openai", [note])


def _read_open_clip_dir(folder: Path, quick_gelu: bool | None = None) -> Weights:
    config_path = folder / OPEN_CLIP_CONFIG
    if not config_path.is_file():
        raise WeightsError(f"{folder}: no {OPEN_CLIP_CONFIG}")
    config = json.loads(config_path.read_text())
    if "model_cfg" not in config:
        raise WeightsError(f"{config_path}: no model_cfg")
    names = [
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.safetensors",
        "open_clip_pytorch_model.bin",
        "open_clip_pytorch_model.pth",
        "model.safetensors",
        "pytorch_model.bin",
    ]  # open_clip's own order of preference
    weights = next((folder / n for n in names if (folder / n).is_file()), None)
    if weights is None:
        raise WeightsError(f"{folder}: no weights file (looked for {', '.join(names)})")
    raw, _ = read_state_dict(weights)
    pre = config.get("preprocess_cfg")
    return _from_open_clip_cfg(raw, config["model_cfg"], pre, str(folder), quick_gelu)


def _from_open_clip_cfg(
    raw: dict[str, Tensor],
    model_cfg: Mapping[str, Any],
    preprocess: Any,
    where: str,
    quick_gelu: bool | None = None,
) -> Weights:
    if quick_gelu is not None:  # as open_clip's force_quick_gelu
        model_cfg = {**model_cfg, "quick_gelu": quick_gelu}
    cfg = open_clip_model_config(model_cfg)
    layout = _base_layout(raw)
    sd = to_aclip_state_dict(raw)
    note = f"read as open_clip weights from {where} ({cfg.vision_model}, text {cfg.text_act})"
    pre = _preprocess_from(preprocess, cfg.image_size)
    return Weights(sd, cfg, pre, "open_clip", layout, [note])


def _read_aclip_run(path: Path, use_ema: bool) -> Weights:
    from aclip.train.checkpoint import load_eval_model

    clip, cfg = load_eval_model(path, use_ema=use_ema)
    sd = {k: v.detach().clone() for k, v in clip.state_dict().items()}
    note = f"read from the aclip run {path}{' (EMA image side)' if use_ema else ''}"
    return Weights(sd, cfg.model, Preprocess(cfg.model.image_size), "aclip", "aclip", [note])


# ------------------------------------------------------------------ into a model
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


def check_architecture(clip: CLIP, weights_cfg: ModelConfig) -> None:
    """Refuse ``clip`` when its towers are not the architecture the weights were trained in
    (``weights_cfg``), image size and context length aside; names the first difference."""
    size, ctx = int(clip.visual.vit.patch_embed.img_size[0]), clip.text.context_length
    wanted = (
        f"model.vision_model={weights_cfg.vision_model}, "
        f"model.vision_kwargs={dict(weights_cfg.vision_kwargs)}"
    )
    try:
        with torch.device("meta"):
            ref = build_clip(replace(weights_cfg, image_size=size, context_length=ctx))
    except ConfigError:  # build_vision: the weights' patches do not tile the model's images
        raise WeightsError(
            f"the vision tower is not the weights' architecture ({wanted}): their patches do not "
            f"tile the model's {size}x{size} images"
        ) from None
    if ref.visual.vit.global_pool != clip.visual.vit.global_pool:
        raise WeightsError(
            f"the vision tower pools by {clip.visual.vit.global_pool!r}, the weights by "
            f"{ref.visual.vit.global_pool!r} (they need {wanted})"
        )
    ours, theirs = _signature(clip.visual.vit), _signature(ref.visual.vit)
    if ours != theirs:
        raise WeightsError(
            f"the vision tower is not the weights' architecture ({wanted}); first difference: "
            f"model has {_first_difference(ours, theirs)!r}"
        )
    if clip.text.act != weights_cfg.text_act or _signature(clip.text) != _signature(ref.text):
        raise WeightsError(
            f"the text tower is not the weights' (model.text_act={weights_cfg.text_act}, "
            f"text_width={weights_cfg.text_width}, text_layers={weights_cfg.text_layers}, "
            f"text_heads={weights_cfg.text_heads}); the model has text_act={clip.text.act}"
        )


def fit_state_dict(
    sd: Mapping[str, Tensor], clip: CLIP, layout: str = "aclip"
) -> tuple[dict[str, Tensor], list[str]]:
    """``sd`` (aclip layout) made to fit ``clip``: the position embedding resampled to its patch
    grid, the text position embedding truncated to its context, a missing alpha conv (a model
    with ``model.alpha_channel`` from base CLIP weights) zero; then every key and shape checked.

    Raises:
        WeightsError: naming the missing, unexpected and mis-shaped keys (with both shapes; with
            the key's name in the file's ``layout`` too).
    """
    out, notes = dict(sd), []
    target = clip.state_dict()
    pos = out.get("visual.vit.pos_embed")
    if pos is not None and pos.shape != target["visual.vit.pos_embed"].shape:
        out["visual.vit.pos_embed"], note = _resample_pos(pos, clip)
        notes.append(note)
    tpos = out.get("text.positional_embedding")
    want = target["text.positional_embedding"].shape
    if tpos is not None and tpos.shape[1:] == want[1:] and tpos.shape[0] != want[0]:
        if tpos.shape[0] < want[0]:
            raise WeightsError(
                f"text.positional_embedding: the weights have {tpos.shape[0]} positions, the "
                f"model's context length is {want[0]} (a longer context is not extrapolated)"
            )
        out["text.positional_embedding"] = tpos[: want[0]].clone()
        notes.append(f"text position embedding truncated {tpos.shape[0]} -> {want[0]}")
    if ALPHA_KEY in target and ALPHA_KEY not in out:
        out[ALPHA_KEY] = torch.zeros_like(target[ALPHA_KEY])  # official code: zeros if absent
        notes.append("alpha conv not in the weights: zero-initialised (the base model exactly)")
    _check_keys(out, target, LAYOUT_RULES.get(layout))
    return {k: v.to(target[k].dtype) for k, v in out.items()}, notes


def _resample_pos(pos_1ND: Tensor, clip: CLIP) -> tuple[Tensor, str]:
    prefix = clip.visual.num_prefix_tokens
    n_old = pos_1ND.shape[1] - prefix
    side = math.isqrt(n_old)
    if pos_1ND.dim() != 3 or side * side != n_old:
        raise WeightsError(
            f"visual.vit.pos_embed {tuple(pos_1ND.shape)}: not {prefix} prefix token(s) plus a "
            "square patch grid, cannot resample"
        )
    new = resample_abs_pos_embed(
        pos_1ND, list(clip.visual.grid_hw), (side, side), num_prefix_tokens=prefix
    )
    grid = "x".join(map(str, clip.visual.grid_hw))
    return new, f"position embedding resampled {side}x{side} -> {grid} (bicubic, as timm does)"


def _check_keys(
    sd: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    rules: list[tuple[str, str, str | None]] | None = None,
) -> None:
    def name(key: str) -> str:
        renamed = rename_key(key, rules, to_aclip=False) if rules else None
        return f"{key} (file: {renamed[0]})" if renamed and renamed[0] != key else key

    missing = [name(k) for k in sorted(set(target) - set(sd))]
    unexpected = [name(k) for k in sorted(set(sd) - set(target))]
    shapes = [
        f"{name(k)}: weights {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in sd and sd[k].shape != target[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_listed(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches: {_listed(shapes, 6)}")
    if parts:
        raise WeightsError("the weights do not fit the model: " + "; ".join(parts))


def init_from(
    clip: CLIP,
    path: str | Path,
    model_name: str | Path | None = None,
    *,
    use_ema: bool = False,
    quick_gelu: bool | None = None,
) -> list[str]:
    """Load pretrained weights into an existing aclip ``CLIP`` (e.g. the student before training).

    The source is read as ``read_weights`` reads it. Refused (``WeightsError``, nothing loaded)
    when the model's towers are not the weights' architecture (``check_architecture``) or a
    key or shape does not fit (``fit_state_dict``). Returns what was adapted (resampled position
    embedding, truncated context) with the source, for the log.
    """
    weights = read_weights(path, model_name, use_ema=use_ema, quick_gelu=quick_gelu)
    check_architecture(clip, weights.model_cfg)
    sd, notes = fit_state_dict(weights.state_dict, clip, weights.layout)
    with torch.no_grad():
        clip.load_state_dict(sd, strict=True)
    return weights.notes + notes


def load_clip(
    path: str | Path,
    model_name: str | Path | None = None,
    *,
    use_ema: bool = False,
    image_size: int | None = None,
    context_length: int | None = None,
    quick_gelu: bool | None = None,
    device: str | torch.device = "cpu",
) -> tuple[CLIP, ModelConfig, Preprocess]:
    """Any supported CLIP (see ``read_weights``) as an aclip ``CLIP`` in fp32 eval mode, with its
    ModelConfig and preprocess. ``image_size`` (position embedding resampled) and
    ``context_length`` (truncated; shorter only) override the weights' own."""
    weights = read_weights(path, model_name, use_ema=use_ema, quick_gelu=quick_gelu)
    cfg = weights.model_cfg
    if image_size is not None or context_length is not None:
        cfg = replace(
            cfg,
            image_size=image_size or cfg.image_size,
            context_length=context_length or cfg.context_length,
        )
    clip = build_clip(cfg)
    sd, _ = fit_state_dict(weights.state_dict, clip, weights.layout)
    clip.load_state_dict(sd, strict=True)
    preprocess = replace(weights.preprocess, size=cfg.image_size)
    return clip.float().eval().to(device), cfg, preprocess


# ------------------------------------------------------------------ out of a model
def refuse_alpha(clip: CLIP, fmt: str) -> None:
    """An Alpha-CLIP model (an alpha conv beside the patch embedding) is not an open_clip,
    OpenAI or timm model: refused (``NotExpressible``) rather than exported without its alpha
    input, which would silently be another model."""
    if getattr(clip.visual, "alpha_conv", None) is not None:
        raise NotExpressible(
            f"this model has an alpha channel (Alpha-CLIP, model.alpha_channel=true): {fmt} "
            f"models have no alpha input, and exporting the RGB path alone would be another "
            f"model; load the run with aclip (aclip.interop.load_clip, evals.region)"
        )


def to_openai_state_dict(clip: CLIP) -> dict[str, Tensor]:
    """The model in OpenAI's (= open_clip's native) layout, fp32; refuses a tower that is not
    CLIP architecture or has an alpha channel (``NotExpressible``, with the reasons)."""
    refuse_alpha(clip, "OpenAI-layout")
    clip_vision_arch(clip.visual.vit)
    return convert_keys(
        {k: v.detach().float() for k, v in clip.state_dict().items()}, OPENAI_RULES, False
    )


def _text_cfg(clip: CLIP) -> dict[str, Any]:
    text = clip.text
    return {
        "context_length": text.context_length,
        "vocab_size": text.vocab_size,
        "width": text.width,
        "heads": text.blocks[0].attn.heads,
        "layers": text.layers,
    }


def open_clip_model_cfg(clip: CLIP) -> dict[str, Any]:
    """open_clip's ``model_cfg`` for ``clip``: a native ViT config for a CLIP-architecture tower,
    else a ``timm_model_name`` trunk when open_clip's ``TimmModel`` builds exactly this tower.

    Raises:
        NotExpressible: with the reasons for both routes.
    """
    refuse_alpha(clip, "open_clip")
    vit, text_act = clip.visual.vit, clip.text.act
    problems = clip_vision_problems(vit)
    if not problems:
        arch = clip_vision_arch(vit)
        if arch.act != text_act:
            raise NotExpressible(
                f"open_clip has one quick_gelu flag for both towers; this model's vision tower "
                f"uses {arch.act} and its text tower {text_act}"
            )
        vision: dict[str, Any] = {
            "image_size": arch.image_size,
            "layers": arch.layers,
            "width": arch.width,
            "head_width": arch.width // arch.heads,
            "patch_size": arch.patch_size,
        }
        if arch.mlp_hidden != 4 * arch.width:
            vision["mlp_ratio"] = _ratio(arch.mlp_hidden, arch.width)
    else:
        vision = _timm_trunk_cfg(vit, problems)
    return {
        "embed_dim": clip.embed_dim,
        "quick_gelu": text_act == "quick_gelu",
        "vision_cfg": vision,
        "text_cfg": _text_cfg(clip),
    }


def _timm_trunk_cfg(vit: VisionTransformer, problems: list[str]) -> dict[str, Any]:
    """open_clip's ``TimmModel`` builds ``timm.create_model(name)`` with its default arguments and
    image size, then resets the pool: the route works only when that is exactly this tower."""
    name = vit.pretrained_cfg.get("architecture", "")
    size = int(vit.patch_embed.img_size[0])
    why = "not a CLIP-architecture tower (" + "; ".join(problems[:4]) + ")"
    with torch.device("meta"):
        trunk = timm.create_model(name, pretrained=False)
    trunk.reset_classifier(0, global_pool=vit.global_pool)
    default_size = int(trunk.patch_embed.img_size[0])
    if size != default_size:
        raise NotExpressible(
            f"{why}, and not a timm trunk open_clip can name: open_clip builds {name} at its "
            f"default image size {default_size} (this model: {size}) and passes no other arguments"
        )
    ours, theirs = _signature(vit), _signature(trunk)
    if ours != theirs:
        raise NotExpressible(
            f"{why}, and not a timm trunk open_clip can name: open_clip's TimmModel takes the "
            f"timm name {name} with no extra arguments (vision_kwargs); this tower differs: "
            f"{_first_difference(ours, theirs)!r}"
        )
    return {
        "timm_model_name": name,
        "timm_model_pretrained": False,
        "timm_pool": vit.global_pool,
        "timm_proj": "linear",
        "timm_proj_bias": False,
        "image_size": size,
    }


def to_open_clip_state_dict(clip: CLIP, model_cfg: Mapping[str, Any]) -> dict[str, Tensor]:
    """The weights in the layout of the open_clip model ``model_cfg`` builds (logit scale 0-d)."""
    rules = TIMM_TRUNK_RULES if "timm_model_name" in model_cfg["vision_cfg"] else OPENAI_RULES
    sd = {k: v.detach().float() for k, v in clip.state_dict().items()}
    return convert_keys(sd, rules, to_aclip=False)


def _check_open_clip_fit(sd: Mapping[str, Tensor], model_cfg: Mapping[str, Any]) -> None:
    """Keys and shapes against the model open_clip builds from ``model_cfg`` (on the meta
    device): what ``create_model_and_transforms`` will load strictly."""
    from open_clip.model import CLIP as OpenClipCLIP

    with torch.device("meta"):
        ref = OpenClipCLIP(**json.loads(json.dumps(model_cfg)))
    try:
        _check_keys(sd, ref.state_dict())
    except WeightsError as err:
        raise NotExpressible(f"open_clip's model of this config does not take them: {err}") from err


def export_open_clip(clip: CLIP, out_dir: str | Path, preprocess: Preprocess) -> dict[str, Any]:
    """Write an open_clip ``local-dir`` folder: ``open_clip_config.json`` (``model_cfg``,
    ``preprocess_cfg``) and ``open_clip_model.safetensors``. Returns the config written."""
    model_cfg = open_clip_model_cfg(clip)
    sd = to_open_clip_state_dict(clip, model_cfg)
    _check_open_clip_fit(sd, model_cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess.to_open_clip()}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / OPEN_CLIP_WEIGHTS))
    (out / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return config


def to_timm_model(clip: CLIP, head: bool = True) -> VisionTransformer:
    """A stand-alone timm copy of the vision tower (fp32, eval); with ``head`` its classifier
    head is the image projection (bias zero), so its output is ``encode_image``'s; refuses an
    alpha tower (:func:`refuse_alpha`) and a conv patch stem (timm's config cannot name it)."""
    refuse_alpha(clip, "timm")
    stem = clip.visual.vit.patch_embed.proj
    if not isinstance(stem, nn.Conv2d):
        raise NotExpressible(
            f"this tower's patch embedding is a {type(stem).__name__} (model.patch_stem=conv): "
            "timm.create_model rebuilds the ViT's own patch conv, which these weights do not fit; "
            "load the run with aclip (aclip.interop.load_clip)"
        )
    model = copy.deepcopy(clip.visual.vit).float().eval()
    # the architecture's pretrained_cfg describes someone else's weights: drop what names them
    drop = ("tag", "license", "notes", "hf_hub_id", "url", "file", "source", "paper_ids",
            "paper_name", "origin_url", "hf_hub_filename")  # fmt: skip
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in drop}
    if head:
        model.reset_classifier(clip.embed_dim)
        with torch.no_grad():
            model.head.weight.copy_(clip.image_proj.weight)
            model.head.bias.zero_()
    return model


def export_timm(clip: CLIP, out_dir: str | Path, preprocess: Preprocess) -> Path:
    """Write the vision tower with the image projection as its head as a timm ``local-dir``
    folder (timm's own ``save_for_hf``: ``config.json`` + ``model.safetensors``), so that
    ``timm.create_model("local-dir:DIR", pretrained=True)`` gives ``encode_image``."""
    from timm.models import save_for_hf

    if preprocess.resize_mode != "shortest":
        raise NotExpressible(f"timm's eval transform has no resize mode {preprocess.resize_mode}")
    data_config = {
        "input_size": (3, preprocess.size, preprocess.size),
        "interpolation": preprocess.interpolation,
        "mean": tuple(preprocess.mean),
        "std": tuple(preprocess.std),
        "crop_pct": 1.0,  # shorter side to the size, centre crop: all of it
        "crop_mode": "center",
    }
    out = Path(out_dir)
    save_for_hf(to_timm_model(clip), str(out), safe_serialization=True, data_config=data_config)
    return out


# ------------------------------------------------------------------ describe
def model_yaml(model_cfg: ModelConfig) -> str:
    """The ``model:`` section of a run config that builds exactly this model: every
    ``ModelConfig`` field (taken from the dataclass, so a new field is printed too) but the
    run-time ones of ``RUNTIME_MODEL_KEYS`` (where the weights come from, recomputation,
    compilation), which a checkpoint also leaves free."""
    from omegaconf import OmegaConf

    from aclip.methods.base import RUNTIME_MODEL_KEYS

    keys = [f.name for f in fields(ModelConfig) if f.name not in RUNTIME_MODEL_KEYS]
    section = {k: getattr(model_cfg, k) for k in keys}
    section["vision_kwargs"] = dict(section["vision_kwargs"])
    return OmegaConf.to_yaml({"model": section})


def main(argv: list[str] | None = None) -> int:
    """``python -m aclip.interop PATH [--model-name NAME]``: print the ``model:`` config section
    and the preprocess of a pretrained CLIP (to write a run config that starts from it)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("path", help="OpenAI file, open_clip checkpoint or folder, aclip run")
    parser.add_argument("--model-name", help="open_clip model name or open_clip_config.json")
    args = parser.parse_args(argv)
    try:
        weights = read_weights(args.path, args.model_name)
    except (WeightsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(model_yaml(weights.model_cfg), end="")
    print(f"# preprocess: {weights.preprocess}")
    for note in weights.notes:
        print(f"# {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
