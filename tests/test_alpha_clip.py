"""Alpha-CLIP (issue 14): the alpha conv, region masks and their views, the method's frozen parts
and fixed temperature through the unchanged trainer, label-smoothed InfoNCE, per-group learning
rates, region zero-shot rows and readers, synthetic region data, interop refusals."""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import CLIP_QUICKGELU_TINY_ARGS, TINY_MODEL, tiny_config
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.transforms import functional as TF

from aclip.config import ConfigError, load_config
from aclip.data.regions import RegionViews, decode_region, rle_of, sample_regions
from aclip.data.skips import BadSample
from aclip.data.transform import SampleTransform
from aclip.data.views import ACLIPViews
from aclip.methods.losses import clip_infonce
from aclip.model import build_clip, normalize_alpha
from aclip.train.optim import build_optimizer, build_scheduler, lr_factor

LN100 = torch.tensor(math.log(100.0), dtype=torch.float32)


def _model_cfg(**kw):
    cfg = load_config(None, [f"{k}={v}" for k, v in TINY_MODEL.items()])
    return replace(cfg.model, **kw)


def _random_alpha(b, size, seed):
    g = torch.Generator().manual_seed(seed)
    return normalize_alpha(
        torch.randint(0, 256, (b, 1, size, size), dtype=torch.uint8, generator=g)
    )


# ----------------------------------------------------------------------------- model
def test_zero_alpha_conv_is_the_base_model_bit_for_bit():
    torch.manual_seed(0)
    base = build_clip(_model_cfg()).eval()
    torch.manual_seed(0)
    alpha_model = build_clip(_model_cfg(alpha_channel=True)).eval()
    # the alpha conv draws nothing from the RNG: every other weight is the base model's
    extra = set(alpha_model.state_dict()) - set(base.state_dict())
    assert extra == {"visual.alpha_conv.weight"}
    for key, value in base.state_dict().items():
        assert torch.equal(value, alpha_model.state_dict()[key]), key
    assert torch.count_nonzero(alpha_model.visual.alpha_conv.weight) == 0
    assert alpha_model.visual.alpha_conv.bias is None
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    want = base.encode_image(images)
    for alpha in (_random_alpha(3, 32, 2), None, torch.full((3, 1, 32, 32), -1.923)):
        assert torch.equal(alpha_model.encode_image(images, alpha=alpha), want)
    keep = torch.tensor([[0, 3, 5], [1, 2, 15], [4, 8, 9]])
    assert torch.equal(
        alpha_model.encode_image(images, keep, alpha=_random_alpha(3, 32, 3)),
        base.encode_image(images, keep),
    )


def test_alpha_conv_is_added_before_the_position_embedding():
    torch.manual_seed(0)
    model = build_clip(_model_cfg(alpha_channel=True)).eval()
    visual = model.visual
    with torch.no_grad():
        visual.alpha_conv.weight.normal_()
    images, alpha = torch.randn(2, 3, 32, 32), _random_alpha(2, 32, 4)
    conv_BDhw = F.conv2d(alpha, visual.alpha_conv.weight, stride=8)
    want = visual.vit.patch_embed(images) + conv_BDhw.flatten(2).transpose(1, 2)
    want = visual.vit.norm_pre(visual.vit._pos_embed(want))
    assert torch.allclose(visual.embed(images, None, alpha), want, atol=1e-6)
    # no alpha = all ones; use_alpha=False = the RGB path alone
    ones = torch.full((2, 1, 32, 32), (1 - 0.5) / 0.26)
    assert torch.equal(visual(images), visual(images, None, ones))
    assert not torch.allclose(visual(images), visual(images, None, alpha))
    rgb = visual.vit.norm_pre(visual.vit._pos_embed(visual.vit.patch_embed(images)))
    assert torch.equal(visual.embed(images, use_alpha=False), rgb)
    with pytest.raises(ValueError, match="no alpha channel"):
        build_clip(_model_cfg()).visual(images, None, alpha)


def test_alpha_normalisation_values_match_torchvision():
    mask = np.array([[0, 255], [128, 255]], dtype=np.uint8)
    ours = normalize_alpha(torch.from_numpy(mask)[None])
    peer = TF.normalize(TF.to_tensor(mask), [0.5], [0.26])  # the official mask_transform's ops
    assert torch.allclose(ours, peer, atol=1e-6)
    assert ours[0, 0, 1].item() == pytest.approx(1.923077, abs=1e-5)
    assert ours[0, 0, 0].item() == pytest.approx(-1.923077, abs=1e-5)
    assert torch.equal(normalize_alpha(torch.tensor([1.0, 0.0])), ours[0, [0, 0], [1, 0]])


# ----------------------------------------------------------------------------- masks and views
def _image_with_its_mask(w=90, h=60, seed=0):
    """An RGB image whose red channel is the mask (0/255) and the mask itself."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[10:45, 20:70] = 255
    mask[rng.random((h, w)) < 0.1] = 255
    pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    pixels[..., 0] = mask
    return Image.fromarray(pixels), mask


@pytest.mark.parametrize("view", ["pad", "crop"])
def test_mask_follows_the_image_crop_exactly(view):
    img, mask = _image_with_its_mask()
    views = RegionViews(32, view=view, scale=(0.3, 1.0))
    for seed in range(5):
        torch.manual_seed(seed)
        out = views._views(img, torch.from_numpy(mask))
        assert out["views"].shape == (1, 3, 32, 32) and out["alpha"].shape == (1, 1, 32, 32)
        assert torch.equal(out["views"][:, 0], out["alpha"][:, 0])  # red channel == mask
    if view == "pad":  # 90x60 padded by 15 rows above and below: zeros there, in both
        torch.manual_seed(0)
        out = views._views(img, torch.from_numpy(mask))
        assert out["alpha"][0, 0, :4].max() == 0 and out["views"][0, :, :4].max() == 0


def test_aclip_views_with_a_mask_draw_the_same_views():
    img, mask = _image_with_its_mask(seed=1)
    views = ACLIPViews(32, num_views=2, color_aug=False, normalize=False)
    torch.manual_seed(3)
    plain = views(img)
    torch.manual_seed(3)
    with_mask = views(img, torch.from_numpy(mask))
    for key in plain:
        assert torch.equal(plain[key], with_mask[key])
    assert torch.equal(with_mask["views"][:, 0], with_mask["alpha"][:, 0])


def _coco_box_mask(box, h, w):
    return mask_utils.decode(mask_utils.frPyObjects(np.array([box], dtype=float), h, w)[0])


def _png(mask):
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    return buf.getvalue()


def test_rle_box_and_png_regions_decode_to_the_same_mask():
    h, w, box = 40, 50, [7, 5, 20, 12]
    reference = np.zeros((h, w), dtype=np.uint8)
    reference[5:17, 7:27] = 255  # the box [x, y, w, h] as pixels
    assert np.array_equal(_coco_box_mask(box, h, w) * 255, reference)  # pycocotools agrees
    counts = mask_utils.encode(np.asfortranarray(reference // 255))["counts"]
    uncompressed = {"size": [h, w], "counts": [int(v) for v in _uncompressed(reference)]}
    meta = {"regions": [
        {"caption": "rle", "mask": rle_of(reference)},
        {"caption": "rle bytes-as-text", "mask": {"size": [h, w], "counts": counts.decode()}},
        {"caption": "rle uncompressed", "mask": uncompressed},
        {"caption": "box", "bbox": box},
    ]}  # fmt: skip
    sample = {"__key__": "k", "json": json.dumps(meta).encode()}
    decoded = [decode_region(r, (h, w), sample) for r in sample_regions(sample, "full")]
    png_sample = {"__key__": "k", "mask.png": _png(reference)}
    (png_region,) = sample_regions(png_sample, "the region")
    assert png_region.caption == "the region"
    decoded.append(decode_region(png_region, (h, w), png_sample))
    for mask in decoded:
        assert np.array_equal(mask, reference)


def _uncompressed(mask):
    """Column-major run lengths starting with background (COCO's uncompressed RLE)."""
    flat = (mask.T.reshape(-1) > 0).astype(np.int8)
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], change]))


@pytest.mark.parametrize(
    "entry, why",
    [
        ({"caption": "c", "mask": {"size": [10, 10], "counts": "0"}}, "not the image"),
        ({"caption": "c", "mask": {"size": [40, 50], "counts": "\x00zz"}}, "decodable"),
        ({"caption": "c", "bbox": [1, 2, 0, 5]}, "decodable"),
        ({"caption": "c", "bbox": [100, 100, 5, 5]}, "empty"),
        ({"caption": "", "bbox": [1, 2, 3, 4]}, "no caption"),
        ({"caption": "c"}, "exactly one"),
    ],
)
def test_bad_masks_are_bad_samples(entry, why):
    sample = {"__key__": "k", "json": json.dumps({"regions": [entry]}).encode()}
    with pytest.raises(BadSample, match=why) as err:
        for region in sample_regions(sample, "full"):
            decode_region(region, (40, 50), sample)
    assert err.value.reason == "bad_mask"
    small = {"__key__": "k", "mask.png": _png(np.full((10, 10), 255, np.uint8))}
    with pytest.raises(BadSample, match="is 10x10, image 50x40"):
        decode_region(sample_regions(small, "c")[0], (40, 50), small)


def _jpeg_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_sample_transform_draws_regions_and_full_pairs_reproducibly():
    img, mask = _image_with_its_mask(64, 64)
    meta = {"regions": [{"caption": "region one", "mask": rle_of(mask)},
                        {"caption": "region two", "bbox": [0, 0, 10, 10]}]}  # fmt: skip
    sample = {"__key__": "k", "png": _jpeg_bytes(img), "txt": b"the full caption",
              "json": json.dumps(meta).encode()}  # fmt: skip
    tokens = {}

    def tokenizer(texts):
        tokens.setdefault(texts[0], len(tokens))
        return torch.tensor([[tokens[texts[0]]]])

    transform = SampleTransform(RegionViews(32, full_image_prob=0.3), tokenizer, 0, 0)
    outs = [transform(dict(sample, __pos__=pos)) for pos in range(60)]
    again = [transform(dict(sample, __pos__=pos)) for pos in range(60)]
    for a, b in zip(outs, again, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    chosen = [int(o["tokens"][0]) for o in outs]
    full = [o for o, c in zip(outs, chosen, strict=True) if c == tokens["the full caption"]]
    assert set(tokens) == {"the full caption", "region one", "region two"}
    assert 0.1 < len(full) / len(outs) < 0.5
    assert all(int(o["alpha"].min()) == 255 for o in full)  # all-ones alpha with the full caption
    for o, c in zip(outs, chosen, strict=True):
        if c == tokens["region one"]:
            assert torch.equal(o["views"][:, 0], o["alpha"][:, 0])


# ----------------------------------------------------------------------------- loss
def test_label_smoothed_infonce_equals_cross_entropy():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    scale, labels = torch.tensor([100.0]), torch.arange(6)
    want = (
        F.cross_entropy(100 * img @ txt.T, labels, label_smoothing=0.1)
        + F.cross_entropy(100 * txt @ img.T, labels, label_smoothing=0.1)
    ) / 2
    got = clip_infonce(img, txt, scale, label_smoothing=0.1)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not torch.isclose(got, clip_infonce(img, txt, scale))


def _smoothing_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        g = torch.Generator().manual_seed(0)
        img = F.normalize(torch.randn(8, 8, generator=g), dim=1)
        txt = F.normalize(torch.randn(8, 8, generator=g), dim=1)
        rows = slice(rank * 4, rank * 4 + 4)
        loss = clip_infonce(img[rows], txt[rows], torch.tensor([100.0]), label_smoothing=0.1)
        torch.save(loss, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still uses it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_label_smoothed_infonce_on_gathered_logits_two_ranks(tmp_path):
    mp.spawn(_smoothing_worker, args=(str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(8, 8, generator=g), dim=1)
    txt = F.normalize(torch.randn(8, 8, generator=g), dim=1)
    for rank in range(2):
        rows, labels = slice(rank * 4, rank * 4 + 4), torch.arange(4) + 4 * rank
        want = (
            F.cross_entropy(100 * img[rows] @ txt.T, labels, label_smoothing=0.1)
            + F.cross_entropy(100 * txt[rows] @ img.T, labels, label_smoothing=0.1)
        ) / 2
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# The official loss (SunzeY/AlphaCLIP, train/train/train_grit_1m.py:98-122), written from its
# expressions: concat_all_gather (train/utils.py:11-27) is @torch.no_grad() all_gather, and the
# script always runs under torch.distributed (so on one GPU the "gathered" copy has no grad too).
def _concat_all_gather(tensor):
    with torch.no_grad():
        if not (dist.is_available() and dist.is_initialized()):
            return tensor.detach().clone()  # the official script's one-GPU run: a no-grad copy
        tensors_gather = [torch.ones_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(tensors_gather, tensor, async_op=False)
        return torch.cat(tensors_gather, dim=0)


def _official_loss_itc(image_features, text_features, logit_scale):
    image_feat_all = _concat_all_gather(image_features)
    text_feat_all = _concat_all_gather(text_features)
    sim_i2t = torch.matmul(image_features, text_feat_all.T)
    sim_t2i = torch.matmul(image_feat_all, text_features.T)
    sim_t2i = sim_t2i.T
    sim_i2t = logit_scale.exp() * sim_i2t
    sim_t2i = logit_scale.exp() * sim_t2i
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    bs = image_features.size(0)
    targets = torch.linspace(rank * bs, rank * bs + bs - 1, bs, dtype=int)
    return (
        F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
        + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)
    ) / 2


def _alpha_batch(n, seed):
    """Raw image features (as a vision tower's output), caption features, a loader batch
    (float32: the method computes its loss in float32)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, 16, generator=g)
    txt = F.normalize(torch.randn(n, 16, generator=g), dim=1)
    batch = {
        "views": torch.zeros(n, 1, 3, 32, 32, dtype=torch.uint8),
        "alpha": torch.zeros(n, 1, 1, 32, 32, dtype=torch.uint8),
        "tokens": torch.zeros(n, 16, dtype=torch.long),
    }
    return raw, txt, batch


def _alpha_method(world_size=1, **overrides):
    from aclip.methods.alpha_clip import AlphaCLIP
    from aclip.methods.base import RunContext

    cfg = tiny_config("/tmp/unused", method="alpha_clip", **{"model.alpha_channel": True},
                      **overrides)  # fmt: skip
    ctx = RunContext(torch.device("cpu"), 0, world_size, 10, torch.float32, False)
    return AlphaCLIP(cfg, ctx)


def _method_loss(method, image_features, text_features):
    """AlphaCLIP.loss with a stand-in for the student: it returns the given features."""

    def forward(images, tokens, keep, alpha):
        return {"image_emb": image_features, "text_emb": text_features,
                "logit_scale_exp": LN100.exp()}  # fmt: skip

    return method.loss(forward, _alpha_batch(image_features.shape[0], 0)[2], 0).total


def _grads(method, raw, txt, theta=None):
    """(loss, d loss / d raw image features[, d loss / d theta]) through the method's loss."""
    raw = raw.clone().requires_grad_()
    feats = raw if theta is None else raw @ theta
    loss = _method_loss(method, F.normalize(feats, dim=1), txt)
    loss.backward()
    return loss.detach(), raw.grad


def test_alpha_clip_loss_gradient_is_the_official_one():
    raw, txt, _ = _alpha_batch(12, 1)
    official_raw = raw.clone().requires_grad_()
    official = _official_loss_itc(F.normalize(official_raw, dim=1), txt, LN100)
    official.backward()
    loss, grad = _grads(_alpha_method(), raw, txt)  # the default: alpha.symmetric_grad=false
    torch.testing.assert_close(loss, official.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, official_raw.grad, atol=1e-6, rtol=1e-5)
    # the symmetric gradient: same loss value, a different (larger) image gradient
    sym_loss, sym_grad = _grads(_alpha_method(**{"alpha.symmetric_grad": True}), raw, txt)
    torch.testing.assert_close(sym_loss, loss, atol=0, rtol=0)
    ratio = (sym_grad.norm() / grad.norm()).item()
    cosine = F.cosine_similarity(sym_grad.flatten(), grad.flatten(), dim=0).item()
    assert ratio > 1.5 and cosine < 0.99, (ratio, cosine)


def _official_grad_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        raw, txt, _ = _alpha_batch(8, 2)
        theta = torch.eye(16) + 0.1 * _alpha_batch(16, 3)[0]
        rows = slice(rank * 4, rank * 4 + 4)
        theta_ours = theta.clone().requires_grad_()
        loss, grad = _grads(_alpha_method(world_size=2), raw[rows], txt[rows], theta_ours)
        theta_grad = theta_ours.grad.clone()
        dist.all_reduce(theta_grad)  # DDP: the mean of the ranks' parameter gradients
        official_raw = raw[rows].clone().requires_grad_()
        official = _official_loss_itc(F.normalize(official_raw @ theta, dim=1), txt[rows],
                                      LN100)  # fmt: skip
        official.backward()
        torch.save({"loss": loss, "grad": grad, "theta_grad": theta_grad / 2,
                    "official": official.detach(), "official_grad": official_raw.grad},
                   os.path.join(out_dir, f"rank{rank}.pt"))  # fmt: skip
        dist.barrier()  # no rank tears gloo down while the other still uses it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_alpha_clip_official_gradient_two_ranks_equals_one_rank(tmp_path):
    mp.spawn(_official_grad_worker, args=(str(tmp_path / "pg"), str(tmp_path)), nprocs=2,
             join=True)  # fmt: skip
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    raw, txt, _ = _alpha_batch(8, 2)
    theta = (torch.eye(16) + 0.1 * _alpha_batch(16, 3)[0]).requires_grad_()
    loss, grad = _grads(_alpha_method(), raw, txt, theta)  # one rank, the whole batch
    for rank in range(2):
        rows = slice(rank * 4, rank * 4 + 4)
        # each rank: the official code's loss and its gradient on that rank's rows
        torch.testing.assert_close(res[rank]["loss"], res[rank]["official"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(res[rank]["grad"], res[rank]["official_grad"], atol=1e-6,
                                   rtol=1e-5)  # fmt: skip
        # rank r holds world_size x the one-rank gradient of its rows
        # (aclip.methods.losses docstring)
        torch.testing.assert_close(res[rank]["grad"], 2 * grad[rows], atol=1e-6, rtol=1e-5)
        # the ranks' mean parameter gradient (DDP) is the one-rank gradient on the whole batch
        torch.testing.assert_close(res[rank]["theta_grad"], theta.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close((res[0]["loss"] + res[1]["loss"]) / 2, loss, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- param groups
def test_param_group_learning_rates_at_warmup_and_after():
    cfg = tiny_config("/tmp/unused", **{
        "optim.lr": 1e-3, "optim.min_lr": 1e-5, "optim.weight_decay": 0.2,
        "optim.warmup_epochs": 0.5,
        "optim.param_groups": "[{pattern: clip.visual.vit.patch_embed, lr_scale: 1.0},"
        " {pattern: 'clip.visual.*', lr_scale: 0.01, weight_decay: 0.05},"
        " {pattern: clip.text, frozen: true}]",
    })  # fmt: skip
    torch.manual_seed(0)
    student = torch.nn.Module()
    student.clip = build_clip(cfg.model)
    opt = build_optimizer(student, cfg.optim)
    assert not any(p.requires_grad for p in student.clip.text.parameters())
    assert student.clip.text_proj.weight.requires_grad  # 'clip.text' names a module, not a prefix
    names = {id(p): n for n, p in student.named_parameters()}
    seen, scales = set(), []
    for group in opt.param_groups:
        group_names = [names[id(p)] for p in group["params"]]
        seen |= set(group_names)
        first = group_names[0]
        if first.startswith("clip.visual.vit.patch_embed."):
            scale, wd, prefix = 1.0, 0.2, "clip.visual.vit.patch_embed."
        elif first.startswith("clip.visual."):
            scale, wd, prefix = 0.01, 0.05, "clip.visual."
        else:
            scale, wd, prefix = 1.0, 0.2, "clip."
        assert all(n.startswith(prefix) for n in group_names)
        decays = group["params"][0].ndim >= 2 and not first.endswith(".bias")
        assert group["weight_decay"] == (wd if decays else 0.0)
        scales.append(scale)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert seen == trainable and not any(n.startswith("clip.text.") for n in seen)
    assert sorted(set(scales)) == [0.01, 1.0]
    sched = build_scheduler(opt, cfg.optim, steps_per_epoch=10, total_steps=40)
    for step in range(40):  # 5 warm-up steps, then the cosine to min_lr
        factor = lr_factor(step, 5, 40, 1e-5 / 1e-3)
        for group, scale in zip(opt.param_groups, scales, strict=True):
            assert group["lr"] == pytest.approx(1e-3 * scale * factor, rel=1e-12), step
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)


def test_param_group_rules_are_checked():
    with pytest.raises(ConfigError, match=r"optim.param_groups\[0\].pattern"):
        load_config(None, ["optim.param_groups=[{pattern: ''}]"])
    with pytest.raises(ConfigError, match="lr_scale"):
        load_config(None, ["optim.param_groups=[{pattern: x, lr_scale: -1}]"])
    cfg = tiny_config("/tmp/unused", **{"optim.param_groups": "[{pattern: clip.vision}]"})
    student = torch.nn.Module()
    student.clip = build_clip(cfg.model)
    with pytest.raises(ConfigError, match="matches no parameter"):
        build_optimizer(student, cfg.optim)
    # no rules: the two groups as before, nothing else changes
    plain = build_optimizer(student, tiny_config("/tmp/unused").optim)
    assert [g["weight_decay"] for g in plain.param_groups] == [0.05, 0.0]


# ----------------------------------------------------------------------------- the method
@pytest.fixture(scope="module")
def region_data(tmp_path_factory):
    from aclip.data.synthetic import write_region_sets

    root = tmp_path_factory.mktemp("regions")
    write_region_sets(root, n_train=48, n_eval=30, image_size=48, samples_per_shard=24)
    return root


def test_alpha_clip_trains_with_frozen_text_and_fixed_temperature(
    region_data, tmp_path, dist_info, capsys
):
    from aclip.train.trainer import Trainer

    cfg = tiny_config(str(tmp_path / "run"), **{
        "method": "alpha_clip", "model.alpha_channel": True,
        "data.train_shards": f"{region_data}/train_region/{{00000..00001}}.tar",
        "data.workers": 0, "data.samples_per_epoch": 48, "data.color_aug": False,
        "optim.param_groups": "[{pattern: clip.visual.alpha_conv, lr_scale: 1.0},"
        " {pattern: clip.visual, lr_scale: 0.01}, {pattern: clip.image_proj, lr_scale: 0.01}]",
    })  # fmt: skip
    trainer = Trainer(cfg, dist_info)
    clip = trainer.model.clip
    frozen = {k: v.clone() for k, v in clip.state_dict().items()
              if k.startswith(("text.", "text_proj.", "logit_scale"))}  # fmt: skip
    vision = {k: v.clone() for k, v in clip.visual.state_dict().items()}
    assert torch.equal(clip.logit_scale, LN100.view(1)) and not clip.logit_scale.requires_grad
    trainer.fit()
    assert trainer.step == 6
    after = clip.state_dict()
    for key, value in frozen.items():
        assert torch.equal(after[key], value), key
    assert clip.logit_scale_exp().item() == pytest.approx(100.0, rel=1e-6)
    assert torch.count_nonzero(clip.visual.alpha_conv.weight) > 0  # the alpha conv learned
    changed = [k for k, v in vision.items() if not torch.equal(v, clip.visual.state_dict()[k])]
    assert "vit.blocks.0.attn.qkv.weight" in changed
    # the run through the region eval's command line: table, JSON, all five rows
    from evals.region import main

    out = tmp_path / "region.json"
    capsys.readouterr()  # the training log
    args = ["--checkpoint", str(tmp_path / "run"), "--data", str(region_data / "eval_region")]
    assert main([*args, "--no-progress", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["row", "top1", "top5"]
    results = json.loads(out.read_text())
    assert results["n"] == 30 and results["alpha_channel"] is True
    assert all(
        results[row] is not None for row in ("full", "all_ones", "crop", "blackout", "alpha")
    )


def test_alpha_clip_needs_the_alpha_channel():
    from aclip.methods import build_method

    cfg = tiny_config("/tmp/unused", method="alpha_clip")
    with pytest.raises(ConfigError, match="model.alpha_channel"):
        build_method(cfg, None)


def test_bad_mask_samples_are_skipped_and_counted(tmp_path):
    from aclip.data.pipeline import build_train_loader
    from aclip.tokenizer import Tokenizer

    img, mask = _image_with_its_mask(40, 40)
    good = {"regions": [{"caption": "ok", "mask": rle_of(mask)}]}
    bad = {"regions": [{"caption": "bad", "mask": {"size": [7, 7], "counts": "0"}}]}
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(12):
            meta = bad if i % 3 == 0 else good
            for ext, data in (("png", _jpeg_bytes(img)), ("txt", b"caption"),
                              ("json", json.dumps(meta).encode())):  # fmt: skip
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    views = RegionViews(32, full_image_prob=0.0)
    loader = build_train_loader(str(shard), Tokenizer(16), views, 4, 0, resampled=False,
                                shuffle_buffer=1)  # fmt: skip
    batches = list(loader)
    assert sum(len(b["tokens"]) for b in batches) == 8
    assert loader.skip_stats.counts["bad_mask"] == 4


# ----------------------------------------------------------------------------- evaluation
def test_region_rows_and_per_class_metrics(region_data):
    from aclip.data.sets.regions import WdsRegionSet
    from aclip.eval.region import (
        ROWS,
        RegionTransform,
        mean_per_class_topk,
        region_logits,
        region_zeroshot,
    )
    from aclip.tokenizer import Tokenizer

    torch.manual_seed(0)
    model = build_clip(_model_cfg(alpha_channel=True)).eval()
    with torch.no_grad():
        model.visual.alpha_conv.weight.normal_(std=0.5)
    dataset = WdsRegionSet(region_data / "eval_region")
    items = list(dataset)
    assert len(items) == 30 and all(m.shape == (48, 48) and m.max() == 255 for _, m, _ in items)
    res = region_zeroshot(model, Tokenizer(16), dataset, dataset.classnames, 32, batch_size=7)
    assert res["n"] == 30 and set(ROWS) <= set(res)
    assert all(0.0 <= res[row]["top1"] <= res[row]["top5"] <= 1.0 for row in ROWS)
    classifier = torch.eye(32)[:, :10]  # logits = the first 10 embedding coordinates
    batches = [torch.utils.data.default_collate([RegionTransform(32)(i) for i in items[:5]])]
    logits, labels = region_logits(model, classifier, batches)
    assert torch.equal(labels, torch.tensor([i[2] for i in items[:5]]))
    assert not torch.allclose(logits["alpha"], logits["all_ones"])  # the alpha conv sees masks
    assert not torch.allclose(logits["all_ones"], logits["full"])  # full: no alpha at all
    want = 100 * model.encode_image(batches[0]["image"], None, True, batches[0]["alpha"])[:, :10]
    torch.testing.assert_close(logits["alpha"], want)
    base = build_clip(_model_cfg()).eval()
    base_res = region_zeroshot(base, Tokenizer(16), dataset, dataset.classnames, 32)
    assert base_res["alpha"] is None and base_res["all_ones"] is None
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.15, 0.8, 0.05], [0.0, 0.1, 1.0]])
    labels = torch.tensor([0, 1, 0, 0])  # class 0: 1 of 3 right, class 1: 1 of 1
    assert mean_per_class_topk(logits, labels, 1) == pytest.approx((1 / 3 + 1) / 2)
    assert mean_per_class_topk(logits, labels, 2) == pytest.approx((2 / 3 + 1) / 2)


def test_region_transform_centre_crops_image_and_mask_together():
    from aclip.eval.region import RegionTransform, centre_square, square_box

    img, mask = _image_with_its_mask(90, 60)
    sq_img, sq_mask = centre_square(img, mask)
    assert sq_img.size == (60, 60) and sq_mask.shape == (60, 60)
    assert np.array_equal(np.asarray(sq_img)[..., 0], sq_mask)  # still aligned
    x0, y0, x1, y1 = square_box(sq_mask)
    assert x1 - x0 == y1 - y0 and x0 >= 0 and x1 <= 60 and y0 >= 0 and y1 <= 60
    out = RegionTransform(32)((img, mask, 3))
    assert out["image"].shape == out["crop"].shape == out["blackout"].shape == (3, 32, 32)
    assert out["alpha"].shape == (1, 32, 32) and int(out["label"]) == 3
    black = np.asarray(sq_img) * (sq_mask >= 128)[..., None]
    assert black[sq_mask < 128].max() == 0


def _imagenet_s(root, wnids, bad_id=None):
    for split in ("validation", "validation-segmentation"):
        for w in wnids:
            (root / split / w).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for w in wnids:
        for j in range(2):
            ids = np.zeros((20, 30), dtype=np.int32)
            ids[2:12, 5 + j : 20] = 1 + sorted(wnids).index(w)  # its own class id
            ids[12:15, 25:] = 1 + sorted(wnids).index(wnids[0])  # and wnids[0]'s
            ids[15:, :5] = 1000  # ignored
            if bad_id is not None:
                ids[0, 0] = bad_id
            rgb = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], -1).astype(np.uint8)
            Image.fromarray(rgb).save(root / "validation-segmentation" / w / f"im{j}.png")
            pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "validation" / w / f"im{j}.JPEG", quality=95)


def test_imagenet_s_reader_decodes_class_ids(tmp_path):
    from aclip.data.sets.regions import ImageNetS, imagenet_s_classnames

    wnids = ["n01443537", "n01440764"]  # goldfish, tench: sorted -> tench is class id 1
    _imagenet_s(tmp_path, wnids)
    ds = ImageNetS(tmp_path)
    assert ds.wnids == sorted(wnids) and len(ds) == 4
    image, mask, label = ds[0]
    assert image.size == (30, 20) and label == 0
    want = np.zeros((20, 30), np.uint8)
    want[2:12, 5:20] = 255
    assert np.array_equal(mask, want)
    assert imagenet_s_classnames(ds.wnids) == ["tench", "goldfish"]
    assert imagenet_s_classnames(ds.wnids, "openai") == ["tench", "goldfish"]
    bad = tmp_path / "bad"
    _imagenet_s(bad, wnids, bad_id=7)
    with pytest.raises(ValueError, match="class id 7 is not one of the 2 classes"):
        ImageNetS(bad)[0]


def test_region_cli_errors_and_table(tmp_path, region_data, capsys):
    from evals.region import main

    assert main(["--checkpoint", str(tmp_path / "none"), "--data", str(region_data)]) == 2
    assert "error:" in capsys.readouterr().err


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_region_scenes(region_data):
    from aclip.data.synthetic import COLOURS, make_region_sample

    for i in range(20):
        s = make_region_sample(0, "train_region", i, 48)
        assert 2 <= len(s["regions"]) <= 4
        shapes = [r["object"][0] for r in s["regions"]]
        colours = [r["object"][1] for r in s["regions"]]
        assert len(set(shapes)) == len(shapes) and len(set(colours)) == len(colours)
        for r in s["regions"]:
            assert r["mask"].any() and f"{r['object'][1]} {r['object'][0]}" in r["caption"]
            assert f"{r['object'][1]} {r['object'][0]}" in s["caption"]
    with tarfile.open(region_data / "train_region" / "00000.tar") as tar:
        meta = json.loads(tar.extractfile(tar.getmember("000000000.json")).read())
    # the objects overlap: a region's bounding box holds pixels of another object, so the box
    # crop alone is ambiguous (the placement of before, apart, gave 2 of 40)
    crowded = 0
    for i in range(40):
        s = make_region_sample(0, "eval_region", i, 64)
        mask = s["regions"][s["target"]]["mask"] > 0
        ys, xs = np.nonzero(mask)
        box = np.zeros_like(mask)
        box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
        others = np.any([r["mask"] > 0 for j, r in enumerate(s["regions"]) if j != s["target"]], 0)
        crowded += bool((box & others).any())
    assert crowded >= 30, crowded
    assert meta["regions"] and {"caption", "mask"} == set(meta["regions"][0])
    names = (region_data / "eval_region" / "classnames.txt").read_text().splitlines()
    assert names == [f"{c} object" for c in COLOURS]


# ----------------------------------------------------------------------------- interop


def test_init_from_base_weights_and_export_refusal(tmp_path):
    from aclip.interop import (
        NotExpressible,
        Preprocess,
        export_open_clip,
        init_from,
        to_openai_state_dict,
        to_timm_model,
    )

    cfg = load_config(None, CLIP_QUICKGELU_TINY_ARGS).model
    torch.manual_seed(0)
    base = build_clip(cfg).eval()
    export_open_clip(base, tmp_path / "base", Preprocess(32))
    torch.manual_seed(1)
    alpha_model = build_clip(replace(cfg, alpha_channel=True)).eval()
    with torch.no_grad():
        alpha_model.visual.alpha_conv.weight.fill_(1.0)
    notes = init_from(alpha_model, f"local-dir:{tmp_path / 'base'}")
    assert any("alpha conv" in n for n in notes)
    assert torch.count_nonzero(alpha_model.visual.alpha_conv.weight) == 0
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(alpha_model.encode_image(images), base.encode_image(images))
    exports = (
        to_openai_state_dict,
        to_timm_model,
        lambda clip: export_open_clip(clip, tmp_path / "alpha", Preprocess(32)),
    )
    for export in exports:
        with pytest.raises(NotExpressible, match="alpha channel"):
            export(alpha_model)
    assert not (tmp_path / "alpha").exists()


@pytest.mark.parametrize("name", ["alpha_clip_vit_b16.yaml", "demo_alpha.yaml"])
def test_shipped_alpha_configs_build_their_groups(name):
    from aclip.methods import build_method
    from aclip.train.optim import apply_param_rules, param_groups

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / name)
    assert cfg.method == "alpha_clip" and cfg.model.alpha_channel
    with torch.device("meta"):
        student = build_method(cfg, None).build_student()
    counts = apply_param_rules(student, cfg.optim.param_groups)
    assert counts[0] == 1  # the alpha conv's one weight
    groups = param_groups(student, cfg.optim.weight_decay, cfg.optim.param_groups, cfg.optim.lr)
    trained = {id(p) for g in groups for p in g["params"]}
    clip = student.clip
    assert not any(id(p) in trained for p in [*clip.text.parameters(), clip.logit_scale])
    assert id(clip.visual.alpha_conv.weight) in trained
    lrs = {g["lr"] for g in groups}
    assert lrs == {cfg.optim.lr, cfg.optim.lr * cfg.optim.param_groups[1].lr_scale}


def test_region_sets_are_checked_before_training_and_evaluated_during_it(
    region_data, tmp_path, dist_info
):
    """eval.region_sets: the pre-flight refuses a set without masks; during training every
    eval.every_steps steps the five rows go to tensorboard (eval/region/<set>/<row>/top1) and the
    final evaluation holds them, equal to region_zeroshot's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from aclip.config import ConfigError
    from aclip.data.sets.regions import WdsRegionSet
    from aclip.data.synthetic import write_synthetic
    from aclip.eval.region import region_zeroshot
    from aclip.train.preflight import check_paths
    from aclip.train.trainer import Trainer

    over = {
        "method": "alpha_clip", "model.alpha_channel": True, "data.workers": 0,
        "data.train_shards": f"{region_data}/train_region/{{00000..00001}}.tar",
        "data.samples_per_epoch": 48, "eval.every_steps": 3, "eval.batch_size": 16,
        "eval.region_sets": f"[{region_data}/eval_region]",
    }  # fmt: skip
    plain = tmp_path / "plain"
    write_synthetic(plain, n_train=0, n_eval_cls=8, n_eval_ret=0, image_size=48)
    with pytest.raises(ConfigError, match=r"eval.region_sets: .*no \.mask\.png"):
        check_paths(tiny_config(str(tmp_path / "x"), **over | {
            "eval.region_sets": f"[{plain}/eval_cls]"}))  # fmt: skip
    trainer = Trainer(tiny_config(str(tmp_path / "run"), **over), dist_info)
    trainer.fit()
    results = trainer.evaluate()["region/eval_region"]
    dataset = WdsRegionSet(region_data / "eval_region")
    rows = region_zeroshot(trainer.model.clip, trainer.tokenizer, dataset, dataset.classnames,
                           trainer.cfg.model.image_size)  # fmt: skip
    assert results["alpha/top1"] == rows["alpha"]["top1"] and results["n"] == 30
    trainer.close()
    scalars = EventAccumulator(str(tmp_path / "run" / "tb"))
    scalars.Reload()
    assert "eval/region/eval_region/alpha/top1" in scalars.Tags()["scalars"]
