"""Out of a model: OpenAI's layout, open_clip's ``model_cfg`` and ``local-dir`` folder, a
stand-alone timm vision tower and its folder; a model a format cannot express (an alpha channel,
a tower open_clip cannot name) is refused with the reason."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from aclip.interop.arch import (
    _first_difference,
    _ratio,
    _signature,
    clip_vision_arch,
    clip_vision_problems,
)
from aclip.interop.fit import _check_keys
from aclip.interop.keys import OPENAI_RULES, TIMM_TRUNK_RULES, convert_keys
from aclip.interop.weights import (
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_WEIGHTS,
    NotExpressible,
    Preprocess,
    WeightsError,
)
from aclip.model.clip import CLIP


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


def refuse_logit_bias(clip: CLIP, fmt: str) -> None:
    """A SigLIP model (``loss.contrastive=siglip``: a learnable logit bias) is refused
    (``NotExpressible``) by the CLIP exports for now: OpenAI's layout has no bias, and the
    open_clip route (its ``init_logit_bias`` and ``logit_bias`` key) is not written yet."""
    if getattr(clip, "logit_bias", None) is not None:
        raise NotExpressible(
            f"this model has a logit bias (SigLIP, loss.contrastive=siglip): aclip does not "
            f"write it as a {fmt} model yet; load the run with aclip (aclip.interop.load_clip)"
        )


def to_openai_state_dict(clip: CLIP) -> dict[str, Tensor]:
    """The model in OpenAI's (= open_clip's native) layout, fp32; refuses a tower that is not
    CLIP architecture or has an alpha channel (``NotExpressible``, with the reasons)."""
    refuse_alpha(clip, "OpenAI-layout")
    refuse_logit_bias(clip, "OpenAI-layout")
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
    refuse_logit_bias(clip, "open_clip")
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
