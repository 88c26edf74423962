"""A-CLIP (Yang et al., ICCV 2023, arXiv 2212.08653): attentive token keeping + SimCLR + BYOL.

One step, top to bottom (docs/design.md, "A-CLIP step by step"):

1. The loader gives each sample two (``mask.num_views``) online crops, their union box resized
   as the EMA view, and each crop's box in the EMA view's coordinates (`sample_views`).
2. The EMA teacher encodes the EMA view with all tokens, without gradients, and returns the CLS
   query's attention to every patch averaged over layers and heads (`teacher_pass`); with
   ``ema.image_size`` it sees the EMA view at that (lower) resolution, its position embedding
   resampled on the fly, and the relevance lies on that coarser grid.
3. That relevance is cropped to each online view's box and resampled onto its patch grid
   (`map_relevance_to_views`, one batched `roi_align`).
4. The top-k patches of each view are kept (`TokenSelector`; ``mask.strategy`` ``random`` and
   ``none`` are the FLIP and all-token ablations of this step, with everything else the same).
5. Both views and the captions go through the student in one batch (the engine's forward).
   `prepare` is steps 1-4 (no gradients), `forward` step 5 and `loss_from` step 6.
6. loss = mean over views of InfoNCE(view, text) + w_simclr NT-Xent(view 1, view 2)
   + w_byol mean over views of BYOL(view -> the teacher's projection of the EMA view).
7. After each applied optimizer step the teacher moves toward the student (`after_step`,
   momentum on a cosine schedule to ``ema.final_momentum``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from aclip.config import Config, ConfigError
from aclip.data.views import model_input
from aclip.methods.base import Cost, Forward, Method, RunContext, StepLoss, Views
from aclip.methods.ema import EMATeacher, ema_momentum
from aclip.methods.losses import aclip_loss
from aclip.methods.registry import register
from aclip.methods.tokens import TokenSelector, get_strategy, map_relevance_to_views, num_keep
from aclip.methods.visualize import kept_tokens_grid
from aclip.model import build_model

HEAD_SIZE_KEYS = ("simclr_hidden", "simclr_out", "byol_hidden", "byol_out")


def runs_teacher(cfg: Config, num_patches: int) -> bool:
    """Whether A-CLIP keeps (and runs, every step) an EMA teacher: for attentive selection that
    drops tokens, for the BYOL target, or when ``eval.use_ema`` asks for one."""
    selects = (
        get_strategy(cfg.mask.strategy).needs_relevance
        and num_keep(num_patches, cfg.mask.keep_ratio) < num_patches
    )
    return selects or cfg.loss.w_byol > 0 or cfg.eval.use_ema


def teacher_image_size(cfg: Config) -> int:
    """The side of the EMA view the teacher sees: ``ema.image_size``, or the model's (0)."""
    return cfg.ema.image_size or cfg.model.image_size


def mask_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """Random token selection draws from (seed, rank, step): reproducible and exact on resume."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + rank) * 1_000_003 + step)
    return gen


@register
class ACLIP(Method):
    """A-CLIP: the student is CLIP with its SimCLR and BYOL heads; the EMA teacher mirrors the
    vision tower, the image projection and the BYOL projector (see the module docstring)."""

    name = "aclip"
    loss_terms = ("clip", "simclr", "byol", "caption_bow", "text_bow")

    def __init__(self, cfg: Config, ctx: RunContext) -> None:
        super().__init__(cfg, ctx)
        self.selector: TokenSelector | None = None
        self.teacher: EMATeacher | None = None
        self._ema_source: nn.ModuleDict | None = None
        self.teacher_size = teacher_image_size(cfg)

    # ------------------------------------------------------------------ modules
    def build_student(self) -> nn.Module:
        """CLIP, then the SimCLR head (if ``loss.w_simclr`` > 0) and BYOL heads (``w_byol``)."""
        return build_model(self.cfg.model, self.cfg.loss)

    def attach(self, student: nn.Module) -> None:
        """The token selector for the student's patch grid, and the EMA teacher (a copy of the
        parts it mirrors) when :func:`runs_teacher` says one is needed."""
        super().attach(student)
        mask, visual = self.cfg.mask, student.clip.visual
        self.selector = TokenSelector(mask.strategy, mask.keep_ratio, visual.grid_hw,
                                      mask.block_size)  # fmt: skip
        try:
            visual.grid_for(self.teacher_size, self.teacher_size)
        except ValueError as err:
            raise ConfigError(f"config key 'ema.image_size': {err}") from None
        parts = {"visual": visual, "image_proj": student.clip.image_proj}
        if student.byol_projector is not None:
            parts["byol_projector"] = student.byol_projector
        self._ema_source = nn.ModuleDict(parts)
        if runs_teacher(self.cfg, visual.num_patches):
            self.teacher = EMATeacher(self._ema_source)

    def sample_views(self) -> Views:
        """``mask.num_views`` online crops, the EMA (union) view at the teacher's size and the
        boxes, as uint8 pixels (normalised on the device in :meth:`loss`). The EMA view is
        resized to the teacher's size here, from the decoded image: one resampling, and cheaper
        than resizing a full-size view on the device (see BENCHMARKS.md)."""
        return self.view_sampler(self.cfg.mask.num_views, ema_size=self.teacher_size)

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def teacher_pass(
        self, ema_images: Tensor, boxes_BV4: Tensor, step: int, byol: bool = True
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """EMA view through the teacher: (keep_idx [B*V, k] or None, BYOL target or None,
        relevance_BN or None on the teacher's grid); ``byol=False`` skips the BYOL projector.

        The teacher sees the EMA view at ``ema.image_size`` (a view of another size, e.g. a
        full-size one, is resized on the device first: antialiased bilinear); its relevance map,
        on that coarser grid, is resampled onto each online view's grid by the box mapping."""
        batch, views = boxes_BV4.shape[:2]
        device = self.ctx.device
        generator = mask_generator(self.cfg.train.seed, self.ctx.rank, step, device)
        if self.teacher is None:
            return self.selector.select(None, batch * views, generator, device), None, None
        teacher = self.teacher.module
        ema_images = self.teacher_input(ema_images)
        with self.ctx.autocast():
            pooled_BW, relevance_BN = teacher["visual"].forward_with_relevance(ema_images)
            project = byol and "byol_projector" in teacher
            target = teacher["byol_projector"](pooled_BW) if project else None
        relevance_BN = relevance_BN.float()
        mapped_BVN = None
        if self.selector.needs_relevance:
            visual = teacher["visual"]
            grid = visual.grid_for(*ema_images.shape[-2:])
            mapped_BVN = map_relevance_to_views(relevance_BN, grid, boxes_BV4, visual.grid_hw)
            mapped_BVN = mapped_BVN.flatten(0, 1)
        keep_idx = self.selector.select(mapped_BVN, batch * views, generator, device)
        return keep_idx, (target.float() if target is not None else None), relevance_BN

    def teacher_input(self, ema_images: Tensor) -> Tensor:
        """The EMA view at the teacher's size (resized here only if the loader did not)."""
        size = self.teacher_size
        if tuple(ema_images.shape[-2:]) == (size, size):
            return ema_images
        return F.interpolate(ema_images, size=(size, size), mode="bilinear", antialias=True)

    def prepare(self, batch: Mapping[str, Tensor], step: int) -> dict[str, Tensor]:
        """Steps 2-4 of the module docstring: the views (augmented on the device with
        data.augment_on=gpu) normalised on the device, the teacher's pass on the EMA views, the
        kept tokens and the BYOL target."""
        batch = self.device_batch(batch, self.teacher_size)
        views = model_input(self.to_device(batch["views"]), self.ctx.input_dtype)
        ema = model_input(self.to_device(batch["ema"]))
        boxes = self.to_device(batch["boxes"]).float()
        keep_idx, byol_target, _ = self.teacher_pass(ema, boxes, step)
        prepared = {"views": views, "tokens": self.to_device(batch["tokens"])}
        if keep_idx is not None:
            prepared["keep_idx"] = keep_idx
        if byol_target is not None:
            prepared["byol_target"] = byol_target
        return prepared

    def forward(self, forward: Forward, prepared: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Step 5: both views (kept tokens) and the captions through the student."""
        views = prepared["views"]
        return forward(views.flatten(0, 1), prepared["tokens"], prepared.get("keep_idx"))

    def loss_from(self, outputs: Mapping[str, Tensor], prepared: Mapping[str, Tensor]) -> StepLoss:
        """Step 6: InfoNCE per view + w_simclr NT-Xent + w_byol BYOL (+ the caption-word terms
        when ``loss.w_caption_bow`` / ``w_text_bow`` ask for them)."""
        n, v = prepared["views"].shape[:2]

        def per_view(x: Tensor | None) -> list[Tensor] | None:
            return None if x is None else list(x.float().view(n, v, -1).unbind(1))

        loss = self.cfg.loss
        terms = aclip_loss(
            per_view(outputs["image_emb"]),
            outputs["text_emb"].float(),
            outputs["logit_scale_exp"].float(),
            per_view(outputs.get("simclr_z")),
            per_view(outputs.get("byol_pred")),
            prepared.get("byol_target"),
            loss.w_simclr,
            loss.w_byol,
            loss.simclr_temperature,
            None if outputs.get("logit_bias") is None else outputs["logit_bias"].float(),
        )
        named = {"clip": terms.clip, "simclr": terms.simclr, "byol": terms.byol}
        return self.with_word_terms(StepLoss(terms.total, named), outputs, prepared["tokens"])

    def momentum(self, step: int) -> float:
        """EMA momentum of the update after step ``step`` (cosine schedule)."""
        ema = self.cfg.ema
        return ema_momentum(step, self.ctx.total_steps, ema.momentum, ema.final_momentum)

    def after_step(self, step: int) -> None:
        """Move the teacher toward the student."""
        if self.teacher is not None:
            self.teacher.update(self._ema_source, self.momentum(step))

    def scalars(self, step: int) -> dict[str, float]:
        """EMA momentum and the fraction of patch tokens each view keeps."""
        selector = self.selector
        kept = 1.0 if selector.keeps_all else selector.k / selector.num_patches
        return {"train/ema_momentum": self.momentum(step), "train/kept_fraction": kept}

    def images(self, batch: Mapping[str, Tensor], step: int, n: int = 4) -> dict[str, Tensor]:
        """The first views of ``n`` samples with the dropped patches dimmed, beside the EMA view
        and the teacher's relevance."""
        pictured = ("views", "ema", "boxes", "canvas", "view_boxes", "colour")
        batch = {k: batch[k][:n] for k in pictured if k in batch}  # the stream adds scalars
        batch = self.device_batch(batch, self.teacher_size)
        views = model_input(batch["views"][:n].to(self.ctx.device))
        ema = model_input(batch["ema"][:n].to(self.ctx.device))
        boxes = batch["boxes"][:n].to(self.ctx.device).float()
        keep, _, relevance = self.teacher_pass(ema, boxes, step, byol=False)
        first_keep = None if keep is None else keep.view(len(views), -1, keep.shape[-1])[:, 0]
        visual = self.student.clip.visual
        relevance_grid = visual.grid_for(self.teacher_size, self.teacher_size)
        grid = visual.grid_hw
        return {"masking/kept_tokens": kept_tokens_grid(views[:, 0], first_keep, grid, ema,
                                                        relevance, relevance_grid)}  # fmt: skip

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def validate(cls, cfg: Config) -> None:
        """SimCLR compares two views: it needs ``mask.num_views`` >= 2."""
        super().validate(cfg)
        if cfg.loss.w_simclr > 0 and cfg.mask.num_views < 2:
            raise ConfigError("config key 'loss.w_simclr': SimCLR needs mask.num_views >= 2")

    def state_dict(self) -> dict[str, Any]:
        """The EMA teacher (``ema``; None without one)."""
        return {"ema": self.teacher.state_dict() if self.teacher is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the teacher (a checkpoint without one leaves it as built)."""
        if self.teacher is not None and state.get("ema") is not None:
            self.teacher.load_state_dict(state["ema"])

    @classmethod
    def shape_fields(cls, cfg: Config) -> dict[str, Any]:
        """The model's keys, the SSL head sizes and which heads exist."""
        fields = super().shape_fields(cfg)
        fields |= {f"loss.{key}": getattr(cfg.loss, key) for key in HEAD_SIZE_KEYS}
        return fields | {
            "loss.simclr_head": cfg.loss.w_simclr > 0,
            "loss.byol_heads": cfg.loss.w_byol > 0,
        }

    @classmethod
    def cost(cls, cfg: Config, num_patches: int) -> Cost:
        """``mask.num_views`` views keeping ``mask.keep_ratio`` (unless ``none``), the teacher
        when :func:`runs_teacher` (on the patches of ``ema.image_size``), NT-Xent with two or
        more views."""
        mask = cfg.mask
        kept = None if mask.strategy == "none" else num_keep(num_patches, mask.keep_ratio)
        scale = teacher_image_size(cfg) / cfg.model.image_size
        teacher_patches = round(num_patches * scale * scale)
        return Cost(
            num_views=mask.num_views,
            kept=None if kept == num_patches else kept,
            teacher=runs_teacher(cfg, num_patches),
            simclr=cfg.loss.w_simclr > 0 and mask.num_views >= 2,
            teacher_patches=None if teacher_patches == num_patches else teacher_patches,
        )
