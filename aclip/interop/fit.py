"""Weights into a model: check that a model's towers are the weights' architecture, fit a state
dict to it (position embedding resampled, context truncated, a missing alpha conv zeroed, every
key and shape checked), ``init_from`` an existing model and ``load_clip`` a new one."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor

from aclip.config import ConfigError, ModelConfig
from aclip.interop.arch import _first_difference, _signature
from aclip.interop.keys import LAYOUT_RULES, _listed, rename_key
from aclip.interop.read import read_weights
from aclip.interop.weights import ALPHA_KEY, Preprocess, WeightsError
from aclip.model import build_clip
from aclip.model.clip import CLIP


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
    notes += _fit_logit_bias(out, target)
    _check_keys(out, target, LAYOUT_RULES.get(layout))
    return {k: v.to(target[k].dtype) for k, v in out.items()}, notes


def _fit_logit_bias(out: dict[str, Tensor], target: Mapping[str, Tensor]) -> list[str]:
    """A SigLIP logit bias (``loss.contrastive=siglip``) the model has no place for is dropped
    (embeddings and similarity rankings do not use it); one the weights lack keeps the model's
    own start (an InfoNCE run's weights into a siglip run). ``out`` is changed in place."""
    if "logit_bias" in out and "logit_bias" not in target:
        del out["logit_bias"]
        return ["logit bias (SigLIP) dropped: this model has none (embeddings do not use it)"]
    if "logit_bias" in target and "logit_bias" not in out:
        out["logit_bias"] = target["logit_bias"].clone()
        return [f"logit bias not in the weights: kept at its start {target['logit_bias'].item()}"]
    return []


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
