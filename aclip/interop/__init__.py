"""Pretrained CLIP weights in and out: OpenAI releases, open_clip checkpoints and folders, timm,
and our own runs; nothing is downloaded.

In: ``read_weights`` turns whatever :func:`~aclip.interop.source.classify` says a path is (an
OpenAI release, TorchScript or state dict; an open_clip checkpoint with its model name or
``open_clip_config.json``; an open_clip folder, ``local-dir:DIR`` or ``hf-hub:org/name`` from the
local Hugging Face cache; an aclip run) into aclip's ``CLIP`` layout plus the ``ModelConfig``
that represents the model exactly. ``load_clip`` builds that model, ``init_from`` loads the weights
into an existing one (refusing a key, shape or architecture that does not fit, naming it), and
``load_model`` is the one reader every entry point goes through. Out: ``export_open_clip``,
``to_openai_state_dict``, ``export_timm``; a model a format cannot express is refused with the
reason (``NotExpressible``).

The modules, by job: ``weights`` (shared names, errors, ``Preprocess``, ``Weights``),
``keys`` (key layouts), ``arch`` (architecture detection, timm configs), ``configs``
(``ModelConfig`` inference), ``source`` (what a path is), ``run`` (our run), ``read`` (reading
files and folders), ``fit`` (into a model), ``reader`` (``load_model``), ``write`` (out of a
model), ``describe`` (``python -m aclip.interop``), ``export`` (``python -m aclip.export``),
``safe_load`` and ``torchscript`` (reading without running code). This module re-exports the
public API users script against.
"""

from __future__ import annotations

from aclip.interop.arch import (
    ClipVisionArch,
    activation_name,
    clip_vision_arch,
    clip_vision_problems,
    timm_vision_config,
)
from aclip.interop.configs import open_clip_model_config, openai_model_config
from aclip.interop.describe import main, model_yaml
from aclip.interop.fit import check_architecture, fit_state_dict, init_from, load_clip
from aclip.interop.keys import (
    LAYOUT_RULES,
    OPENAI_RULES,
    TIMM_TRUNK_RULES,
    convert_keys,
    rename_key,
)
from aclip.interop.read import layout_of, read_state_dict, read_weights, to_aclip_state_dict
from aclip.interop.reader import EvalModel, LoadedModel, check_model_source, load_model
from aclip.interop.source import HF_HUB, Source, classify, is_aclip_run
from aclip.interop.weights import (
    ALPHA_KEY,
    LN_EPS,
    LOCAL_DIR,
    NON_WEIGHT_KEYS,
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_WEIGHTS,
    OPENAI_HEAD_WIDTH,
    NotExpressible,
    Preprocess,
    Weights,
    WeightsError,
)
from aclip.interop.write import (
    export_open_clip,
    export_timm,
    open_clip_model_cfg,
    refuse_alpha,
    to_open_clip_state_dict,
    to_openai_state_dict,
    to_timm_model,
)
from aclip.model import build_clip  # reachable here as before the split

__all__ = [
    "ALPHA_KEY",
    "HF_HUB",
    "LAYOUT_RULES",
    "LN_EPS",
    "LOCAL_DIR",
    "NON_WEIGHT_KEYS",
    "OPENAI_HEAD_WIDTH",
    "OPENAI_RULES",
    "OPEN_CLIP_CONFIG",
    "OPEN_CLIP_WEIGHTS",
    "TIMM_TRUNK_RULES",
    "ClipVisionArch",
    "EvalModel",
    "LoadedModel",
    "NotExpressible",
    "Preprocess",
    "Source",
    "Weights",
    "WeightsError",
    "activation_name",
    "build_clip",
    "check_architecture",
    "check_model_source",
    "classify",
    "clip_vision_arch",
    "clip_vision_problems",
    "convert_keys",
    "export_open_clip",
    "export_timm",
    "fit_state_dict",
    "init_from",
    "is_aclip_run",
    "layout_of",
    "load_clip",
    "load_model",
    "main",
    "model_yaml",
    "open_clip_model_cfg",
    "open_clip_model_config",
    "openai_model_config",
    "read_state_dict",
    "read_weights",
    "refuse_alpha",
    "rename_key",
    "timm_vision_config",
    "to_aclip_state_dict",
    "to_open_clip_state_dict",
    "to_openai_state_dict",
    "to_timm_model",
]
