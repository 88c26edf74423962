"""Training methods: CLIP and FLIP equal the A-CLIP ablations they are, number for number; a new
method is one class (here LiT, locked-image tuning) and trains through the unchanged trainer."""

from __future__ import annotations

import pytest
import torch
from helpers import fake_batch, tiny_config
from torch import nn

from aclip.config import ConfigError
from aclip.methods import METHODS, get_method
from aclip.methods.clip import CLIP
from aclip.methods.registry import register
from aclip.train.trainer import Trainer

ABLATION = {"mask.num_views": 1, "loss.w_simclr": 0, "loss.w_byol": 0}


def _run(cfg, dist_info, steps: int = 3) -> tuple[list[float], torch.Tensor, Trainer]:
    trainer = Trainer(cfg, dist_info)
    losses = [trainer.train_step(fake_batch(cfg, 8, seed=40 + i))["loss"].item()
              for i in range(steps)]  # fmt: skip
    weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    return losses, weights, trainer


WORDS = {"loss.w_caption_bow": 0.5, "loss.w_text_bow": 1.0}


@pytest.mark.parametrize("extra", [{}, WORDS], ids=["infonce", "with_caption_words"])
@pytest.mark.parametrize(("method", "strategy"), [("clip", "none"), ("flip", "random")])
def test_clip_and_flip_are_the_aclip_ablations_number_for_number(
    tmp_path, dist_info, method, strategy, extra
):
    ours = tiny_config(str(tmp_path / "m"), **{"method": method, **ABLATION, **extra})
    ablation = tiny_config(str(tmp_path / "a"),
                           **{"mask.strategy": strategy, **ABLATION, **extra})  # fmt: skip
    losses, weights, trainer = _run(ours, dist_info)
    ref_losses, ref_weights, ref = _run(ablation, dist_info)
    assert losses == ref_losses
    assert torch.equal(weights, ref_weights)
    assert ref.method.teacher is None and not hasattr(trainer.method, "teacher")
    assert trainer.model.simclr_head is None and trainer.model.byol_projector is None
    assert "ema" not in trainer.method.sample_views()(_image())


def _image():
    from PIL import Image

    return Image.new("RGB", (40, 40), (120, 30, 200))


def test_an_unknown_method_is_refused_naming_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown method 'slip'.*aclip, alpha_clip, clip, flip"):
        get_method("slip")
    assert {"aclip", "alpha_clip", "clip", "flip"} <= set(METHODS)


@register
class LiT(CLIP):
    """Locked-image tuning (Zhai et al., 2022): the image tower and projection are frozen, the
    text tower learns to match them. The whole method: a name and a frozen student."""

    name = "lit_test"

    def build_student(self) -> nn.Module:
        student = super().build_student()
        for module in (student.clip.visual, student.clip.image_proj):
            module.requires_grad_(False)
        return student


def test_a_new_method_trains_through_the_unchanged_trainer(tmp_path, dist_info):
    cfg = tiny_config(str(tmp_path), **{"method": "lit_test", "mask.num_views": 1,
                                        "train.stop_at_step": 3})  # fmt: skip
    trainer = Trainer(cfg, dist_info)
    image_side = [p.detach().clone() for p in trainer.model.clip.visual.parameters()]
    text_side = trainer.model.clip.text_proj.weight.detach().clone()
    assert trainer.fit(loader=[fake_batch(cfg, 8, seed=i) for i in range(3)])
    assert trainer.step == 3
    after = list(trainer.model.clip.visual.parameters())
    assert all(torch.equal(a, b) for a, b in zip(image_side, after, strict=True))
    assert not torch.equal(trainer.model.clip.text_proj.weight, text_side)
    saved = (tmp_path / "checkpoints" / "step_00000003" / "aclip_config.yaml").read_text()
    assert "method: lit_test" in saved


@pytest.mark.parametrize(
    ("overrides", "kept"),
    [
        ({"mask.strategy": "none"}, 1.0),  # all tokens whatever mask.keep_ratio says
        ({"mask.strategy": "attentive"}, 0.5),
        ({"mask.strategy": "random", "mask.keep_ratio": 0.25}, 0.25),  # 4 of 16 patches
        ({"mask.strategy": "attentive", "mask.keep_ratio": 1.0}, 1.0),
        ({"method": "clip"}, 1.0),
        ({"method": "flip", "mask.keep_ratio": 0.25}, 0.25),
    ],
)
def test_the_kept_fraction_logged_is_what_is_kept(tmp_path, dist_info, overrides, kept):
    trainer = Trainer(tiny_config(str(tmp_path), **overrides), dist_info)
    assert trainer.method.scalars(0)["train/kept_fraction"] == kept


def test_the_byol_target_uses_the_ema_batchs_statistics(tmp_path, dist_info):
    """A-CLIP's BYOL target: the teacher's projection of the EMA view, its BatchNorm normalising
    with that batch's statistics (cross-rank BatchNorm, one rank here); no dropout or drop
    path."""
    from aclip.data.views import model_input

    cfg = tiny_config(
        str(tmp_path),
        **{
            "model.vision_kwargs": "{patch_size: 8, depth: 2, "
            "embed_dim: 48, num_heads: 3, drop_path_rate: 0.5}"
        },
    )
    trainer = Trainer(cfg, dist_info)
    teacher = trainer.method.teacher.module
    batch = fake_batch(cfg, 8, seed=5)
    ema, boxes = model_input(batch["ema"]), batch["boxes"].float()
    _, target, _ = trainer.method.teacher_pass(ema, boxes, step=0)
    with torch.no_grad():
        pooled, _ = teacher["visual"].forward_with_relevance(ema)
        linear, norm, _, last = teacher["byol_projector"]
        h = linear(pooled)
        mean, var = h.mean(0), h.var(0, unbiased=False)
        ref = last(torch.relu((h - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias))
    torch.testing.assert_close(target, ref, atol=1e-5, rtol=1e-5)
    again = trainer.method.teacher_pass(ema, boxes, step=0)[1]
    assert torch.equal(target, again)  # no dropout / drop-path in the teacher
    assert not teacher["visual"].training and norm.training and not norm.track_running_stats


@pytest.mark.parametrize("method", ["aclip", "clip", "flip", "alpha_clip"])
def test_an_unknown_token_strategy_is_refused_by_every_method(method):
    """mask.strategy is checked against the token-strategy registry (aclip.methods.tokens), in
    the methods layer, so that a strategy is one new file: a ConfigError naming the key and the
    registered strategies, from every method's validate (as pre-flight and build_method call it)."""
    from aclip.config import load_config

    overrides = ["mask.strategy=magic"] + (["model.alpha_channel=true"] * (method == "alpha_clip"))
    cfg = load_config(overrides=overrides)
    with pytest.raises(ConfigError, match=r"'mask.strategy'.*attentive, .*none, random.*'magic'"):
        get_method(method).validate(cfg)
