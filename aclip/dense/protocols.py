"""The two published inference protocols of the dense heads, from a normalised image tensor to
labels: resizing, sliding windows, and each protocol's maps and labelling.

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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from aclip.data.sets.segmentation import IGNORE_INDEX
from aclip.dense.heads import DenseHead
from aclip.dense.settings import Queries, SegSettings, class_max


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
