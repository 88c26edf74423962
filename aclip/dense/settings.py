"""How a dense head segments a dataset: the settings (:class:`SegSettings`, read from a
``configs/dense/*.yaml`` file and ``--set`` overrides) and the text queries.

**Text.** Every class entry may hold several names; each name is one query, embedded as open_clip
builds a zero-shot classifier (per template normalise, average, normalise; the 80 OpenAI
templates by default). A class scores the max over its names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from aclip.data.sets import segclasses
from aclip.data.sets.imagefolder import load_templates
from aclip.data.sets.segclasses import ClassEntry
from aclip.data.sets.segmentation import split_names
from aclip.dense.heads import HEADS, POS_INTERP
from aclip.eval.evaluate import zero_shot_classifier
from aclip.model.clip import CLIP

Template = str | Callable[[str], str]
NAMED_CLASSNAMES = {
    "sclip:voc21": segclasses.SCLIP_VOC21,
    "sclip:voc20": segclasses.SCLIP_VOC20,
    "sclip:coco_object": segclasses.SCLIP_COCO_OBJECT,
}
NAMED_BACKGROUNDS = {
    "cliper:voc": segclasses.CLIPER_VOC_BACKGROUND,
    "cliper:coco": segclasses.CLIPER_COCO_BACKGROUND,
}
NAMED_TEMPLATES = {"cliper": segclasses.CLIPER_TEMPLATES}


@dataclass
class SegSettings:
    """How one head segments one dataset. Defaults are ClearCLIP's (``ClearCLIPSegmentation``
    and its configs: short side 448, window 448 / stride 224, logit scale 50); the per-dataset
    files in ``configs/dense/`` carry each paper's values with their source."""

    head: str = "clearclip"
    short_side: int = 448  # 0 keeps the image size
    max_long_side: int = 2048  # CLIP protocol: mmseg's Resize scale=(2048, short_side)
    slide_crop: int = 448  # 0 = one pass over the whole image
    slide_stride: int = 224
    logit_scale: float = 50.0
    prob_thd: float = 0.0  # CLIP protocol: below it a pixel is background
    area_thd: float = 0.0  # SCLIP: classes under this share of the foreground pixels dropped
    templates: str = "openai"  # openai (80), simple (7), cliper (15), dataset, or a file
    classnames: str = ""  # "" = the dataset's list, sclip / cliper = that method's, or a file
    window_batch: int = 16  # windows per forward
    # ClearCLIP's comparison rows: vanilla / maskclip / sclip without the last block's residual
    # and FFN (its base_config.py ignore_residual=True); clearclip and cliper never have them
    ignore_residual: bool = False
    # position embedding on another grid: head (each head's official code's), clearclip,
    # maskclip, cliper or timm (aclip.dense.heads.resample_pos_embed)
    pos_interp: str = "head"
    # cliper
    select_layer: int = -1
    fuse_layers: bool = True
    attention_thr: float = 0.1
    score_thd: float = 0.0
    bkg_thd: float = 0.0
    cam_normalize: bool = False
    background_names: list[str] = field(default_factory=list)  # [] = the background class's names
    refine: str = "none"  # none | sfsa | mean (Stable Diffusion self-attention, aclip.dense.sd)
    sd_model: str = ""  # a local diffusers folder (SD 2.1-base for the paper's setting)
    sd_time_step: int = 45
    sd_seed: int = 0

    def check(self) -> SegSettings:
        """Refuse values that cannot work, naming the key."""
        if self.head not in HEADS:
            raise ValueError(f"head: {self.head!r} is not one of {', '.join(HEADS)}")
        if self.short_side < 0 or self.slide_crop < 0 or self.max_long_side <= 0:
            raise ValueError("short_side, slide_crop must be >= 0 and max_long_side > 0")
        if self.slide_crop and self.slide_stride <= 0:
            raise ValueError(f"slide_stride must be > 0 with slide_crop (got {self.slide_stride})")
        if self.refine not in ("none", "sfsa", "mean"):
            raise ValueError(f"refine: {self.refine!r} is not one of none, sfsa, mean")
        if self.refine != "none" and (self.head != "cliper" or not self.sd_model):
            raise ValueError("refine needs head=cliper and sd_model (a local diffusers folder)")
        if self.window_batch < 1:
            raise ValueError("window_batch must be >= 1")
        if self.pos_interp not in POS_INTERP:
            choices = ", ".join(POS_INTERP)
            raise ValueError(f"pos_interp: {self.pos_interp!r} is not one of {choices}")
        return self


def _coerce(key: str, value: Any, default: Any, where: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {key} must be true or false (got {value!r})")
        return value
    if isinstance(default, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {key} must be a number (got {value!r})") from err
        if isinstance(default, int):
            if not number.is_integer():
                raise ValueError(f"{where}: {key} must be an integer (got {value!r})")
            return int(number)
        return number
    if isinstance(default, list):
        if isinstance(value, str):
            return split_names(value)
        if not isinstance(value, list):
            raise ValueError(f"{where}: {key} must be a list (got {value!r})")
        return [str(v) for v in value]
    return str(value)


def apply_overrides(settings: SegSettings, values: dict[str, Any], where: str) -> SegSettings:
    """``settings`` with ``values`` set; an unknown key or a wrong type is refused, naming
    ``where`` (the file or the command line) and the key."""
    known = {f.name: getattr(settings, f.name) for f in fields(settings)}
    changes = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")
        changes[key] = _coerce(key, value, known[key], where)
    return replace(settings, **changes)


def load_settings(
    path: str | os.PathLike | None, head: str, overrides: dict[str, Any] | None = None
) -> SegSettings:
    """Defaults < the file's ``settings`` < its ``heads: {head: ...}`` < ``overrides``.

    The file (YAML) may also hold ``dataset`` (informative) and ``source`` (free text)."""
    settings = SegSettings(head=head)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"settings file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        unknown = set(data) - {"dataset", "source", "settings", "heads"}
        if unknown:
            raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}")
        settings = apply_overrides(settings, data.get("settings") or {}, str(path))
        per_head = (data.get("heads") or {}).get(head) or {}
        settings = apply_overrides(settings, per_head, f"{path} (heads.{head})")
    return apply_overrides(settings, overrides or {}, "command line").check()


# ------------------------------------------------------------------ text queries
@dataclass
class Queries:
    """Every name of every class as one query: ``names[q]`` belongs to class ``query_class[q]``."""

    names: list[str]
    query_class: Tensor  # [Q] long
    num_classes: int

    @classmethod
    def from_classnames(cls, classnames: Sequence[ClassEntry]) -> Queries:
        """One query per name of each class entry: names separated by commas, or a tuple of
        names taken as they are (CLIPer's entries, whose commas belong to one query)."""
        names, owner = [], []
        for index, entry in enumerate(classnames):
            for name in entry if isinstance(entry, tuple) else split_names(entry):
                names.append(name)
                owner.append(index)
        return cls(names, torch.tensor(owner, dtype=torch.long), len(classnames))

    def of(self, classes: Sequence[int]) -> Tensor:
        """Indices of the queries of ``classes``."""
        wanted = torch.tensor(list(classes), dtype=torch.long)
        return torch.nonzero(torch.isin(self.query_class, wanted)).flatten()


def resolve_classnames(
    spec: str, dataset: str, default: Sequence[str], background: int | None = None
) -> tuple[ClassEntry, ...]:
    """``""`` -> ``default``; ``sclip`` / ``cliper`` -> that method's list for ``dataset``
    (``default`` where it has none; ``background``: the set's background class, which CLIPer's
    list gives its background line); else a file with one class a line."""
    if not spec:
        return tuple(default)
    if spec == "sclip":
        return NAMED_CLASSNAMES.get(f"sclip:{dataset}", tuple(default))
    if spec == "cliper":
        names = segclasses.cliper_classnames(dataset, with_background=background is not None)
        if names is not None and len(names) != len(default):
            raise ValueError(f"classnames: cliper lists {len(names)} classes for {dataset}, "
                             f"the dataset has {len(default)}")  # fmt: skip
        return tuple(default) if names is None else names
    from aclip.data.sets.segmentation import read_classnames

    names = read_classnames(spec)
    if len(names) != len(default):
        raise ValueError(f"{spec} lists {len(names)} classes, the dataset has {len(default)}")
    return names


def resolve_templates(spec: str, dataset_templates: Sequence[str] | None) -> list[Template]:
    """``dataset`` -> the set's own templates (generic layout), else ``load_templates``."""
    if spec == "dataset":
        if not dataset_templates:
            raise ValueError("templates: dataset, but the set has no templates.txt")
        return list(dataset_templates)
    if spec in NAMED_TEMPLATES:
        return list(NAMED_TEMPLATES[spec])
    return load_templates(spec)


def resolve_background(names: Sequence[str]) -> list[str]:
    """A background list given by name (``cliper:voc``, ``cliper:coco``) or as names."""
    if len(names) == 1 and names[0] in NAMED_BACKGROUNDS:
        return list(NAMED_BACKGROUNDS[names[0]])
    return list(names)


@torch.no_grad()
def embed_queries(
    clip: CLIP,
    tokenizer: Callable[[list[str]], Tensor],
    names: Sequence[str],
    templates: Sequence[Template],
    device: torch.device | str = "cpu",
    cache: dict | None = None,
) -> Tensor:
    """Normalised text embeddings [Q, E] of ``names`` (open_clip's zero-shot classifier).

    ``cache`` (a dict shared by the segmenters of one model) keeps them by names and templates.
    """
    key = (tuple(names), tuple(t if isinstance(t, str) else t("\0") for t in templates))
    if cache is not None and key in cache:
        return cache[key]
    emb_QE = zero_shot_classifier(clip, tokenizer, list(names), list(templates), device).T
    if cache is not None:
        cache[key] = emb_QE
    return emb_QE


def class_max(scores_QHW: Tensor, query_class_Q: Tensor, num_classes: int) -> Tensor:
    """Per class, the max over its queries: [Q, ...] -> [num_classes, ...]."""
    flat_QX = scores_QHW.reshape(scores_QHW.shape[0], -1)
    index_QX = query_class_Q.to(flat_QX.device).view(-1, 1).expand_as(flat_QX)
    out_CX = flat_QX.new_full((num_classes, flat_QX.shape[1]), -math.inf)
    out_CX = out_CX.scatter_reduce(0, index_QX, flat_QX, reduce="amax", include_self=True)
    return out_CX.reshape(num_classes, *scores_QHW.shape[1:])
