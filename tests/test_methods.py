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
from aclip.trainer import Trainer

ABLATION = {"mask.num_views": 1, "loss.w_simclr": 0, "loss.w_byol": 0}


def _run(cfg, dist_info, steps: int = 3) -> tuple[list[float], torch.Tensor, Trainer]:
    trainer = Trainer(cfg, dist_info)
    losses = [trainer.train_step(fake_batch(cfg, 8, seed=40 + i))["loss"].item()
              for i in range(steps)]  # fmt: skip
    weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    return losses, weights, trainer


@pytest.mark.parametrize(("method", "strategy"), [("clip", "none"), ("flip", "random")])
def test_clip_and_flip_are_the_aclip_ablations_number_for_number(
    tmp_path, dist_info, method, strategy
):
    ours = tiny_config(str(tmp_path / "m"), **{"method": method, **ABLATION})
    ablation = tiny_config(str(tmp_path / "a"), **{"mask.strategy": strategy, **ABLATION})
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
