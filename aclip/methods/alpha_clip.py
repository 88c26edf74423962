"""Alpha-CLIP (Sun et al., CVPR 2024, arXiv 2312.03818): a CLIP that attends to a region given
as an alpha mask, the whole image kept as context.

One step, top to bottom (sources: the paper and its official code, SunzeY/AlphaCLIP,
``train/train/train_grit_1m.py``, ``train/dataset/alpha_grit.py``, ``alpha_clip/model.py``):

1. The loader gives each sample one view and its alpha (`sample_views`,
   ``aclip.data.regions.RegionViews``): one region of the sample drawn per step with its
   caption, or with probability ``alpha.full_image_prob`` (0.1, the official ``common_pair``)
   the full caption with an all-ones alpha; the mask goes through the image's crop and resize.
2. The vision tower adds its alpha conv (``model.alpha_channel``: ``Conv2d(1, width, patch,
   patch)``, bias-free, zero-initialised, as ``conv1_alpha``) of the normalised alpha
   ((a - 0.5) / 0.26) to the RGB patch embedding, before the position embedding.
3. loss = InfoNCE(images with alpha, captions), gathered across ranks, with label smoothing
   ``alpha.label_smoothing`` (0.1, official) at a fixed temperature: the logit scale is ln 100
   and not trained (official ``log_scale`` 4.6052, ln 100 rounded; we keep ln 100 exactly,
   the clamp of every aclip CLIP). Its gradient is the official one: the gathered features
   carry none (``aclip.methods.losses.no_grad_columns``), so only the image->text term trains the
   vision tower; ``alpha.symmetric_grad=true`` lets the text->image term train it too.
4. What trains: the whole vision tower and the image projection (the official code trains
   ``model.visual``, whose ``proj`` is our ``image_proj``); the text tower, its projection and
   the logit scale are frozen here. The learning rates per part are the general
   ``optim.param_groups`` (the recipe: the alpha conv at ``optim.lr``, the rest at 0.01 x,
   official ``para_gamma``); see configs/alpha_clip_vit_b16.yaml.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from aclip.config import Config, ConfigError
from aclip.data.regions import RegionViews
from aclip.data.views import model_input
from aclip.methods.base import Cost, Forward, Method, StepLoss, Views
from aclip.methods.losses import multi_view_infonce
from aclip.methods.registry import register
from aclip.model import build_clip, build_student, normalize_alpha

FIXED_LOGIT_SCALE = math.log(100.0)


def frozen_parts(student: nn.Module) -> list[nn.Module | nn.Parameter]:
    """What Alpha-CLIP does not train: the text tower, the text projection, the logit scale."""
    clip = student.clip
    return [clip.text, clip.text_proj, clip.logit_scale]


@register
class AlphaCLIP(Method):
    """Region-text fine-tuning of a CLIP with an alpha channel (see the module docstring)."""

    name = "alpha_clip"

    def build_student(self) -> nn.Module:
        """CLIP with an alpha conv (``model.alpha_channel``), its text side and temperature
        frozen."""
        student = build_student(build_clip(self.cfg.model), self.cfg.model)
        for part in frozen_parts(student):
            part.requires_grad_(False)
        return student

    def attach(self, student: nn.Module) -> None:
        """Fix the logit scale at ln 100 (after ``model.init_from`` loaded the weights)."""
        super().attach(student)
        with torch.no_grad():
            student.clip.logit_scale.fill_(FIXED_LOGIT_SCALE)

    def sample_views(self) -> Views:
        """One region-text pair per sample (``aclip.data.regions.RegionViews``), uint8."""
        alpha, data = self.cfg.alpha, self.cfg.data
        return RegionViews(
            self.cfg.model.image_size,
            full_image_prob=alpha.full_image_prob,
            view=alpha.view,
            scale=(data.crop_scale_min, 1.0),
            color_aug=data.color_aug,
        )

    def loss(self, forward: Forward, batch: Mapping[str, torch.Tensor], step: int) -> StepLoss:
        """Label-smoothed InfoNCE of the images with their alpha against the captions."""
        dtype = self.ctx.input_dtype
        images = model_input(self.to_device(batch["views"]), dtype).flatten(0, 1)
        alpha = normalize_alpha(self.to_device(batch["alpha"]), dtype).flatten(0, 1)
        out = forward(images, self.to_device(batch["tokens"]), None, alpha)
        clip = multi_view_infonce(
            [out["image_emb"].float()],
            out["text_emb"].float(),
            out["logit_scale_exp"].float(),
            self.cfg.alpha.label_smoothing,
            gathered_grad=self.cfg.alpha.symmetric_grad,
        )
        return StepLoss(clip, {"clip": clip})

    def scalars(self, step: int) -> dict[str, float]:
        """The size of the alpha conv's weights (it starts at zero)."""
        conv = self.student.clip.visual.alpha_conv
        return {"train/alpha_conv_norm": float(conv.weight.detach().norm())}

    @classmethod
    def validate(cls, cfg: Config) -> None:
        """Alpha-CLIP needs the alpha conv."""
        super().validate(cfg)
        if not cfg.model.alpha_channel:
            raise ConfigError(
                "config key 'model.alpha_channel': method=alpha_clip needs model.alpha_channel=true"
            )

    @classmethod
    def cost(cls, cfg: Config, num_patches: int) -> Cost:
        """One view, all tokens, no teacher, no NT-Xent (the alpha conv is not counted)."""
        return Cost(num_views=1, kept=None, teacher=False, simclr=False)
