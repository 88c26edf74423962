"""Weight-decay groups and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from aclip.config import OptimConfig
from aclip.optim import build_optimizer, build_scheduler, lr_factor, param_groups


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.bn = nn.BatchNorm1d(4)
        self.logit_scale = nn.Parameter(torch.ones(1))
        self.pos = nn.Parameter(torch.zeros(3, 4))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_no_decay_on_biases_norms_1d_and_logit_scale():
    model = _Toy()
    decay, no_decay = param_groups(model, 0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["linear.weight", "pos"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == [
        "bn.bias",
        "bn.weight",
        "linear.bias",
        "logit_scale",
        "norm.bias",
        "norm.weight",
    ]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.5, 0.0)


def test_lr_factor_warmup_then_cosine_to_min():
    assert lr_factor(0, 10, 110, 0.02) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110, 0.02) == pytest.approx(1.0)
    assert lr_factor(10, 10, 110, 0.02) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, 0.02) == pytest.approx(0.02 + 0.98 * 0.5)
    assert lr_factor(110, 10, 110, 0.02) == pytest.approx(0.02)
    mid = 10 + 25
    expected = 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * 0.25))
    assert lr_factor(mid, 10, 110, 0.02) == pytest.approx(expected)


def test_scheduler_drives_the_optimizer_per_step():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_epochs=1, epochs=3)
    opt = build_optimizer(_Toy(), cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)
    assert opt.param_groups[0]["betas"] == (0.9, 0.98)
