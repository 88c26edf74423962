"""The method interface: what one training recipe owns (docs/design.md, "Methods").

A method is a single-device object. It builds the module the engine trains (the *student*, with
whatever it freezes), keeps any module outside the engine (an EMA teacher), says how each image
becomes a training sample (its views), computes the loss of one step from a batch (running the
teacher and choosing tokens first when it has them), updates its own state after each applied
optimizer step, names its loss terms and extra scalars, and saves and restores its state. The
trainer runs any method through the same loop and knows none of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor, nn

from aclip.config import Config, ConfigError
from aclip.methods.losses import caption_word_losses
from aclip.methods.tokens import STRATEGIES

# ModelConfig keys that do not decide the shapes of the weights: free to change on resume
RUNTIME_MODEL_KEYS = ("grad_checkpointing", "compile", "init_from", "init_from_name")
Forward = Callable[..., dict[str, Tensor]]  # the engine: the student's forward
Views = Callable[[Image.Image], dict[str, Tensor]]


@dataclass(frozen=True)
class RunContext:
    """What a method needs to know of the run: where it runs and for how long."""

    device: torch.device
    rank: int
    world_size: int
    total_steps: int  # length of the LR and EMA schedules
    input_dtype: torch.dtype  # dtype of the engine's weights: images are fed in it
    bf16_autocast: bool  # no-grad passes outside the engine (a teacher) run under bf16 autocast

    def autocast(self) -> torch.autocast:
        """bf16 autocast for passes outside the engine (enabled for bf16 runs on a GPU)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16_autocast)


@dataclass(frozen=True)
class Cost:
    """What decides the FLOPs of one step of a method (see aclip.methods.flops)."""

    num_views: int  # online views per sample through the student's vision tower
    kept: int | None  # patches each view keeps (None: all)
    teacher: bool  # an EMA teacher pass (all tokens, relevance) per sample
    simclr: bool  # NT-Xent between views
    teacher_patches: int | None = None  # patches the teacher sees (None: the model's number)


@dataclass
class StepLoss:
    """The loss of one step: the total to back-propagate and each named term (undetached)."""

    total: Tensor
    terms: dict[str, Tensor]


class Method:
    """Base class of the training recipes; see the module docstring for what each part owns."""

    name: ClassVar[str] = ""
    loss_terms: ClassVar[tuple[str, ...]] = ("clip",)

    def __init__(self, cfg: Config, ctx: RunContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.student: nn.Module | None = None

    # ------------------------------------------------------------------ modules
    def build_student(self) -> nn.Module:
        """The module the engine trains (it has a ``clip`` attribute: the CLIP being trained);
        parameters it freezes have ``requires_grad=False``."""
        raise NotImplementedError

    def attach(self, student: nn.Module) -> None:
        """Called with the student once it is on its device (cross-rank BatchNorm in place),
        before the engine is built: the place to build anything kept beside it (a teacher)."""
        self.student = student

    # ------------------------------------------------------------------ data
    def sample_views(self) -> Views:
        """Per-image transform of the training loader (PIL image -> dict of tensors)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ one step
    # A step's loss is prepare (no gradients: the batch on the device, a teacher's targets,
    # token selection) -> forward (the student, through the engine) -> loss_from (the loss of
    # the outputs). Gradient accumulation (aclip.train.accumulation) splits the prepared batch into
    # micro-batches along dim 0, runs forward on each and concatenates their outputs along dim
    # 0 (but for the keys in ``whole_outputs``), so every tensor of the prepared batch and of the
    # outputs must be per sample (or per sample and view), in the batch's order.
    whole_outputs: ClassVar[tuple[str, ...]] = ("logit_scale_exp", "logit_bias")

    def prepare(self, batch: Mapping[str, Tensor], step: int) -> dict[str, Tensor]:
        """This rank's ``batch`` ready for the student, at optimizer step ``step`` (no grad)."""
        raise NotImplementedError

    def forward(self, forward: Forward, prepared: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The student's outputs on ``prepared``; ``forward`` is the engine."""
        raise NotImplementedError

    def loss_from(self, outputs: Mapping[str, Tensor], prepared: Mapping[str, Tensor]) -> StepLoss:
        """The loss of the student's ``outputs`` on ``prepared`` (gathered over ranks)."""
        raise NotImplementedError

    def with_word_terms(
        self, loss: StepLoss, outputs: Mapping[str, Tensor], tokens_BL: Tensor
    ) -> StepLoss:
        """``loss`` plus the caption-word terms (``loss.w_caption_bow`` x image term +
        ``loss.w_text_bow`` x text term, :func:`aclip.methods.losses.caption_word_losses`) when the
        student has the word head; both terms are named (zero without the head)."""
        zero = loss.total.new_zeros(())
        terms = dict(loss.terms) | {"caption_bow": zero, "text_bow": zero}
        if "image_bow" not in outputs:
            return StepLoss(loss.total, terms)
        weights = self.cfg.loss
        image, text = caption_word_losses(
            outputs["image_bow"], outputs["text_bow"], tokens_BL, weights.caption_bow_idf
        )
        total = loss.total + weights.w_caption_bow * image + weights.w_text_bow * text
        return StepLoss(total, terms | {"caption_bow": image, "text_bow": text})

    def loss(self, forward: Forward, batch: Mapping[str, Tensor], step: int) -> StepLoss:
        """The loss of one step on this rank's ``batch`` at optimizer step ``step``; ``forward``
        is the engine (call it as the student)."""
        prepared = self.prepare(batch, step)
        return self.loss_from(self.forward(forward, prepared), prepared)

    def after_step(self, step: int) -> None:
        """After an applied optimizer step ``step`` (0-based): e.g. the EMA update."""

    def scalars(self, step: int) -> dict[str, float]:
        """Method-specific tensorboard scalars at a logging step."""
        return {}

    def images(self, batch: Mapping[str, Tensor], step: int) -> dict[str, Tensor]:
        """Tensorboard pictures of ``batch`` at step ``step`` (tag -> CHW image)."""
        return {}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the method beside the engine (e.g. the teacher)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (keys missing from old checkpoints: kept)."""

    @classmethod
    def validate(cls, cfg: Config) -> None:
        """Refuse (ConfigError, naming the key) settings this method cannot run: here, a
        ``mask.strategy`` no token-strategy file registers (the check lives with the registry,
        above the config, so a new strategy is one new file)."""
        if cfg.mask.strategy not in STRATEGIES:
            raise ConfigError(
                f"config key 'mask.strategy': must be one of {', '.join(sorted(STRATEGIES))} "
                f"(got {cfg.mask.strategy!r})"
            )

    @classmethod
    def shape_fields(cls, cfg: Config) -> dict[str, Any]:
        """The config values that decide the shapes of what is saved: a checkpoint resumes only
        if these agree (model keys; a method adds its heads')."""
        fields = {
            f"model.{k}": v for k, v in vars(cfg.model).items() if k not in RUNTIME_MODEL_KEYS
        }
        return fields | {
            "method": cls.name,
            "loss.caption_word_head": cfg.loss.caption_words,
            "loss.logit_bias": cfg.loss.contrastive == "siglip",  # SigLIP's extra parameter
        }

    @classmethod
    def cost(cls, cfg: Config, num_patches: int) -> Cost:
        """What one training step of this method computes (for the FLOP model)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def view_sampler(self, num_views: int, ema_size: int = 0) -> Views:
        """The loader's per-image transform for ``num_views`` online views and, with
        ``ema_size`` > 0, an EMA view of that side, as uint8 pixels: made by the loader
        (``data.augment_on=cpu``) or drawn there and made on the device (``gpu``,
        :meth:`device_batch`)."""
        from aclip.data.gpu_views import DeviceViewInputs
        from aclip.data.views import ACLIPViews

        data = self.cfg.data
        sampler = DeviceViewInputs if data.augment_on == "gpu" else ACLIPViews
        return sampler(self.cfg.model.image_size, num_views=num_views,
                       scale=(data.crop_scale_min, 1.0), color_aug=data.color_aug,
                       normalize=False, ema_view=ema_size > 0,
                       ema_size=ema_size or None)  # fmt: skip

    def device_batch(self, batch: Mapping[str, Tensor], ema_size: int = 0) -> Mapping[str, Tensor]:
        """``batch`` with its views (and an EMA view of side ``ema_size`` > 0) made on this
        run's device when the loader sent canvases (``data.augment_on=gpu``); otherwise as it
        is."""
        if "canvas" not in batch:
            return batch
        from aclip.data.gpu_views import on_device

        return on_device(batch, self.ctx.device, self.cfg.model.image_size, ema_size)

    def to_device(self, x: Tensor) -> Tensor:
        """A loader tensor on this run's device (pinned memory: asynchronous)."""
        return x.to(self.ctx.device, non_blocking=True)
