"""The cheaper teacher (``ema.image_size``): the EMA view at a lower resolution through the
teacher with its position embedding resampled on the fly, against a timm ViT built at that size;
its FLOPs against FlopCounterMode; the loader's EMA view at that size; the default unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from helpers import fake_batch, tiny_config
from PIL import Image
from test_bench import counted
from timm.layers import resample_abs_pos_embed

from aclip.config import ConfigError
from aclip.data.views import ACLIPViews, image_tensor, resize_box, union_box
from aclip.methods import get_method
from aclip.methods.base import RunContext
from aclip.methods.flops import config_step_flops, step_flops
from aclip.methods.tokens import map_relevance_to_views
from aclip.model import build_model
from aclip.model.vision import VisionTower

TINY = {"patch_size": 8, "depth": 3, "embed_dim": 48, "num_heads": 3}
VARIANTS = {
    "plain": {},
    "qknorm_reg": {"qk_norm": True, "reg_tokens": 2, "init_values": 0.1},
    "no_embed_class_avg": {"no_embed_class": True, "global_pool": "avg", "pre_norm": True},
}


def _tower(size: int, extra: dict, seed: int = 0) -> VisionTower:
    torch.manual_seed(seed)
    tower = VisionTower("vit_tiny_patch16_224", size, {**TINY, **extra}).eval()
    with torch.no_grad():  # random prefix tokens and position embedding so that both matter
        for name in ("cls_token", "reg_token", "pos_embed"):
            param = getattr(tower.vit, name)
            if param is not None:
                param.normal_(std=0.5)
    return tower


def _reference_at(tower: VisionTower, size: int, extra: dict) -> torch.nn.Module:
    """A timm ViT built at ``size`` holding ``tower``'s weights, its position embedding
    resampled by timm's ``resample_abs_pos_embed`` (what timm does to load weights at a new
    resolution)."""
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                            img_size=size, **{**TINY, **extra}).eval()  # fmt: skip
    state = dict(tower.vit.state_dict())
    vit = tower.vit
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    grid = ref.patch_embed.grid_size
    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"], list(grid), old_size=list(tower.grid_hw), num_prefix_tokens=prefix
    )
    ref.load_state_dict(state)
    return ref


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lower_resolution_pass_equals_a_timm_vit_built_at_that_size(variant):
    extra = VARIANTS[variant]
    tower = _tower(48, extra)  # 6x6 grid
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # 4x4 grid
    ref = _reference_at(tower, 32, extra)
    ref_tower = VisionTower("vit_tiny_patch16_224", 32, {**TINY, **extra}).eval()
    ref_tower.vit = ref
    with torch.no_grad():
        pooled, relevance = tower.forward_with_relevance(x)
        ref_pooled, ref_relevance = ref_tower.forward_with_relevance(x)
        torch.testing.assert_close(pooled, ref.forward_head(ref.forward_features(x), True))
        torch.testing.assert_close(pooled, ref_pooled)
        torch.testing.assert_close(relevance, ref_relevance)
        assert relevance.shape == (2, 16) and tower.grid_for(32, 32) == (4, 4)
        keep = torch.tensor([[0, 5, 15], [1, 2, 3]])
        torch.testing.assert_close(tower(x, keep), ref_tower(x, keep))
        # the weights kept their shapes and values, and the tower is back at its own size
        assert all(torch.equal(v, tower.state_dict()[k]) for k, v in before.items())
        full = torch.randn(2, 3, 48, 48)
        torch.testing.assert_close(
            tower(full), tower.vit.forward_head(tower.vit.forward_features(full), True)
        )
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tower.grid_for(36, 36)


def _method(cfg, tmp_path):
    ctx = RunContext(torch.device("cpu"), 0, 1, 100, torch.float32, False)
    method = get_method(cfg.method)(cfg, ctx)
    torch.manual_seed(0)
    student = method.build_student()
    method.attach(student)
    return method, student


def test_teacher_pass_at_lower_resolution_maps_the_coarse_relevance_onto_each_view(tmp_path):
    cfg = tiny_config(str(tmp_path), **{"ema.image_size": 16})  # teacher 2x2, student 4x4
    method, _ = _method(cfg, tmp_path)
    batch = fake_batch(cfg, 4, seed=0)
    boxes = batch["boxes"]
    small = torch.nn.functional.interpolate(
        batch["ema"], size=(16, 16), mode="bilinear", antialias=True
    )
    teacher = method.teacher.module
    with torch.no_grad():
        _, relevance = teacher["visual"].forward_with_relevance(small)
    assert relevance.shape == (4, 4)
    k = method.selector.k
    mapped = map_relevance_to_views(relevance, (2, 2), boxes, (4, 4)).flatten(0, 1)
    expected = mapped.topk(k, dim=1).indices.sort(dim=1).values
    for ema in (small, batch["ema"]):  # at the teacher's size, or resized on the device
        keep, target, rel = method.teacher_pass(ema, boxes, step=0)
        torch.testing.assert_close(rel, relevance)
        assert torch.equal(keep, expected) and target.shape == (4, cfg.loss.byol_out)
    # the EMA update still copies the student into the teacher (same shapes)
    method.after_step(0)


def test_default_teacher_size_changes_nothing(tmp_path):
    """ema.image_size=0 and ema.image_size=<model size> run the same teacher pass, bit for bit,
    and the model's own size never enters timm's dynamic-size path."""
    outs = []
    for size in (0, 32):
        cfg = tiny_config(str(tmp_path), **{"ema.image_size": size})
        method, student = _method(cfg, tmp_path)
        batch = fake_batch(cfg, 4, seed=0)
        outs.append(method.teacher_pass(batch["ema"], batch["boxes"], step=0))
        assert method.sample_views().ema_size == 32
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    assert not method.teacher.module["visual"].vit.dynamic_img_size


def test_a_teacher_size_off_the_patch_grid_is_refused(tmp_path):
    cfg = tiny_config(str(tmp_path), **{"ema.image_size": 20})
    with pytest.raises(ConfigError, match="ema.image_size"):
        _method(cfg, tmp_path)
    with pytest.raises(ConfigError, match="ema.image_size"):
        tiny_config(str(tmp_path), **{"ema.image_size": -1})


def test_teacher_flops_at_lower_resolution_equal_the_flop_counter(tmp_path):
    cfg = tiny_config(str(tmp_path), **{"ema.image_size": 16})
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss)
    flops = step_flops(model, cfg, 8)
    full = step_flops(model, tiny_config(str(tmp_path)), 8)
    ema = torch.randn(8, 3, 16, 16)

    def teacher():
        with torch.no_grad():
            pooled, _ = model.clip.visual.forward_with_relevance(ema)
            model.byol_projector(pooled)

    assert counted(teacher) == flops.teacher
    assert flops.teacher < full.teacher and flops.student_forward == full.student_forward
    assert config_step_flops(cfg, 8).total == flops.total


def test_cheaper_teacher_flops_on_vit_b16():
    """ViT-B/16 at 224 with the teacher at 112: 49 patches instead of 196."""
    from aclip.config import load_config

    full = config_step_flops(load_config(None, []), 64)
    cheap = config_step_flops(load_config(None, ["ema.image_size=112"]), 64)
    assert cheap.student_forward == full.student_forward
    assert 0.2 < cheap.teacher / full.teacher < 0.26  # ~1/4 (the per-token terms dominate)
    plain = ["method=clip", "mask.num_views=1", "loss.w_simclr=0", "loss.w_byol=0"]
    clip = config_step_flops(load_config(None, plain), 64)
    assert cheap.total / clip.total < 1.10 < full.total / clip.total


def _photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))


@pytest.mark.parametrize("normalize", [False, True])
def test_loader_ema_view_at_the_teacher_size(normalize):
    img = _photo(0)
    torch.manual_seed(5)
    ref = ACLIPViews(48, normalize=normalize)(img)
    torch.manual_seed(5)
    small = ACLIPViews(48, normalize=normalize, ema_size=24)(img)
    assert torch.equal(small["views"], ref["views"]) and torch.equal(small["boxes"], ref["boxes"])
    assert small["ema"].shape == (3, 24, 24)
    torch.manual_seed(5)
    boxes = ACLIPViews(48).sample_boxes(img)
    expected = resize_box(image_tensor(img), union_box(boxes), 24)
    if not normalize:
        assert torch.equal(small["ema"], expected)
