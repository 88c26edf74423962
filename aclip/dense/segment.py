"""Open-vocabulary semantic segmentation with a dense head: settings, text queries, sliding
windows, the two published protocols, and the mIoU / pixel-accuracy counts.

**Text.** Every class entry may hold several names; each name is one query, embedded as open_clip
builds a zero-shot classifier (per template normalise, average, normalise; the 80 OpenAI
templates by default). A class scores the max over its names.

**The CLIP protocol** (ClearCLIP's and SCLIP's ``forward_slide`` / ``postprocess_result``, used
for ``vanilla``, ``maskclip``, ``sclip``, ``clearclip``): the image is resized as mmseg's
``Resize(scale=(2048, short_side), keep_ratio=True)`` does; windows of ``slide_crop`` pixels every
``slide_stride`` (the last one flush with the border; a crop not divisible by the patch is padded
and the padding cut off again) give per-query cosine maps upsampled (bilinear) to the window,
summed on the image and divided by the window count; the result is resized to the label map,
scaled by ``logit_scale``, softmaxed over the queries and maxed over each class's names; SCLIP's
optional ``area_thd`` drops small classes; the argmax is the prediction, and a pixel whose best
probability is under ``prob_thd`` becomes the background class.

**The CLIPer protocol** (``cliper``; linsun449/cliper.code ``CLIPer.forward``, ``forward_slide``,
``Pipeline`` and ``cam_to_label``): short side ``short_side`` with both sides rounded to patch
multiples (bicubic); per layer, patch-query logits (× ``logit_scale``) over the foreground
queries, the background queries and the mean foreground query, softmaxed, foreground kept; with
``slide_crop`` > 0 the same from windows whose logits and attention are stitched on the patch grid
and propagated by the stitched attention, averaged 1:1 with the whole-image maps; then the
selected layer's map, thresholded at ``attention_thr`` × its max (in place, as the official code,
so the layer mean sees the thresholded map), propagated by the fused affinity, plus the mean of
the per-layer maps; optionally refined by a Stable Diffusion self-attention affinity (``refine``,
:mod:`aclip.dense.sd`); each class map is rescaled to peak at its image score and labelled by
``cam_to_label`` (``score_thd``, ``bkg_thd``, ``cam_normalize``).

The position embedding is resampled as each head's official code does (``pos_interp: head``;
:func:`aclip.dense.heads.resample_pos_embed`): bicubic with ClearCLIP's and SCLIP's
``(n + 0.1) / n0`` scale factor for ``vanilla``, ``sclip``, ``clearclip``, MaskCLIP's bicubic
to the size for ``maskclip``, bilinear for ``cliper``. Small differences from the official
code, all in fp32 here (theirs run fp16): images are resized with PIL (bilinear for the CLIP
protocol where mmcv uses OpenCV's, bicubic for CLIPer as its code).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import Tensor

from aclip.data.sets import segclasses
from aclip.data.sets.imagefolder import load_templates
from aclip.data.sets.segclasses import ClassEntry
from aclip.data.sets.segmentation import IGNORE_INDEX, split_names
from aclip.dense.heads import HEADS, POS_INTERP, DenseHead
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


# ------------------------------------------------------------------ resizing and windows
def mmseg_size(height: int, width: int, short_side: int, max_long: int) -> tuple[int, int]:
    """mmseg's ``Resize(scale=(max_long, short_side), keep_ratio=True)``: the largest scale with
    long side <= max_long and short side <= short_side (up or down), sides rounded."""
    if short_side <= 0:
        return height, width
    scale = min(max_long / max(height, width), short_side / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def patch_rounded_size(height: int, width: int, short_side: int, patch: int) -> tuple[int, int]:
    """CLIPer's ``_resize``: short side to ``short_side``, each side rounded to a patch multiple."""
    ratio = short_side / min(height, width) if short_side > 0 else 1.0
    return (
        int(height * ratio / patch + 0.5) * patch,
        int(width * ratio / patch + 0.5) * patch,
    )


def window_boxes(
    height: int, width: int, crop: int, stride: int
) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of mmseg's sliding windows: every ``stride``, the last flush with the
    border, a side shorter than ``crop`` taken whole. ``crop`` 0: the whole image."""
    if crop <= 0:
        return [(0, height, 0, width)]
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return boxes


def pad_amounts(height: int, width: int, patch: int) -> tuple[int, int, int, int]:
    """ClearCLIP's ``compute_padsize``: (left, right, top, bottom) to reach patch multiples,
    split evenly (the extra pixel right / bottom)."""
    dw, dh = (-width) % patch, (-height) % patch
    return dw // 2, dw - dw // 2, dh // 2, dh - dh // 2


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# ------------------------------------------------------------------ the CLIP protocol
def window_logits(head: DenseHead, crops_BCHW: Tensor, text_QE: Tensor) -> Tensor:
    """Cosine maps [B, Q, h, w] of same-size crops, upsampled (bilinear) to the crop pixels;
    crops not divisible by the patch are padded (ClearCLIP) and the padding cut off again."""
    height, width = crops_BCHW.shape[-2:]
    left, right, top, bottom = pad_amounts(height, width, head.patch_size[0])
    if left or right or top or bottom:
        crops_BCHW = F.pad(crops_BCHW, (left, right, top, bottom))
    out = head(crops_BCHW)
    emb_BNE = out.emb_LBNE[out.selected]
    logits_BQN = torch.einsum("bne,qe->bqn", emb_BNE, text_QE.to(emb_BNE.dtype))
    logits_BQhw = logits_BQN.reshape(*logits_BQN.shape[:2], *out.grid_hw)
    logits_BQHW = F.interpolate(logits_BQhw, size=crops_BCHW.shape[-2:], mode="bilinear")
    return logits_BQHW[..., top : top + height, left : left + width]


def slide_logits(
    head: DenseHead, image_1CHW: Tensor, text_QE: Tensor, crop: int, stride: int, batch: int = 16
) -> Tensor:
    """Window maps summed on the image and divided by each pixel's window count: [Q, H, W]."""
    _, _, height, width = image_1CHW.shape
    preds_QHW = image_1CHW.new_zeros(text_QE.shape[0], height, width)
    count_HW = image_1CHW.new_zeros(height, width)
    for group in _batches(window_boxes(height, width, crop, stride), batch):
        crops = torch.cat([image_1CHW[..., y1:y2, x1:x2] for y1, y2, x1, x2 in group])
        for (y1, y2, x1, x2), logits_QHW in zip(
            group, window_logits(head, crops, text_QE), strict=True
        ):
            preds_QHW[:, y1:y2, x1:x2] += logits_QHW
            count_HW[y1:y2, x1:x2] += 1
    return preds_QHW / count_HW


def clip_labels(
    logits_QHW: Tensor, queries: Queries, settings: SegSettings, background: int | None
) -> tuple[Tensor, Tensor]:
    """Labels [H, W] and class probabilities [C, H, W] from per-query cosine maps (ClearCLIP's
    ``postprocess_result``; SCLIP's ``area_thd``). Below ``prob_thd`` a pixel takes the
    background class (255, no class, on a set without one)."""
    probs_QHW = (logits_QHW * settings.logit_scale).softmax(dim=0)
    probs_CHW = class_max(probs_QHW, queries.query_class, queries.num_classes)
    if settings.area_thd > 0 and background == 0:
        # SCLIP: a class whose predicted area is <= area_thd of all non-background predicted
        # pixels is zeroed before the argmax
        area_C = torch.bincount(probs_CHW.argmax(0).flatten(), minlength=probs_CHW.shape[0])
        area_C = area_C[1:].float()
        keep_C = (area_C > settings.area_thd * area_C.sum()).to(probs_CHW.dtype)
        probs_CHW = torch.cat([probs_CHW[:1], probs_CHW[1:] * keep_C.view(-1, 1, 1)])
    labels_HW = probs_CHW.argmax(dim=0)
    if settings.prob_thd > 0:
        fill = background if background is not None else IGNORE_INDEX
        labels_HW[probs_CHW.max(dim=0).values < settings.prob_thd] = fill
    return labels_HW, probs_CHW


# ------------------------------------------------------------------ the CLIPer protocol
def _layer_logits(emb_LBNE: Tensor, text_TE: Tensor, scale: float) -> Tensor:
    """scale × cosine [L, B, T, N]."""
    return scale * torch.einsum("lbne,te->lbtn", emb_LBNE, text_TE.to(emb_LBNE.dtype))


def cliper_slide(
    head: DenseHead, image_1CHW: Tensor, text_TE: Tensor, settings: SegSettings
) -> Tensor:
    """CLIPer's ``forward_slide``: window logits [L, T] and window affinities stitched on the
    patch grid (each divided by its count), the affinity row-normalised, the logits propagated
    by it: [L, T, h, w] (before the softmax)."""
    patch = head.patch_size[0]
    _, _, height, width = image_1CHW.shape
    h, w = height // patch, width // patch
    crop, stride = settings.slide_crop, settings.slide_stride
    if crop % patch or stride % patch:
        raise ValueError(f"cliper: slide_crop {crop} and slide_stride {stride} must be "
                         f"multiples of the patch ({patch})")  # fmt: skip
    preds, count = None, image_1CHW.new_zeros(h, w)
    attn_hwhw = image_1CHW.new_zeros(h, w, h, w)
    attn_count = torch.zeros_like(attn_hwhw)
    for group in _batches(window_boxes(height, width, crop, stride), settings.window_batch):
        crops = torch.cat([image_1CHW[..., y1:y2, x1:x2] for y1, y2, x1, x2 in group])
        out = head(crops)
        logits_LBTN = _layer_logits(out.emb_LBNE, text_TE, settings.logit_scale)
        if preds is None:
            preds = image_1CHW.new_zeros(logits_LBTN.shape[0], text_TE.shape[0], h, w)
        ch, cw = out.grid_hw
        for b, (y1, _, x1, _) in enumerate(group):
            ys, xs = slice(y1 // patch, y1 // patch + ch), slice(x1 // patch, x1 // patch + cw)
            preds[..., ys, xs] += logits_LBTN[:, b].reshape(*logits_LBTN.shape[:1], -1, ch, cw)
            count[ys, xs] += 1
            attn_hwhw[ys, xs, ys, xs] += out.affinity_BNN[b].reshape(ch, cw, ch, cw)
            attn_count[ys, xs, ys, xs] += 1
    preds = preds / count
    attn_NN = (attn_hwhw / (attn_count + 1e-5)).reshape(h * w, h * w)
    attn_NN = attn_NN / attn_NN.sum(dim=-1, keepdim=True)
    return (preds.flatten(-2) @ attn_NN).unflatten(-1, (h, w))


def cliper_maps(
    head: DenseHead, image_1CHW: Tensor, fg_QE: Tensor, bg_KE: Tensor, settings: SegSettings
) -> Tensor:
    """CLIPer's coarse maps per foreground query: [Qf, h, w] (``CLIPer.forward``)."""
    text_TE = F.normalize(torch.cat([fg_QE, bg_KE, fg_QE.mean(0, keepdim=True)]), dim=-1)
    n_fg = fg_QE.shape[0]
    out = head(image_1CHW)
    h, w = out.grid_hw
    logits_LTN = _layer_logits(out.emb_LBNE, text_TE, settings.logit_scale)[:, 0]
    seg_LQhw = logits_LTN.softmax(dim=1)[:, :n_fg].unflatten(-1, (h, w))
    if settings.slide_crop > 0:
        slide_LThw = cliper_slide(head, image_1CHW, text_TE, settings)
        seg_LQhw = 0.5 * slide_LThw.softmax(dim=1)[:, :n_fg] + 0.5 * seg_LQhw
    # the selected layer is thresholded in place, so the layer mean below averages the
    # thresholded map (cliper.code modified_clip/model.py:226-230: ``seg_last = seg[layer]`` is
    # a view and ``seg_last[...] = 0`` writes into ``seg`` before ``seg.mean(0)``)
    sel_Qhw = seg_LQhw[out.selected]
    sel_Qhw[sel_Qhw < sel_Qhw.amax(dim=(-1, -2), keepdim=True) * settings.attention_thr] = 0
    sel_Qhw = (sel_Qhw.flatten(-2) @ out.affinity_BNN[0]).unflatten(-1, (h, w))
    return sel_Qhw + seg_LQhw.mean(dim=0) if settings.fuse_layers else sel_Qhw


def cam_labels(
    cam_CHW: Tensor, score_C: Tensor, bkg_thd: float, score_thd: float, normalize: bool
) -> Tensor:
    """CLIPer's ``cam_to_label`` for one image: 0 = background, c + 1 = class c. Classes scoring
    <= ``score_thd`` are off; with ``normalize`` each map is min-max scaled; with ``bkg_thd`` > 0
    values under it are zeroed and a pixel with nothing left is background, else the background
    scores (1 - max)²."""
    cam_CX = cam_CHW.flatten(1).clone()
    if normalize:
        cam_CX -= cam_CX.amin(dim=-1, keepdim=True)
        cam_CX /= cam_CX.amax(dim=-1, keepdim=True) + 1e-6
    valid_C1 = (score_C > score_thd).to(cam_CX.dtype).unsqueeze(-1)
    if bkg_thd > 0:
        cam_CX[cam_CX < bkg_thd] = 0
        value_X, label_X = (valid_C1 * cam_CX).max(dim=0)
        label_X = label_X + 1
        label_X[value_X == 0] = 0
    else:
        valid_CX = valid_C1 * cam_CX
        bg_1X = (1 - valid_CX.amax(dim=0, keepdim=True)) ** 2
        label_X = torch.cat([bg_1X, valid_CX]).argmax(dim=0)
    return label_X.reshape(cam_CHW.shape[1:])


def cliper_labels(
    coarse_CHW: Tensor,
    refined_CHW: Tensor,
    out_hw: tuple[int, int],
    fg_classes: Sequence[int],
    background: int | None,
    settings: SegSettings,
) -> tuple[Tensor, Tensor]:
    """Labels [H, W] and class maps [C_fg, H, W] from CLIPer's maps (``main_ovs.py``): the image
    score of a class is the mean of its coarse and refined peaks; the refined map, resized to the
    label map, is rescaled to peak at that score and labelled by :func:`cam_labels`."""
    score_C = 0.5 * refined_CHW.amax(dim=(-1, -2)) + 0.5 * coarse_CHW.amax(dim=(-1, -2))
    pred_CHW = F.interpolate(refined_CHW[None], size=out_hw, mode="bilinear")[0]
    pred_CHW = (
        pred_CHW / (pred_CHW.amax(dim=(-1, -2), keepdim=True) + 1e-5) * score_C[:, None, None]
    )
    cam = cam_labels(
        pred_CHW, score_C, settings.bkg_thd, settings.score_thd, settings.cam_normalize
    )
    lut = torch.tensor(
        [background if background is not None else IGNORE_INDEX, *fg_classes], device=cam.device
    )
    return lut[cam], pred_CHW


# ------------------------------------------------------------------ the segmenter
class Segmenter:
    """A dense head, its queries and settings: ``predict(image)`` gives a label map.

    ``classnames``: one entry per class (:meth:`Queries.from_classnames`). ``mean`` / ``std``:
    the model's input normalisation. ``background``: the set's background class index (or None).
    ``sd``: an :class:`aclip.dense.sd.SDAffinity` for ``refine``. ``text_cache``: a dict shared
    by segmenters of the same model (text embedded once).
    """

    def __init__(
        self,
        clip: CLIP,
        tokenizer: Callable[[list[str]], Tensor],
        classnames: Sequence[ClassEntry],
        settings: SegSettings,
        templates: Sequence[Template],
        background: int | None,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str = "cpu",
        sd: Any = None,
        text_cache: dict | None = None,
    ) -> None:
        self.settings, self.background, self.device, self.sd = settings, background, device, sd
        self.cache = text_cache
        self.head = DenseHead(
            clip, settings.head, settings.select_layer, settings.fuse_layers,
            settings.ignore_residual, settings.pos_interp,
        )  # fmt: skip
        self.queries = Queries.from_classnames(classnames)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.text_QE = embed_queries(
            clip, tokenizer, self.queries.names, templates, device, text_cache
        )
        if settings.head == "cliper":
            self._init_cliper(clip, tokenizer, templates)

    def _init_cliper(self, clip: CLIP, tokenizer: Callable, templates: Sequence[Template]) -> None:
        classes = range(self.queries.num_classes)
        self.fg_classes = [c for c in classes if c != self.background]
        fg_q = self.queries.of(self.fg_classes)
        self.fg_QE = self.text_QE[fg_q]
        self.fg_owner = torch.searchsorted(
            torch.tensor(self.fg_classes), self.queries.query_class[fg_q]
        )
        bg_names = resolve_background(self.settings.background_names)
        if bg_names:
            self.bg_KE = embed_queries(
                clip, tokenizer, bg_names, templates, self.device, self.cache
            )
        elif self.background is not None:
            self.bg_KE = self.text_QE[self.queries.of([self.background])]
        else:
            self.bg_KE = embed_queries(
                clip, tokenizer, ["background"], templates, self.device, self.cache
            )

    def _tensor(self, image: Image.Image, size_hw: tuple[int, int], resample: int) -> Tensor:
        resized = image.resize((size_hw[1], size_hw[0]), resample)
        array = np.asarray(resized, dtype=np.float32) / 255.0
        image_13HW = torch.from_numpy(array).permute(2, 0, 1)[None].to(self.device)
        return (image_13HW - self.mean) / self.std

    @torch.no_grad()
    def predict(self, image: Image.Image) -> tuple[Tensor, Tensor]:
        """Label map [H, W] (the image's size; class indices, 255 = no class) and the class
        score maps [C, H, W] (CLIP protocol) or foreground maps [C_fg, H, W] (CLIPer)."""
        image = image.convert("RGB")
        out_hw = (image.height, image.width)
        s = self.settings
        if s.head == "cliper":
            size = patch_rounded_size(*out_hw, s.short_side, self.head.patch_size[0])
            image_1CHW = self._tensor(image, size, Image.Resampling.BICUBIC)
            return self._cliper(image, image_1CHW, out_hw)
        size = mmseg_size(*out_hw, s.short_side, s.max_long_side)
        image_1CHW = self._tensor(image, size, Image.Resampling.BILINEAR)
        logits_QHW = slide_logits(
            self.head, image_1CHW, self.text_QE, s.slide_crop, s.slide_stride, s.window_batch
        )
        logits_QHW = F.interpolate(logits_QHW[None], size=out_hw, mode="bilinear")[0]
        return clip_labels(logits_QHW, self.queries, s, self.background)

    def _cliper(
        self, image: Image.Image, image_1CHW: Tensor, out_hw: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        s = self.settings
        coarse_Qhw = cliper_maps(self.head, image_1CHW, self.fg_QE, self.bg_KE, s)
        refined_Qhw = coarse_Qhw
        if s.refine != "none":
            image01 = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
            refined_Qhw = self.sd.refine(image01.permute(2, 0, 1)[None], coarse_Qhw, s)
        n_fg = len(self.fg_classes)
        coarse_CHW = class_max(coarse_Qhw, self.fg_owner, n_fg)
        refined_CHW = class_max(refined_Qhw, self.fg_owner, n_fg)
        return cliper_labels(coarse_CHW, refined_CHW, out_hw, self.fg_classes, self.background, s)


# ------------------------------------------------------------------ metrics
class SegMetric:
    """mIoU and pixel accuracy as mmseg's ``IoUMetric`` counts them: per class, intersection,
    union, label and prediction areas summed over all images (pixels labelled ``ignore_index``
    left out; predictions outside the classes count for no class); IoU = intersection / union,
    averaged over the classes whose union is not empty; pixel accuracy = correct / labelled."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.intersect = torch.zeros(num_classes, dtype=torch.float64)
        self.area_pred = torch.zeros(num_classes, dtype=torch.float64)
        self.area_label = torch.zeros(num_classes, dtype=torch.float64)
        self.images = 0

    def update(self, pred_HW: Tensor | np.ndarray, label_HW: Tensor | np.ndarray) -> None:
        """Add one image's prediction and label map (same shape)."""
        pred, label = torch.as_tensor(pred_HW).long().cpu(), torch.as_tensor(label_HW).long().cpu()
        if pred.shape != label.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} vs label {tuple(label.shape)}")
        keep = label != self.ignore_index
        pred, label = pred[keep], label[keep]
        n = self.num_classes
        in_range = (pred >= 0) & (pred < n)
        self.area_pred += torch.bincount(pred[in_range], minlength=n)[:n].double()
        self.area_label += torch.bincount(label, minlength=n)[:n].double()
        self.intersect += torch.bincount(label[pred == label], minlength=n)[:n].double()
        self.images += 1

    def compute(self) -> dict[str, Any]:
        """``mIoU``, ``aAcc`` (pixel accuracy), ``mAcc``, per-class ``IoU`` / ``Acc`` (None for
        a class absent from labels and predictions), and ``n`` images."""
        union = self.area_pred + self.area_label - self.intersect
        iou = torch.where(union > 0, self.intersect / union.clamp(min=1), torch.nan)
        acc = torch.where(self.area_label > 0, self.intersect / self.area_label.clamp(min=1),
                          torch.nan)  # fmt: skip
        labelled = self.area_label.sum()
        return {
            "mIoU": float(torch.nanmean(iou)) if (union > 0).any() else float("nan"),
            "aAcc": float(self.intersect.sum() / labelled) if labelled > 0 else float("nan"),
            "mAcc": float(torch.nanmean(acc)) if (self.area_label > 0).any() else float("nan"),
            "IoU": [None if math.isnan(v) else v for v in iou.tolist()],
            "Acc": [None if math.isnan(v) else v for v in acc.tolist()],
            "n": self.images,
        }
