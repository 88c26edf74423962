"""Reading weights: a file's state dict (safetensors, TorchScript as data, ``torch.load``
without code), its key layout, and ``read_weights``, which reads whatever
:func:`aclip.interop.source.classify` says a path is (an OpenAI release, an open_clip file with its
model name, an open_clip folder, our run) into aclip's layout with its config and preprocess."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import load_file
from torch import Tensor

import aclip.interop.safe_load as safe_load
from aclip.interop.configs import _square, open_clip_model_config, openai_model_config
from aclip.interop.keys import LAYOUT_RULES, _listed, convert_keys
from aclip.interop.run import load_eval_model
from aclip.interop.source import ACLIP_RUN, OPEN_CLIP_DIR, classify
from aclip.interop.torchscript import TorchScriptReadError, read_torchscript_state_dict
from aclip.interop.weights import (
    NON_WEIGHT_KEYS,
    OPEN_CLIP_CONFIG,
    Preprocess,
    Weights,
    WeightsError,
)


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


def read_weights(
    path: str | Path,
    model_name: str | Path | None = None,
    *,
    use_ema: bool = False,
    quick_gelu: bool | None = None,
) -> Weights:
    """Weights of any supported source in aclip's layout, with the ModelConfig and preprocess.

    ``path``: as :func:`aclip.interop.source.classify` classifies it: an aclip run (``use_ema``
    takes the EMA image side), an open_clip folder (``local-dir:DIR`` or a folder holding
    ``open_clip_config.json``), or a weights file. ``model_name``: the open_clip registry name or
    an ``open_clip_config.json`` for a file; without it the file is read as an OpenAI release
    (shapes give the sizes; QuickGELU, as OpenAI trained, unless ``quick_gelu=False``);
    ``quick_gelu`` also overrides an open_clip config's flag (as open_clip's force_quick_gelu).
    """
    source = classify(path, model_name)
    if source.kind == ACLIP_RUN:
        return _read_aclip_run(source.path, use_ema)
    if use_ema:
        raise WeightsError(f"{path}: use_ema needs an aclip run (only it holds an EMA teacher)")
    refusal = source.refusal()
    if refusal:
        raise WeightsError(refusal)
    if source.kind == OPEN_CLIP_DIR:
        return _read_open_clip_dir(source.path, quick_gelu)
    raw, jit = read_state_dict(source.path)
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
    clip, cfg = load_eval_model(path, use_ema=use_ema)
    sd = {k: v.detach().clone() for k, v in clip.state_dict().items()}
    note = f"read from the aclip run {path}{' (EMA image side)' if use_ema else ''}"
    return Weights(sd, cfg.model, Preprocess(cfg.model.image_size), "aclip", "aclip", [note])
