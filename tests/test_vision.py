"""VisionTower: token keep, pooled output vs timm, CLS-row relevance vs materialised attention."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from aclip.model.vision import VisionTower, gather_tokens

TINY = {"patch_size": 8, "depth": 3, "embed_dim": 48, "num_heads": 3}
IMAGE_SIZE = 32  # 4x4 grid, 16 patches

VARIANTS = {
    "plain": {},
    "qknorm_reg": {"qk_norm": True, "reg_tokens": 2, "init_values": 0.1},
    "no_embed_class_avg": {"no_embed_class": True, "global_pool": "avg", "pre_norm": True},
    # the CLIP architecture open_clip can express (pre-norm, no patch-embed bias), at demo size
    "clip_arch": {"model": "vit_base_patch16_clip_224"},
}


def make_tower(seed: int = 0, model: str = "vit_tiny_patch16_224", **extra) -> VisionTower:
    torch.manual_seed(seed)
    tower = VisionTower(model, IMAGE_SIZE, {**TINY, **extra}).eval()
    with torch.no_grad():  # random cls/reg tokens (timm inits them ~0) so prefixes matter
        for name in ("cls_token", "reg_token"):
            param = getattr(tower.vit, name)
            if param is not None:
                param.normal_(std=0.5)
    return tower


def images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(
        batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed)
    )


def reference_relevance(tower: VisionTower, x: torch.Tensor) -> torch.Tensor:
    """CLS->patch attention from fully materialised [B, H, N, N] maps, mean over layers/heads."""
    vit, prefix = tower.vit, tower.num_prefix_tokens
    tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    maps = []
    for blk in vit.blocks:
        attn = blk.attn
        b, n, c = tokens.shape
        qkv = attn.qkv(blk.norm1(tokens)).reshape(b, n, 3, attn.num_heads, attn.head_dim)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        full_BHNN = torch.softmax((q @ k.transpose(-2, -1)) * attn.scale, dim=-1)
        maps.append(full_BHNN[:, :, 0, prefix:])
        tokens = blk(tokens)
    return torch.stack(maps).mean(dim=(0, 2))


def test_demo_geometry() -> None:
    tower = VisionTower("vit_tiny_patch16_224", 64, {"patch_size": 8, "depth": 4})
    assert tower.grid_hw == (8, 8)
    assert tower.num_patches == 64
    assert tower.num_prefix_tokens == 1
    assert tower.width == 192
    assert len(tower.vit.blocks) == 4
    assert tower.blocks is tower.vit.blocks
    assert tower.vit.dynamic_img_size is False
    out = tower(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 192)


def test_clip_architecture_at_demo_size() -> None:
    tower = VisionTower("vit_base_patch16_clip_224", 64, {"patch_size": 8, "depth": 4,
                        "embed_dim": 128, "num_heads": 4})  # fmt: skip
    assert isinstance(tower.vit.norm_pre, torch.nn.LayerNorm)  # CLIP's ln_pre
    assert tower.vit.patch_embed.proj.bias is None  # CLIP's conv1 has no bias
    assert (tower.grid_hw, tower.width, len(tower.blocks)) == ((8, 8), 128, 4)
    assert tower.num_prefix_tokens == 1 and tower.vit.global_pool == "token"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pooled_matches_timm(variant: str) -> None:
    tower = make_tower(**VARIANTS[variant])
    x = images()
    with torch.no_grad():
        ref = tower.vit.forward_head(tower.vit.forward_features(x), pre_logits=True)
        pooled = tower(x)
        pooled_rel, _ = tower.forward_with_relevance(x)
    assert pooled.shape == (3, 48)
    torch.testing.assert_close(pooled, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled_rel, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(tower.vit(x), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_relevance_matches_materialised_attention(variant: str) -> None:
    tower = make_tower(**VARIANTS[variant])
    assert all(blk.attn.fused_attn for blk in tower.vit.blocks)  # the fused path is under test
    x = images()
    with torch.no_grad():
        _, relevance = tower.forward_with_relevance(x)
        ref = reference_relevance(tower, x)
    assert relevance.shape == (3, tower.num_patches)
    assert relevance.dtype == torch.float32
    torch.testing.assert_close(relevance, ref, rtol=0, atol=1e-5)
    row_sums = relevance.sum(dim=1)
    assert (relevance > 0).all()
    assert (row_sums <= 1).all() and (row_sums > 0).all()
    # the samples differ, so must their relevance maps (batch handled per sample)
    assert not torch.allclose(relevance[0], relevance[1])


def test_relevance_under_bf16_autocast_is_float32() -> None:
    tower = make_tower()
    x = images()
    with torch.no_grad():
        ref = reference_relevance(tower, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pooled, relevance = tower.forward_with_relevance(x)
    assert relevance.dtype == torch.float32
    torch.testing.assert_close(relevance, ref, rtol=0, atol=1e-4)  # bf16 logits: ~3e-4 off


def test_relevance_per_sample_equals_batched() -> None:
    tower = make_tower(qk_norm=True)
    x = images(batch=4)
    with torch.no_grad():
        _, batched = tower.forward_with_relevance(x)
        single = torch.cat([tower.forward_with_relevance(x[i : i + 1])[1] for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-6)


def test_relevance_with_grad_and_hooks_removed() -> None:
    tower = make_tower()
    tower.train()
    x = images()
    pooled, relevance = tower.forward_with_relevance(x)
    assert relevance.requires_grad
    (pooled.sum() + relevance.sum()).backward()
    assert tower.vit.blocks[0].attn.qkv.weight.grad is not None
    for blk in tower.vit.blocks:
        assert not blk.attn.q_norm._forward_hooks
        assert not blk.attn.k_norm._forward_hooks


def test_hooks_removed_on_error() -> None:
    tower = make_tower()
    with pytest.raises(RuntimeError):
        tower.forward_with_relevance(torch.randn(2, 5, IMAGE_SIZE, IMAGE_SIZE))
    for blk in tower.vit.blocks:
        assert not blk.attn.q_norm._forward_hooks
        assert not blk.attn.k_norm._forward_hooks


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def test_relevance_never_materialises_nxn() -> None:
    tower = make_tower()
    x = images(batch=2)
    n = tower.num_prefix_tokens + tower.num_patches
    with torch.no_grad(), _ShapeRecorder() as rec:
        tower.forward_with_relevance(x)
    nxn = [(op, s) for op, s in rec.shapes if len(s) >= 2 and s[-2:] == (n, n)]
    assert not nxn, nxn
    assert any(s == (2, 3, 1, n) for _, s in rec.shapes)  # the CLS-row logits are built


def test_gather_tokens() -> None:
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    idx = torch.tensor([[4, 0], [1, 3]])
    out = gather_tokens(tokens, idx)
    assert torch.equal(out[0], tokens[0, [4, 0]])
    assert torch.equal(out[1], tokens[1, [1, 3]])
    with pytest.raises(ValueError):
        gather_tokens(tokens, idx[0])


def _random_keep(batch: int, num_patches: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack(
        [torch.randperm(num_patches, generator=gen)[:k].sort().values for _ in range(batch)]
    )


@pytest.mark.parametrize("variant", ["plain", "qknorm_reg"])
def test_embed_keeps_right_tokens(variant: str) -> None:
    tower = make_tower(**VARIANTS[variant])
    vit, prefix = tower.vit, tower.num_prefix_tokens
    x = images()
    keep = _random_keep(3, tower.num_patches, 6)
    with torch.no_grad():
        full = vit._pos_embed(vit.patch_embed(x))
        kept = tower.embed(x, keep)
    assert kept.shape == (3, prefix + 6, 48)
    for b in range(3):
        rows = torch.cat([torch.arange(prefix), prefix + keep[b]])
        torch.testing.assert_close(kept[b], full[b, rows], rtol=0, atol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_keep_all_equals_none(variant: str) -> None:
    tower = make_tower(**VARIANTS[variant])
    x = images()
    all_idx = torch.arange(tower.num_patches).expand(3, -1)
    with torch.no_grad():
        torch.testing.assert_close(tower(x, all_idx), tower(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_subset_equals_manual_timm_blocks(variant: str) -> None:
    tower = make_tower(**VARIANTS[variant])
    vit, prefix = tower.vit, tower.num_prefix_tokens
    x = images()
    keep = _random_keep(3, tower.num_patches, 5, seed=3)
    with torch.no_grad():
        full = vit._pos_embed(vit.patch_embed(x))
        manual = torch.stack(
            [torch.cat([full[b, :prefix], full[b, prefix + keep[b]]]) for b in range(3)]
        )
        manual = vit.norm(vit.blocks(vit.norm_pre(manual)))
        ref = vit.forward_head(manual, pre_logits=True)
        out = tower(x, keep)
        out_all = tower(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert not torch.allclose(out, out_all, atol=1e-3)  # dropping tokens changes the output


def test_keep_order_matters_only_through_positions() -> None:
    # permuting kept indices permutes tokens; with CLS pooling and no causal mask the pooled
    # output is permutation invariant over patch tokens
    tower = make_tower()
    x = images()
    keep = _random_keep(3, tower.num_patches, 7, seed=5)
    with torch.no_grad():
        a = tower(x, keep)
        b = tower(x, keep.flip(1))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_freeze_patch_embed() -> None:
    tower = VisionTower("vit_tiny_patch16_224", IMAGE_SIZE, TINY, freeze_patch_embed=True)
    for name, param in tower.named_parameters():
        assert param.requires_grad == (not name.startswith("vit.patch_embed.")), name
    assert any(n.startswith("vit.patch_embed.") for n, _ in tower.named_parameters())
    unfrozen = VisionTower("vit_tiny_patch16_224", IMAGE_SIZE, TINY)
    assert all(p.requires_grad for p in unfrozen.parameters())


def test_refuses_patch_dropout_and_non_vit() -> None:
    with pytest.raises(ValueError):
        VisionTower("vit_tiny_patch16_224", IMAGE_SIZE, {**TINY, "patch_drop_rate": 0.5})
    with pytest.raises(TypeError):
        VisionTower("resnet18", IMAGE_SIZE)


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    keep = torch.tensor([[0, 3, 5, 9, 12], [1, 2, 7, 8, 15], [4, 6, 10, 11, 14]])
    grads = []
    for recompute in (False, True):
        tower = make_tower(seed=3)
        tower.train()
        tower.set_grad_checkpointing(recompute)
        assert tower.grad_checkpointing is recompute
        tower(images(), keep).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in tower.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_conv_stem_keeps_the_grid_and_the_token_path() -> None:
    """model.patch_stem=conv: stride-2 3x3 convs (BN, ReLU) then 1x1, one token per patch as
    the linear stem; token keep gathers the same rows of the embedded sequence."""
    from aclip.model.vision import ConvStem

    torch.manual_seed(0)
    tower = VisionTower("vit_tiny_patch16_224", IMAGE_SIZE, TINY, patch_stem="conv").eval()
    stem = tower.vit.patch_embed.proj
    assert isinstance(stem, ConvStem)
    convs = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 3 + [(1, 1)]  # 8 = 2^3
    assert [c.out_channels for c in convs] == [8, 12, 24, 48]  # at least 8 channels
    x = images()
    tokens = tower.embed(x)
    assert tokens.shape == (3, 1 + 16, 48) and tower.grid_hw == (4, 4)
    feats = stem(x).flatten(2).transpose(1, 2)  # the stem's own output, one row per patch
    expect = feats + tower.vit.pos_embed[:, 1:]
    torch.testing.assert_close(tokens[:, 1:], expect, rtol=0, atol=1e-6)
    keep = _random_keep(3, 16, 5, seed=2)
    torch.testing.assert_close(tower.embed(x, keep)[:, 1:], gather_tokens(expect, keep))
    with pytest.raises(ValueError, match="power-of-two"):
        VisionTower("vit_tiny_patch16_224", 36, {**TINY, "patch_size": 6}, patch_stem="conv")
    with pytest.raises(ValueError, match="patch_stem"):
        VisionTower("vit_tiny_patch16_224", IMAGE_SIZE, TINY, patch_stem="resnet")


def test_conv_stem_with_an_alpha_channel_is_the_base_model() -> None:
    torch.manual_seed(0)
    base = VisionTower("vit_tiny_patch16_224", IMAGE_SIZE, TINY, patch_stem="conv").eval()
    torch.manual_seed(0)
    alpha = VisionTower("vit_tiny_patch16_224", IMAGE_SIZE, TINY, patch_stem="conv",
                        alpha_channel=True).eval()  # fmt: skip
    assert alpha.alpha_conv is not None and alpha.alpha_conv.stride == (8, 8)
    x, mask = images(), torch.rand(3, 1, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert torch.equal(base(x), alpha(x, alpha_B1HW=mask))


def test_conv_stem_flops_and_export_refusal() -> None:
    """The analytic patch-embedding FLOPs of a conv stem equal FlopCounterMode's count of the
    stem's convolutions, and exports that rebuild the ViT's own patch conv refuse it."""
    from torch.utils.flop_counter import FlopCounterMode

    from aclip.interop import NotExpressible, clip_vision_problems, to_timm_model
    from aclip.methods.flops import ViTDims
    from aclip.model.clip import CLIP
    from aclip.model.text import TextTransformer

    tower = VisionTower("vit_base_patch16_clip_224", IMAGE_SIZE, TINY, patch_stem="conv")
    with FlopCounterMode(display=False) as counter:
        tower.vit.patch_embed.proj(images(1))
    assert 2 * tower.num_patches * ViTDims.of(tower).patch_embed_macs == counter.get_total_flops()
    linear = VisionTower("vit_tiny_patch16_224", IMAGE_SIZE, TINY)
    assert ViTDims.of(linear).patch_embed_macs == 3 * 8 * 8 * 48  # in * kh * kw * width
    assert any("patch_stem=conv" in p for p in clip_vision_problems(tower.vit))
    clip = CLIP(tower, TextTransformer(context_length=8, vocab_size=64, width=32, layers=1,
                                       heads=2), 16)  # fmt: skip
    with pytest.raises(NotExpressible, match="patch_stem=conv"):
        to_timm_model(clip)
