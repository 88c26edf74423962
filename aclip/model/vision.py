"""Vision tower: a timm VisionTransformer with token keep and CLS-row attention relevance."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial
from typing import Any

import timm
import torch
from timm.layers import Attention, Format, PatchDropout
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

# Alpha-CLIP's alpha normalisation (official code, SunzeY/AlphaCLIP: Normalize(0.5, 0.26) on the
# mask in [0, 1]): foreground (1 - 0.5) / 0.26 = +1.923, background -1.923
ALPHA_MEAN, ALPHA_STD = 0.5, 0.26


def normalize_alpha(alpha: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """An alpha mask as the alpha conv takes it: uint8 [0, 255] (the loader's) or float [0, 1]
    -> (alpha - 0.5) / 0.26, in ``dtype``."""
    a = alpha.float() / 255.0 if alpha.dtype == torch.uint8 else alpha.float()
    return ((a - ALPHA_MEAN) / ALPHA_STD).to(dtype)


def gather_tokens(tokens_BND: Tensor, keep_idx_BK: Tensor) -> Tensor:
    """Rows ``keep_idx_BK`` of each sample's token sequence: [B, N, D] -> [B, K, D]."""
    if keep_idx_BK.dim() != 2 or keep_idx_BK.shape[0] != tokens_BND.shape[0]:
        raise ValueError(
            f"keep_idx_BK must be [B, K] with B={tokens_BND.shape[0]}, "
            f"got {tuple(keep_idx_BK.shape)}"
        )
    idx_BKD = keep_idx_BK.long().unsqueeze(-1).expand(-1, -1, tokens_BND.shape[-1])
    return torch.gather(tokens_BND, 1, idx_BKD)


class ConvStem(nn.Sequential):
    """A convolutional patch embedding (Xiao et al. 2021, "Early Convolutions Help Transformers
    See Better", arXiv 2106.14881): log2(patch) stride-2 3x3 convolutions with BatchNorm and
    ReLU, the channels doubling up to half the width, then a 1x1 convolution to the width. Same
    patch grid and output as the linear patch conv it replaces (``model.patch_stem: conv``); the
    paper's point, measured on the demo too (docs/recipe_study.md), is a ViT that optimises
    faster and learns local shape that a single linear patch projection learns slowly."""

    def __init__(self, patch_size: int, width: int, in_chans: int = 3) -> None:
        steps = patch_size.bit_length() - 1
        if patch_size < 2 or 2**steps != patch_size:
            raise ValueError(f"a conv stem needs a power-of-two patch size, got {patch_size}")
        layers: list[nn.Module] = []
        chans = in_chans
        for i in range(steps):
            out = max(width // 2 ** (steps - i), 8)
            layers += [nn.Conv2d(chans, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]  # fmt: skip
            chans = out
        layers.append(nn.Conv2d(chans, width, 1))
        super().__init__(*layers)


PATCH_STEMS = ("linear", "conv")


def _set_patch_stem(vit: VisionTransformer, stem: str) -> None:
    """Replace ``vit``'s linear patch conv by the stem named ``stem`` (``linear`` keeps it)."""
    if stem not in PATCH_STEMS:
        raise ValueError(f"patch_stem must be one of {PATCH_STEMS}, got {stem!r}")
    if stem == "conv":
        ph, pw = vit.patch_embed.patch_size
        if ph != pw:
            raise ValueError(f"a conv stem needs square patches, got {ph}x{pw}")
        vit.patch_embed.proj = ConvStem(ph, int(vit.embed_dim), vit.patch_embed.proj.in_channels)


class ImageSizeError(ValueError):
    """A tower's image size does not cut into whole patches (or is smaller than one patch)."""


def check_image_size(image_size: int, patch_hw: tuple[int, int]) -> None:
    """Refuse (ImageSizeError) an ``image_size`` smaller than one patch or not a multiple of the
    patch size: timm would build a grid of no patch, or one that drops the last pixels and then
    refuses every image of that size."""
    ph, pw = patch_hw
    if image_size < ph or image_size < pw:
        raise ImageSizeError(f"{image_size} is smaller than one patch ({ph}x{pw})")
    if image_size % ph or image_size % pw:
        raise ImageSizeError(f"{image_size} is not a multiple of the patch size {ph}x{pw}")


class _ClsAttentionProbe:
    """Accumulates the CLS query's softmax attention over the patch keys, block by block.

    Mechanism: forward hooks on each block's ``attn.q_norm`` and ``attn.k_norm``. timm's
    ``Attention.forward`` always calls them on q and k of shape [B, H, N, hd] right after the
    qkv projection (they are ``nn.Identity`` without qk-norm, and hooks still fire), so the hooks
    see exactly the q and k the block attends with, after any qk-norm. The q hook keeps only
    the CLS row; the k hook computes softmax(q_cls · Kᵀ · scale) over all N keys, a
    [B, H, 1, N] tensor, and adds its patch columns, averaged over heads, to a running sum. The
    block itself is untouched and keeps its fused SDPA path, so no N×N map is ever built. The
    hooks exist only inside the ``with`` block, work for the whole batch, with or without grad
    (the sum stays in the graph when grad is on), and are removed even if the forward raises.
    This is more robust than re-implementing timm's block forward: layer scale, drop path,
    qk-norm, register tokens and fused/unfused attention all stay timm's own code.
    """

    def __init__(self, blocks: nn.Sequential, num_prefix_tokens: int) -> None:
        for i, blk in enumerate(blocks):
            if not isinstance(getattr(blk, "attn", None), Attention):
                raise TypeError(
                    f"block {i} has no timm.layers.Attention 'attn'; relevance needs one "
                    f"(got {type(getattr(blk, 'attn', None)).__name__})"
                )
        self.blocks = blocks
        self.num_prefix_tokens = num_prefix_tokens
        self.sum_BN: Tensor | None = None
        self.num_layers = 0
        self._q_cls: dict[int, Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> _ClsAttentionProbe:
        for i, blk in enumerate(self.blocks):
            attn = blk.attn
            self._handles.append(attn.q_norm.register_forward_hook(partial(self._on_q, i)))
            self._handles.append(
                attn.k_norm.register_forward_hook(partial(self._on_k, i, float(attn.scale)))
            )
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._q_cls.clear()

    def _on_q(self, layer: int, _module: nn.Module, _args: tuple, q_BHNd: Tensor) -> None:
        self._q_cls[layer] = q_BHNd[:, :, :1]

    def _on_k(
        self, layer: int, scale: float, _module: nn.Module, _args: tuple, k_BHNd: Tensor
    ) -> None:
        q_BH1d = self._q_cls.pop(layer).float()
        with torch.autocast(k_BHNd.device.type, enabled=False):  # float32 logits and softmax
            logits_BH1N = torch.matmul(q_BH1d, k_BHNd.float().transpose(-2, -1)) * scale
            probs_BHN = logits_BH1N.softmax(dim=-1)[:, :, 0]
        patch_BN = probs_BHN[:, :, self.num_prefix_tokens :].mean(dim=1)
        self.sum_BN = patch_BN if self.sum_BN is None else self.sum_BN + patch_BN
        self.num_layers += 1

    def relevance(self) -> Tensor:
        """Mean over the recorded layers (and heads): [B, num_patches], float32."""
        if self.sum_BN is None:
            raise RuntimeError("no attention was recorded")
        return self.sum_BN / self.num_layers


@contextlib.contextmanager
def _dynamic_img_size(vit: VisionTransformer) -> Iterator[None]:
    """timm's own variable-input-size path for the passes inside the block: the attributes a
    ``VisionTransformer(dynamic_img_size=True)`` is built with (no strict size check, NHWC
    patch grid, ``_pos_embed`` resampling ``pos_embed`` with ``resample_abs_pos_embed``,
    bicubic, on the fly), restored on exit. The weights keep their shapes."""
    embed = vit.patch_embed
    saved = (vit.dynamic_img_size, embed.strict_img_size, embed.flatten, embed.output_fmt)
    vit.dynamic_img_size, embed.strict_img_size = True, False
    embed.flatten, embed.output_fmt = False, Format.NHWC
    try:
        yield
    finally:
        vit.dynamic_img_size, embed.strict_img_size, embed.flatten, embed.output_fmt = saved


class VisionTower(nn.Module):
    """A timm ViT that can encode a subset of patch tokens and report CLS→patch relevance.

    Token keep follows A-CLIP: patch-embed, add the positional embedding (timm's ``_pos_embed``
    also prepends CLS/register tokens), then gather the kept patches, so each kept token keeps
    its own position. The pooled output is timm's own head path (``norm``, ``pool``,
    ``fc_norm``; the CLS token for the standard ``global_pool='token'``), without classifier.
    timm's random PatchDropout is refused: token dropping is what ``keep_idx_BK`` is for.

    With ``alpha_channel`` (Alpha-CLIP) a bias-free ``Conv2d(1, width, patch, patch)``,
    ``alpha_conv``, initialised to zero, maps the normalised alpha mask (:func:`normalize_alpha`)
    to one vector per patch, added to the RGB patch embedding before the position embedding
    (as the official code adds ``conv1_alpha(alpha)`` to ``conv1(x)``), so token keeping works
    on top. No alpha means an all-ones mask; a zero alpha conv leaves the base model exactly.
    """

    def __init__(
        self,
        model_name: str,
        image_size: int,
        model_kwargs: dict | None = None,
        freeze_patch_embed: bool = False,
        alpha_channel: bool = False,
        patch_stem: str = "linear",
    ) -> None:
        super().__init__()
        vit = timm.create_model(
            model_name,
            pretrained=False,
            num_classes=0,
            img_size=image_size,
            **dict(model_kwargs or {}),
        )
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"{model_name} is a {type(vit).__name__}, not a timm VisionTransformer")
        if isinstance(vit.patch_drop, PatchDropout):
            raise ValueError("patch_drop_rate > 0 is not supported: select tokens with keep_idx_BK")
        check_image_size(image_size, tuple(vit.patch_embed.patch_size))
        _set_patch_stem(vit, patch_stem)
        self.vit = vit
        self.width: int = int(vit.embed_dim)
        grid = vit.patch_embed.grid_size
        self.grid_hw: tuple[int, int] = (int(grid[0]), int(grid[1]))
        self.num_patches: int = self.grid_hw[0] * self.grid_hw[1]
        self.num_prefix_tokens: int = int(vit.num_prefix_tokens)
        if freeze_patch_embed:
            for param in vit.patch_embed.parameters():
                param.requires_grad_(False)
        self.alpha_conv: nn.Conv2d | None = _alpha_conv(vit) if alpha_channel else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them
        (timm's ``checkpoint_seq``); only passes with grad enabled are affected."""
        self.vit.set_grad_checkpointing(enable)

    @property
    def grad_checkpointing(self) -> bool:
        """Whether block activations are recomputed in the backward pass."""
        return bool(self.vit.grad_checkpointing)

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid of an input of ``height`` x ``width`` pixels (a multiple of the patch
        size; ValueError otherwise)."""
        ph, pw = self.vit.patch_embed.patch_size
        if height % ph or width % pw:
            raise ValueError(
                f"input {height}x{width} is not a multiple of the patch size {ph}x{pw}"
            )
        return height // ph, width // pw

    @property
    def blocks(self) -> nn.Sequential:
        """The timm ViT's transformer blocks (``self.vit.blocks``)."""
        return self.vit.blocks

    def patch_embed(
        self, images_BCHW: Tensor, alpha_B1HW: Tensor | None = None, use_alpha: bool = True
    ) -> Tensor:
        """Patch embeddings [B, num_patches, width]: the RGB patch conv, plus the alpha conv of
        the normalised alpha (all ones if None) when the tower has one and ``use_alpha``."""
        tokens_BND = self.vit.patch_embed(images_BCHW)
        if self.alpha_conv is None or not use_alpha:
            if alpha_B1HW is not None and use_alpha:
                raise ValueError("this vision tower has no alpha channel (model.alpha_channel)")
            return tokens_BND
        if alpha_B1HW is None:
            b, _, h, w = images_BCHW.shape
            alpha_B1HW = images_BCHW.new_full((b, 1, h, w), (1.0 - ALPHA_MEAN) / ALPHA_STD)
        alpha_BDhw = self.alpha_conv(alpha_B1HW.to(self.alpha_conv.weight.dtype))
        return tokens_BND + alpha_BDhw.flatten(2).transpose(1, 2).to(tokens_BND.dtype)

    def embed(
        self,
        images_BCHW: Tensor,
        keep_idx_BK: Tensor | None = None,
        alpha_B1HW: Tensor | None = None,
        use_alpha: bool = True,
    ) -> Tensor:
        """Token sequence entering the blocks: [B, prefix + K, width] (K = all patches if None).

        An input of another size than the tower's (a multiple of the patch size) is embedded on
        its own grid with the position embedding resampled on the fly (timm's dynamic-size path,
        ``resample_abs_pos_embed``): e.g. the EMA teacher at a lower resolution
        (``ema.image_size``). ``keep_idx_BK`` then indexes that grid. An alpha tower's alpha
        input is taken at the tower's own size only.
        """
        if self.grid_for(*images_BCHW.shape[-2:]) == self.grid_hw:
            tokens_BND = self.vit._pos_embed(self.patch_embed(images_BCHW, alpha_B1HW, use_alpha))
        elif self.alpha_conv is not None and use_alpha:
            raise ValueError(f"an alpha tower takes images on its own grid {self.grid_hw} only")
        else:
            with _dynamic_img_size(self.vit):
                tokens_BND = self.vit._pos_embed(self.vit.patch_embed(images_BCHW))
        if keep_idx_BK is not None:
            prefix = self.num_prefix_tokens
            kept_BKD = gather_tokens(tokens_BND[:, prefix:], keep_idx_BK)
            tokens_BND = torch.cat([tokens_BND[:, :prefix], kept_BKD], dim=1)
        return self.vit.norm_pre(tokens_BND)

    def _run_blocks(self, tokens_BND: Tensor) -> Tensor:
        if self.vit.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint_seq(self.vit.blocks, tokens_BND)
        return self.vit.blocks(tokens_BND)

    def _pool(self, tokens_BND: Tensor) -> Tensor:
        return self.vit.forward_head(self.vit.norm(tokens_BND), pre_logits=True)

    def forward(
        self,
        images_BCHW: Tensor,
        keep_idx_BK: Tensor | None = None,
        alpha_B1HW: Tensor | None = None,
        use_alpha: bool = True,
    ) -> Tensor:
        """Pooled features [B, width] of the images, encoding only ``keep_idx_BK`` patches.

        ``keep_idx_BK`` holds patch indices in [0, num_patches), row-major over ``grid_hw``;
        prefix (CLS/register) tokens are always kept, first. None encodes all patches.
        ``alpha_B1HW`` is the normalised alpha mask of an alpha tower (see :meth:`patch_embed`);
        ``use_alpha=False`` leaves the alpha conv out (the RGB path alone).
        """
        tokens_BND = self.embed(images_BCHW, keep_idx_BK, alpha_B1HW, use_alpha)
        return self._pool(self._run_blocks(tokens_BND))

    def forward_with_relevance(self, images_BCHW: Tensor) -> tuple[Tensor, Tensor]:
        """Pooled features [B, width] with all tokens, and relevance [B, h * w] on the input's
        patch grid (``grid_for``; ``grid_hw`` at the tower's own size).

        Relevance of a patch = softmax attention from the CLS query to that patch (softmax over
        all keys, prefix tokens included), averaged over all layers and heads, in float32. See
        ``_ClsAttentionProbe`` for how it is obtained without N×N attention maps.
        """
        if not self.vit.has_class_token:
            raise ValueError("relevance needs a class token (class_token=False in this ViT)")
        tokens_BND = self.embed(images_BCHW)
        with _ClsAttentionProbe(self.vit.blocks, self.num_prefix_tokens) as probe:
            tokens_BND = self.vit.blocks(tokens_BND)
        return self._pool(tokens_BND), probe.relevance()


def _alpha_conv(vit: VisionTransformer) -> nn.Conv2d:
    """Alpha-CLIP's ``Conv2d(1, width, patch, patch, bias=False)`` for ``vit``'s patch grid,
    zero-initialised (official code: ``conv1_alpha``, zeros when the weights have none). Made
    with ``skip_init``, so it draws nothing from the RNG: the rest of the model is initialised
    as without it."""
    patch_embed = vit.patch_embed
    if not isinstance(patch_embed.norm, nn.Identity):
        raise ValueError(
            "alpha_channel needs a patch embedding without a norm (the alpha conv is added to "
            f"the patch conv's output); this ViT's is {type(patch_embed.norm).__name__}"
        )
    patch = tuple(patch_embed.patch_size)
    conv = nn.utils.skip_init(
        nn.Conv2d, 1, int(vit.embed_dim), kernel_size=patch, stride=patch, bias=False
    )
    nn.init.zeros_(conv.weight)
    return conv
