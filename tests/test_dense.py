"""Dense heads: each equals its formula written out with materialised q/k/v; CLIPer's fusion and
map combination equal the written steps; position-embedding interpolation equals timm's own
dynamic-size path; sliding windows reduce to one pass on a one-window image.

References below never call aclip.dense.heads: q/k/v come from the weights with explicit matmuls,
LayerNorms from their parameters, attention from written softmaxes.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from aclip.config import ModelConfig
from aclip.dense.heads import HEADS, DenseHead, DenseOutput, embed_tokens, fuse_attention
from aclip.dense.protocols import (
    cam_labels,
    cliper_maps,
    cliper_slide,
    slide_logits,
    window_boxes,
    window_logits,
)
from aclip.dense.settings import SegSettings
from aclip.interop import build_clip

ATOL = 1e-5


def small_clip(depth: int = 3, seed: int = 0, **vision: object) -> torch.nn.Module:
    """A small CLIP (timm ViT, 3 heads of 16, patch 8) with every parameter jittered."""
    kwargs = {"patch_size": 8, "depth": depth, "embed_dim": 48, "num_heads": 3, **vision}
    cfg = ModelConfig(
        vision_model="vit_tiny_patch16_224", image_size=32, vision_kwargs=kwargs, embed_dim=32,
        context_length=16, text_width=32, text_layers=1, text_heads=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    clip = build_clip(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return clip.eval()


def images(n: int = 2, h: int = 32, w: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- written-out references
def ln(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def qkv(blk, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, H, N, d] from the block's qkv weight by explicit matmuls."""
    heads = blk.attn.num_heads
    w, b = blk.attn.qkv.weight, blk.attn.qkv.bias
    dim = w.shape[1]
    out = []
    for i in range(3):
        y = h @ w[i * dim : (i + 1) * dim].T + b[i * dim : (i + 1) * dim]
        out.append(y.reshape(*h.shape[:2], heads, -1).transpose(1, 2))
    return tuple(out)


def softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    e = torch.exp(logits - logits.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def out_proj(blk, o_BHNd: torch.Tensor) -> torch.Tensor:
    o = o_BHNd.transpose(1, 2).reshape(o_BHNd.shape[0], o_BHNd.shape[2], -1)
    return o @ blk.attn.proj.weight.T + blk.attn.proj.bias


def ffn(blk, x: torch.Tensor) -> torch.Tensor:
    return x + blk.mlp(ln(x, blk.norm2))


def joint(clip, x_BND: torch.Tensor) -> torch.Tensor:
    emb = ln(x_BND, clip.visual.vit.norm) @ clip.image_proj.weight.T
    return F.normalize(emb[:, 1:], dim=-1)


def input_of_last(clip, x: torch.Tensor) -> torch.Tensor:
    vit = clip.visual.vit
    tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    for blk in vit.blocks[:-1]:
        tokens = blk(tokens)
    return tokens


def reference(head: str, clip, x: torch.Tensor) -> torch.Tensor:
    """Patch embeddings [B, N, E] of ``head`` from its formula."""
    vit = clip.visual.vit
    if head == "vanilla":  # timm's own forward (final norm included), the projection per token
        emb = vit.forward_features(x) @ clip.image_proj.weight.T
        return F.normalize(emb[:, 1:], dim=-1)
    z = input_of_last(clip, x)
    blk = vit.blocks[-1]
    h = ln(z, blk.norm1)
    q, k, v = qkv(blk, h)
    s = q.shape[-1] ** -0.5
    if head == "maskclip":
        return joint(clip, ffn(blk, z + out_proj(blk, v)))
    if head == "sclip":
        w = softmax_rows(q @ q.transpose(-1, -2) * s) + softmax_rows(k @ k.transpose(-1, -2) * s)
        return joint(clip, ffn(blk, z + out_proj(blk, w @ v)))
    if head == "clearclip":
        return joint(clip, out_proj(blk, softmax_rows(q @ q.transpose(-1, -2) * s) @ v))
    raise AssertionError(head)


def fuse_written(a: np.ndarray) -> np.ndarray:
    """CLIPer's steps on one [N, N] map with plain loops."""
    n = a.shape[0]
    a = a.astype(np.float64).copy()
    col = [sum(a[i, j] for i in range(n)) for j in range(n)]
    a = np.array([[a[i, j] / col[j] for j in range(n)] for i in range(n)])
    row = [sum(a[i, j] for j in range(n)) for i in range(n)]
    a = np.array([[a[i, j] / row[i] for j in range(n)] for i in range(n)])
    a = np.array([[(a[i, j] + a[j, i]) / 2 for j in range(n)] for i in range(n)])
    mean = [sum(a[i, j] for i in range(n)) / n for j in range(n)]
    a = np.array([[max(a[i, j] - mean[j], 0.0) for j in range(n)] for i in range(n)])
    row = [sum(a[i, j] for j in range(n)) for i in range(n)]
    return np.array([[a[i, j] / row[i] for j in range(n)] for i in range(n)])


def cliper_reference(clip, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer embeddings [L, B, N, E] and the affinity [B, N, N] from CLIPer's steps."""
    vit = clip.visual.vit
    z = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    inputs, maps = [], []
    for blk in vit.blocks[:-1]:
        h = ln(z, blk.norm1)
        inputs.append(h)
        q, k, v = qkv(blk, h)
        maps.append(softmax_rows(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5))
        z = ffn(blk, z + out_proj(blk, maps[-1] @ v))
    inputs.append(z)
    total = sum(maps)
    fused = torch.tensor(np.array([[fuse_written(m.numpy()) for m in per_image]
                                   for per_image in total]), dtype=torch.float32)  # fmt: skip
    last = vit.blocks[-1]
    embs = []
    for z_i in inputs:
        _, _, v = qkv(last, ln(z_i, last.norm1))
        embs.append(joint(clip, out_proj(last, fused @ v)))
    return torch.stack(embs), fused.mean(1)[:, 1:, 1:]


# ---------------------------------------------------------------- heads vs formulas
@pytest.mark.parametrize("head", ["vanilla", "maskclip", "sclip", "clearclip"])
def test_head_equals_its_formula(head) -> None:
    clip, x = small_clip(), images()
    with torch.no_grad():
        out = DenseHead(clip, head)(x)
        ref = reference(head, clip, x)
    assert out.emb_LBNE.shape == (1, 2, 16, 32) and out.grid_hw == (4, 4)
    torch.testing.assert_close(out.emb_LBNE[0], ref, rtol=0, atol=ATOL)


def test_heads_differ_from_each_other() -> None:
    clip, x = small_clip(), images()
    with torch.no_grad():
        outs = {h: DenseHead(clip, h)(x).emb_LBNE[-1] for h in HEADS}
    for a in HEADS:
        for b in HEADS:
            if a < b:
                assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)


def test_cliper_equals_its_steps() -> None:
    clip, x = small_clip(depth=4), images()
    with torch.no_grad():
        out = DenseHead(clip, "cliper")(x)
        ref_emb, ref_aff = cliper_reference(clip, x)
    assert out.emb_LBNE.shape == (4, 2, 16, 32) and out.selected == 3
    torch.testing.assert_close(out.emb_LBNE, ref_emb, rtol=0, atol=ATOL)
    torch.testing.assert_close(out.affinity_BNN, ref_aff, rtol=0, atol=ATOL)
    with torch.no_grad():
        only = DenseHead(clip, "cliper", select_layer=1, fuse_layers=False)(x)
    assert only.emb_LBNE.shape[0] == 1 and only.selected == 0
    torch.testing.assert_close(only.emb_LBNE[0], ref_emb[1], rtol=0, atol=ATOL)


def test_clearclip_has_no_residual_or_ffn_path() -> None:
    clip, x = small_clip(), images()
    zeroed = copy.deepcopy(clip)
    with torch.no_grad():
        for p in zeroed.visual.vit.blocks[-1].mlp.parameters():
            p.zero_()
        before = {h: DenseHead(clip, h)(x).emb_LBNE for h in HEADS}
        after = {h: DenseHead(zeroed, h)(x).emb_LBNE for h in HEADS}
    assert torch.equal(before["clearclip"], after["clearclip"])
    assert torch.equal(before["cliper"], after["cliper"])  # CLIPer's last block: no FFN either
    for head in ("vanilla", "maskclip", "sclip"):  # these keep the FFN: the test can fail
        assert (before[head] - after[head]).abs().max() > 1e-3, head
    # no residual: the output depends on the last block's input only through norm1, so a
    # shift along the all-ones direction (which LayerNorm removes) changes nothing
    vit = clip.visual.vit
    with torch.no_grad():
        z = input_of_last(clip, x)
        from aclip.dense.heads import last_block

        a = last_block("clearclip", vit.blocks[-1], z)
        b = last_block("clearclip", vit.blocks[-1], z + 3.0)
        shifted = last_block("maskclip", vit.blocks[-1], z + 3.0)
        c = shifted - last_block("maskclip", vit.blocks[-1], z)
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
    assert c.abs().max() > 1.0


def clearclip_row(head: str, clip, x: torch.Tensor) -> torch.Tensor:
    """ClearCLIP's ``model_type`` rows at ``ignore_residual=True`` (mc-lan/ClearCLIP
    open_clip/transformer.py: ``forward`` 524-526 keeps ``custom_attn(blk.attn, blk.ln_1(x))``
    alone; ``custom_attn`` 589-622 builds the weights), then ``ln_post`` and ``proj``."""
    z = input_of_last(clip, x)
    blk = clip.visual.vit.blocks[-1]
    q, k, v = qkv(blk, ln(z, blk.norm1))
    s = q.shape[-1] ** -0.5
    if head == "vanilla":
        w = softmax_rows(q @ k.transpose(-1, -2) * s)
    elif head == "maskclip":  # -inf off the diagonal, 0 on it, softmaxed
        n = q.shape[-2]
        mask = torch.full((n, n), float("-inf")).fill_diagonal_(0)
        w = softmax_rows(mask.expand(*q.shape[:2], n, n))
    else:  # SCLIP
        w = softmax_rows(q @ q.transpose(-1, -2) * s) + softmax_rows(k @ k.transpose(-1, -2) * s)
    return joint(clip, out_proj(blk, w @ v))


@pytest.mark.parametrize("head", ["vanilla", "maskclip", "sclip"])
def test_ignore_residual_is_clearclips_comparison_row(head) -> None:
    clip, x = small_clip(), images()
    zeroed = copy.deepcopy(clip)
    with torch.no_grad():
        for p in zeroed.visual.vit.blocks[-1].mlp.parameters():
            p.zero_()
        row = DenseHead(clip, head, ignore_residual=True)(x).emb_LBNE[0]
        ref = clearclip_row(head, clip, x)
        no_ffn = DenseHead(zeroed, head, ignore_residual=True)(x).emb_LBNE[0]
        official = DenseHead(clip, head)(x).emb_LBNE[0]
    torch.testing.assert_close(row, ref, rtol=0, atol=ATOL)
    assert torch.equal(row, no_ffn)  # no feed-forward path
    assert (official - row).abs().max() > 1e-3  # the default keeps residual and FFN


def test_ignore_residual_setting_reaches_the_head() -> None:
    from aclip.dense.segment import Segmenter
    from aclip.dense.settings import load_settings
    from aclip.tokenizer import Tokenizer

    s = load_settings(None, "maskclip", {"ignore_residual": True})
    seg = Segmenter(small_clip(), Tokenizer(16), ["background", "cat"], s, ["a photo of a {}."],
                    0, (0.5,) * 3, (0.25,) * 3)  # fmt: skip
    assert seg.head.ignore_residual and not load_settings(None, "maskclip").ignore_residual
    with pytest.raises(ValueError, match="ignore_residual must be true or false"):
        load_settings(None, "maskclip", {"ignore_residual": "yes"})


def test_heads_are_views_of_the_weights() -> None:
    clip = small_clip()
    head = DenseHead(clip, "clearclip")
    assert head.clip is clip
    x = images()
    with torch.no_grad():
        a = head(x).emb_LBNE
        clip.visual.vit.blocks[-1].attn.qkv.weight.mul_(1.5)  # the head sees the change
        b = head(x).emb_LBNE
    assert (a - b).abs().max() > 1e-3


# ---------------------------------------------------------------- CLIPer fusion
def test_cliper_fusion_on_a_hand_made_matrix() -> None:
    a = np.array([[4.0, 1.0, 1.0], [2.0, 5.0, 1.0], [1.0, 1.0, 6.0]])
    got = fuse_attention(torch.tensor(a)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(got, fuse_written(a), atol=1e-12)
    # the numbers by hand for the first row: column sums 7, 7, 8; ... (checked to 1e-6)
    assert got.shape == (3, 3) and np.allclose(got.sum(1), 1.0)
    assert np.all(got >= 0) and got[0, 0] > 0.9  # the diagonal dominates after the clamp


def test_cliper_fusion_row_left_empty_is_zero_not_nan() -> None:
    a = torch.ones(1, 1, 3, 3)  # uniform: every entry equals its column mean, all clamp to 0
    assert torch.equal(fuse_attention(a), torch.zeros(1, 1, 3, 3))


class FakeHead:
    """A head returning given per-layer embeddings and affinity (for the map combination)."""

    def __init__(self, emb_LBNE, affinity_BNN, grid, selected, patch=8):
        self.out = DenseOutput(emb_LBNE, grid, selected, affinity_BNN)
        self.patch_size = (patch, patch)

    def __call__(self, images_BCHW):
        return self.out


def test_cliper_map_combination_equals_written_steps() -> None:
    gen = torch.Generator().manual_seed(0)
    L, N, E = 3, 4, 5
    emb = F.normalize(torch.randn(L, 1, N, E, generator=gen), dim=-1)
    aff = torch.rand(1, N, N, generator=gen)
    fg, bg = torch.randn(2, E, generator=gen), torch.randn(2, E, generator=gen)
    s = SegSettings(head="cliper", logit_scale=10.0, attention_thr=0.4, slide_crop=0)
    got = cliper_maps(FakeHead(emb, aff, (2, 2), 2), torch.zeros(1, 3, 16, 16), fg, bg, s)
    text = F.normalize(torch.cat([fg, bg, fg.mean(0, keepdim=True)]), dim=-1)  # 5 queries
    probs = softmax_rows(10.0 * emb[:, 0] @ text.T)[..., :2]  # [L, N, 2]
    # cliper.code modified_clip/model.py:226-230: the selected layer is thresholded in place
    # (``seg_last`` is a view of ``seg``), so ``seg.mean(0)`` averages the thresholded map
    seg = probs.transpose(1, 2).clone()  # [L, 2, N]
    seg_last = seg[2]
    seg_last[seg_last < seg_last.amax(-1, keepdim=True) * 0.4] = 0
    want = seg_last @ aff[0] + seg.mean(0)
    assert (seg.mean(0) - probs.mean(0).T).abs().max() > 1e-2  # the threshold reaches the mean
    torch.testing.assert_close(got, want.reshape(2, 2, 2), rtol=0, atol=1e-6)


def test_cam_labels_follow_cam_to_label() -> None:
    cam = torch.tensor([[[0.9, 0.2], [0.1, 0.0]], [[0.3, 0.8], [0.05, 0.0]]])  # 2 classes
    # bkg_thd > 0: under it -> 0; nothing left -> background (0), else argmax + 1
    got = cam_labels(cam, torch.tensor([0.9, 0.8]), bkg_thd=0.25, score_thd=0.0, normalize=False)
    assert got.tolist() == [[1, 2], [0, 0]]
    # a class whose image score is under score_thd is off
    got = cam_labels(cam, torch.tensor([0.9, 0.1]), bkg_thd=0.25, score_thd=0.5, normalize=False)
    assert got.tolist() == [[1, 0], [0, 0]]
    # bkg_thd 0: background scores (1 - max)^2 against the classes
    got = cam_labels(cam, torch.tensor([0.9, 0.8]), bkg_thd=0.0, score_thd=0.0, normalize=False)
    assert got.tolist() == [[1, 2], [0, 0]]  # (1-.1)^2 = .81 > .1 ; (1-0)^2 = 1
    # normalize: min-max per class first (class 1 min 0 max .9 -> .2/.9 = .22 < .25)
    got = cam_labels(cam, torch.tensor([0.9, 0.8]), bkg_thd=0.25, score_thd=0.0, normalize=True)
    assert got.tolist() == [[1, 2], [0, 0]]


# ---------------------------------------------------------------- grids and windows
def test_embed_tokens_native_size_is_the_towers_own() -> None:
    clip, x = small_clip(), images()
    with torch.no_grad():
        ours, grid = embed_tokens(clip.visual.vit, x)
        theirs = clip.visual.embed(x)
    assert grid == (4, 4) and torch.equal(ours, theirs)


def test_other_grids_match_timms_dynamic_size_model() -> None:
    clip = small_clip()
    vit = clip.visual.vit
    peer = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
        depth=3, embed_dim=48, num_heads=3, dynamic_img_size=True,
    )  # fmt: skip
    peer.load_state_dict(vit.state_dict())
    peer.eval()
    x = images(1, 48, 72)
    with torch.no_grad():
        out = DenseHead(clip, "vanilla", pos_interp="timm")(x)
        ref = F.normalize(clip.image_proj(peer.forward_features(x))[:, 1:], dim=-1)
    assert out.grid_hw == (6, 9)
    torch.testing.assert_close(out.emb_LBNE[0], ref, rtol=0, atol=ATOL)


def official_pos_embed(mode: str, pos_MD: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A class + square-grid position embedding [1 + n, D] resampled to rows x cols as each
    official repository writes it."""
    n, dim = pos_MD.shape[0] - 1, pos_MD.shape[1]
    size = int(math.sqrt(n))
    first, grid = pos_MD[:1], pos_MD[1:]
    if mode == "clearclip":  # mc-lan/ClearCLIP open_clip/transformer.py:569-587 (= SCLIP's)
        w0, h0 = rows + 0.1, cols + 0.1
        out = F.interpolate(
            grid.reshape(1, size, size, dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)),
            mode="bicubic",
        )
        assert int(w0) == out.shape[-2] and int(h0) == out.shape[-1]
        return torch.cat((first, out.permute(0, 2, 3, 1).reshape(-1, dim)), dim=0)
    if mode == "maskclip":  # chongzhou96/MaskCLIP mmseg/models/backbones/vit.py:383-410
        weight = grid.reshape(1, size, size, dim).permute(0, 3, 1, 2)
        weight = F.interpolate(weight, size=(rows, cols), align_corners=False, mode="bicubic")
        return torch.cat((first, torch.flatten(weight, 2).transpose(1, 2)[0]), dim=0)
    # CLIPer: linsun449/cliper.code modified_clip/model.py:165-174 (upsample_pos_emb, in fp32)
    emb = grid.permute(1, 0).view(1, dim, size, size)
    emb = F.interpolate(emb, size=(rows, cols), mode="bilinear")
    return torch.cat([first, emb.view(dim, -1).contiguous().permute(1, 0)], 0)


def test_each_head_resamples_the_position_embedding_as_its_official_code() -> None:
    from aclip.dense.heads import resample_pos_embed

    clip = small_clip()
    vit = clip.visual.vit
    x = images(1, 48, 72)  # 6 x 9 patches; the tower's grid is 4 x 4
    expected = {"vanilla": "clearclip", "maskclip": "maskclip", "sclip": "clearclip",
                "clearclip": "clearclip", "cliper": "cliper"}  # fmt: skip
    with torch.no_grad():
        patches = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
        timm_pos = resample_pos_embed(vit.pos_embed, (6, 9), (4, 4), 1, "timm")[0]
        for head, mode in expected.items():
            dense = DenseHead(clip, head)
            assert dense.pos_interp == mode
            pos = official_pos_embed(mode, vit.pos_embed[0], 6, 9)
            assert (pos - timm_pos).abs().max() > 1e-4, mode  # the modes differ: can fail
            want = vit.norm_pre(torch.cat([vit.cls_token, patches], dim=1) + pos)
            got, grid = embed_tokens(vit, x, dense.pos_interp)
            assert grid == (6, 9)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            native, _ = embed_tokens(vit, images(), mode)  # the tower's grid: its own embedding
            assert torch.equal(native, clip.visual.embed(images()))
        got = DenseHead(clip, "cliper", pos_interp="timm")(x).emb_LBNE
        assert (got - DenseHead(clip, "cliper")(x).emb_LBNE).abs().max() > 1e-4
    with pytest.raises(ValueError, match="pos_interp"):
        DenseHead(clip, "clearclip", pos_interp="nearest")


def test_pos_interp_setting_reaches_the_head() -> None:
    from aclip.dense.segment import Segmenter
    from aclip.dense.settings import load_settings
    from aclip.tokenizer import Tokenizer

    def head_of(settings):
        return Segmenter(small_clip(), Tokenizer(16), ["background", "cat"], settings,
                         ["a photo of a {}."], 0, (0.5,) * 3, (0.25,) * 3).head  # fmt: skip

    assert head_of(load_settings(None, "cliper")).pos_interp == "cliper"
    assert head_of(load_settings(None, "cliper", {"pos_interp": "timm"})).pos_interp == "timm"
    with pytest.raises(ValueError, match="pos_interp: 'nearest' is not one of head, "):
        load_settings(None, "clearclip", {"pos_interp": "nearest"})


def test_window_boxes_are_mmsegs() -> None:
    # 448 x 597 (a 375 x 500 image at short side 448), window 448, stride 224: 1 x 2 windows
    assert window_boxes(448, 597, 448, 224) == [(0, 448, 0, 448), (0, 448, 149, 597)]
    # 100 x 100, window 64 / stride 32: (100 - 64 + 31) // 32 + 1 = 3 per side, the last one
    # flush with the border (starts 0, 32, 36)
    starts = [(0, 64), (32, 96), (36, 100)]
    assert window_boxes(100, 100, 64, 32) == [(y1, y2, x1, x2) for y1, y2 in starts
                                              for x1, x2 in starts]  # fmt: skip
    assert window_boxes(40, 50, 64, 32) == [(0, 40, 0, 50)]  # smaller than a window: whole
    assert window_boxes(40, 50, 0, 32) == [(0, 40, 0, 50)]


@pytest.mark.parametrize("head", HEADS[:4])
def test_one_window_slide_equals_one_pass(head) -> None:
    clip, x = small_clip(), images(1, 32, 32)
    text = F.normalize(torch.randn(5, 32, generator=torch.Generator().manual_seed(2)), dim=-1)
    dense = DenseHead(clip, head)
    with torch.no_grad():
        slid = slide_logits(dense, x, text, crop=32, stride=16)
        whole = slide_logits(dense, x, text, crop=0, stride=16)
        once = window_logits(dense, x, text)[0]
        emb = dense(x).emb_LBNE[0, 0]
    torch.testing.assert_close(slid, once, rtol=0, atol=0)
    torch.testing.assert_close(whole, once, rtol=0, atol=0)
    patch_maps = (emb @ text.T).T.reshape(5, 4, 4)
    want = F.interpolate(patch_maps[None], size=(32, 32), mode="bilinear")[0]
    torch.testing.assert_close(once, want, rtol=0, atol=ATOL)


def test_overlapping_windows_are_averaged() -> None:
    clip, x = small_clip(), images(1, 32, 48)
    text = F.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(2)), dim=-1)
    dense = DenseHead(clip, "clearclip")
    with torch.no_grad():
        slid = slide_logits(dense, x, text, crop=32, stride=8)
        wins = [window_logits(dense, x[..., :, a : a + 32], text)[0] for a in (0, 8, 16)]
    canvas, count = torch.zeros(3, 32, 48), torch.zeros(32, 48)
    for a, w in zip((0, 8, 16), wins, strict=True):
        canvas[:, :, a : a + 32] += w
        count[:, a : a + 32] += 1
    torch.testing.assert_close(slid, canvas / count, rtol=0, atol=1e-6)


def test_crop_not_divisible_by_patch_is_padded_and_cut() -> None:
    clip = small_clip()
    x = images(1, 30, 37)
    text = F.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(2)), dim=-1)
    dense = DenseHead(clip, "clearclip")
    with torch.no_grad():
        got = window_logits(dense, x, text)
        padded = F.pad(x, (1, 2, 1, 1))  # 37 -> 40: 1 left, 2 right; 30 -> 32: 1 top, 1 bottom
        full = window_logits(dense, padded, text)
    assert got.shape == (1, 3, 30, 37)
    torch.testing.assert_close(got, full[..., 1:31, 1:38], rtol=0, atol=0)


def test_cliper_one_window_slide_is_the_propagated_pass() -> None:
    clip, x = small_clip(depth=3), images(1, 32, 32)
    text = F.normalize(torch.randn(4, 32, generator=torch.Generator().manual_seed(2)), dim=-1)
    dense = DenseHead(clip, "cliper")
    s = SegSettings(head="cliper", slide_crop=32, slide_stride=16, logit_scale=20.0)
    with torch.no_grad():
        got = cliper_slide(dense, x, text, s)
        out = dense(x)
    logits = 20.0 * torch.einsum("lne,te->ltn", out.emb_LBNE[:, 0], text)
    attn = out.affinity_BNN[0] / (1 + 1e-5)
    attn = attn / attn.sum(-1, keepdim=True)
    torch.testing.assert_close(got, (logits @ attn).reshape(3, 4, 4, 4), rtol=0, atol=1e-5)


def test_bad_head_and_tower_are_refused() -> None:
    clip = small_clip()
    with pytest.raises(ValueError, match="unknown dense head"):
        DenseHead(clip, "gem")
    with pytest.raises(ValueError, match="select_layer"):
        DenseHead(clip, "cliper", select_layer=5)
    with pytest.raises(ValueError, match="needs >= 2"):
        DenseHead(small_clip(depth=1), "cliper")
    with pytest.raises(ValueError, match="multiple of the patch"):
        embed_tokens(clip.visual.vit, images(1, 30, 32))


def test_registers_and_layer_scale_towers_run() -> None:
    """A timm ViT with register tokens and layer scale (not CLIP architecture) still runs; the
    prefix tokens are dropped and the heads' formulas hold."""
    clip = small_clip(reg_tokens=2, init_values=0.5)
    x = images()
    with torch.no_grad():
        for head in HEADS:
            out = DenseHead(clip, head)(x)
            assert out.emb_LBNE.shape[-2:] == (16, 32) and torch.isfinite(out.emb_LBNE).all()
    assert clip.visual.vit.num_prefix_tokens == 3


def test_a_head_registered_from_a_new_file_runs_through_densehead() -> None:
    """A head is one registered HeadSpec: a new one (here: key-key attention, GEM-like, no
    residual) runs through DenseHead unchanged and equals its formula written out; a name taken
    twice is refused and an unknown one lists the registered heads."""
    from aclip.dense.heads import base, get_head, register_head
    from aclip.dense.tower import softmax_affinity

    spec = base.HeadSpec(
        "test_kk",
        pos_interp="clearclip",
        attention=lambda attn, q, k: softmax_affinity(k, k, attn.scale),
        residual=False,
    )
    register_head(spec)
    try:
        clip, x = small_clip(), images()
        with torch.no_grad():
            got = DenseHead(clip, "test_kk")(x).emb_LBNE[0]
            h = input_of_last(clip, x)
            blk = clip.visual.vit.blocks[-1]
            _, k, v = qkv(blk, ln(h, blk.norm1))
            out = out_proj(blk, softmax_rows(k @ k.transpose(-2, -1) * blk.attn.scale) @ v)
            want = joint(clip, out)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="registered twice"):
            register_head(spec)
        assert get_head("test_kk") is spec
    finally:
        base._HEADS.pop("test_kk")
    with pytest.raises(ValueError, match="vanilla, maskclip, sclip, clearclip, cliper"):
        DenseHead(small_clip(), "test_kk")
