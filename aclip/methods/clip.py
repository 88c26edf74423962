"""Plain CLIP (Radford et al., 2021) and FLIP (Li et al., CVPR 2023): one view per sample and the
symmetric InfoNCE; FLIP encodes a random ``mask.keep_ratio`` of the patch tokens (or another
relevance-free ``mask.strategy``, e.g. ``gaussian``: see :class:`FLIP`).

Equal, number for number, to A-CLIP with ``mask.strategy=none`` (CLIP) or ``random`` (FLIP),
``mask.num_views=1`` and no SimCLR / BYOL (tests/test_methods.py), without building a teacher,
SSL heads or an EMA view.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from aclip.config import Config
from aclip.data.views import model_input
from aclip.methods.aclip import mask_generator
from aclip.methods.base import Cost, Forward, Method, RunContext, StepLoss, Views
from aclip.methods.losses import contrastive_views
from aclip.methods.registry import register
from aclip.methods.tokens import STRATEGIES, TokenSelector, num_keep
from aclip.model import build_clip, build_student, caption_word_head


@register
class CLIP(Method):
    """All patch tokens of one view per sample; InfoNCE against the captions."""

    name = "clip"
    loss_terms = ("clip", "caption_bow", "text_bow")
    strategy = "none"

    def __init__(self, cfg: Config, ctx: RunContext) -> None:
        super().__init__(cfg, ctx)
        self.selector: TokenSelector | None = None

    def build_student(self) -> nn.Module:
        """CLIP without SSL heads (with the caption-word head if the loss asks for it)."""
        model_cfg = self.cfg.model
        clip = build_clip(model_cfg, self.cfg.loss)
        head = caption_word_head(model_cfg, self.cfg.loss)
        return build_student(clip, model_cfg, bow_head=head)

    def attach(self, student: nn.Module) -> None:
        """The token selector of this method for the student's patch grid."""
        super().attach(student)
        mask, visual = self.cfg.mask, student.clip.visual
        strategy = self.token_strategy(self.cfg)
        self.selector = TokenSelector(strategy, mask.keep_ratio, visual.grid_hw, mask.block_size)

    def sample_views(self) -> Views:
        """One RandomResizedCrop view with colour augmentation, uint8 (no EMA view)."""
        return self.view_sampler(num_views=1)

    def prepare(self, batch: Mapping[str, Tensor], step: int) -> dict[str, Tensor]:
        """The view (augmented on the device with data.augment_on=gpu) normalised on the device,
        the captions and the kept tokens."""
        batch = self.device_batch(batch)
        views = model_input(self.to_device(batch["views"]), self.ctx.input_dtype)
        rows = views.shape[0] * views.shape[1]
        device = self.ctx.device
        generator = mask_generator(self.cfg.train.seed, self.ctx.rank, step, device)
        prepared = {"views": views, "tokens": self.to_device(batch["tokens"])}
        keep_idx = self.selector.select(None, rows, generator, device)
        if keep_idx is not None:
            prepared["keep_idx"] = keep_idx
        return prepared

    def forward(self, forward: Forward, prepared: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The (token-selected) view and the captions through the student."""
        views = prepared["views"]
        return forward(views.flatten(0, 1), prepared["tokens"], prepared.get("keep_idx"))

    def loss_from(self, outputs: Mapping[str, Tensor], prepared: Mapping[str, Tensor]) -> StepLoss:
        """InfoNCE (or SigLIP, ``loss.contrastive``) of the view against this rank's captions,
        gathered over ranks (+ the caption-word terms when the loss asks for them)."""
        bias = outputs.get("logit_bias")
        clip = contrastive_views(
            [outputs["image_emb"].float()],
            outputs["text_emb"].float(),
            outputs["logit_scale_exp"].float(),
            None if bias is None else bias.float(),
        )
        return self.with_word_terms(StepLoss(clip, {"clip": clip}), outputs, prepared["tokens"])

    def scalars(self, step: int) -> dict[str, float]:
        """The fraction of patch tokens each view keeps."""
        selector = self.selector
        kept = 1.0 if selector.keeps_all else selector.k / selector.num_patches
        return {"train/kept_fraction": kept}

    @classmethod
    def token_strategy(cls, cfg: Config) -> str:
        """The token strategy this method runs: CLIP ``none`` whatever ``mask.strategy`` says."""
        return cls.strategy

    @classmethod
    def cost(cls, cfg: Config, num_patches: int) -> Cost:
        """One view, all tokens (FLIP: ``mask.keep_ratio`` of them), no teacher, no NT-Xent."""
        strategy = cls.token_strategy(cfg)
        kept = None if strategy == "none" else num_keep(num_patches, cfg.mask.keep_ratio)
        kept = None if kept == num_patches else kept
        return Cost(num_views=1, kept=kept, teacher=False, simclr=False)


@register
class FLIP(CLIP):
    """CLIP encoding ``mask.keep_ratio`` of each view's patch tokens (random ones by default).

    The token strategy: ``mask.strategy`` when it names a registered strategy that needs no
    relevance (FLIP has no teacher) and drops tokens (not ``none``), e.g. ``gaussian`` (GLIP);
    otherwise ``random`` (FLIP proper). So the config default ``attentive``, which FLIP cannot
    run, and ``none`` give ``random``, and every FLIP run from before is unchanged.
    """

    name = "flip"
    strategy = "random"

    @classmethod
    def token_strategy(cls, cfg: Config) -> str:
        """``mask.strategy`` if relevance-free and token-dropping, else ``random``."""
        chosen = STRATEGIES.get(cfg.mask.strategy)
        if chosen is None or chosen.needs_relevance or chosen.keeps_every_token:
            return cls.strategy
        return chosen.name
