"""ModelConfig inference: the aclip ``ModelConfig`` that represents an OpenAI-layout state
dict (from its shapes) or an open_clip ``model_cfg`` exactly; open_clip options aclip does not
represent are refused, named."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from aclip.config import ModelConfig
from aclip.interop.arch import ClipVisionArch, _model_config
from aclip.interop.weights import OPENAI_HEAD_WIDTH, WeightsError


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
