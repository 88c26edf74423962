"""Open-vocabulary semantic segmentation with a dense head: the segmenter of one head.

:class:`Segmenter` (here) runs one head on one image; the settings and text queries are in
:mod:`aclip.dense.settings`, the two protocols in :mod:`aclip.dense.protocols`, the metric in
:mod:`aclip.dense.metric`, a dataset's evaluation in :mod:`aclip.dense.evaluate`.

The position embedding is resampled as each head's official code does (``pos_interp: head``;
:func:`aclip.dense.heads.resample_pos_embed`): bicubic with ClearCLIP's and SCLIP's
``(n + 0.1) / n0`` scale factor for ``vanilla``, ``sclip``, ``clearclip``, MaskCLIP's bicubic
to the size for ``maskclip``, bilinear for ``cliper``. Small differences from the official
code, all in fp32 here (theirs run fp16): images are resized with PIL (bilinear for the CLIP
protocol where mmcv uses OpenCV's, bicubic for CLIPer as its code).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from aclip.data.sets.segclasses import ClassEntry
from aclip.dense.heads import DenseHead
from aclip.dense.protocols import (
    clip_labels,
    cliper_labels,
    cliper_maps,
    mmseg_size,
    patch_rounded_size,
    slide_logits,
)
from aclip.dense.settings import (
    Queries,
    SegSettings,
    Template,
    class_max,
    embed_queries,
    resolve_background,
)
from aclip.model.clip import CLIP


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
