"""The interop package's shared terms: file names and constants, the two refusals
(``WeightsError``: weights that cannot be read or do not fit; ``NotExpressible``: a model a format
cannot represent), a model's ``Preprocess`` and ``Weights`` (a state dict in aclip's layout with
the config that represents it exactly)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor

from aclip.config import ModelConfig

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
