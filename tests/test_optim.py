"""Weight-decay groups and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from aclip.config import OptimConfig
from aclip.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


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


def _adamw_reference(model: nn.Module, cfg: OptimConfig, grads: list[dict[str, torch.Tensor]]):
    """AdamW written out (torch's documented update, decoupled decay), per parameter group."""
    state: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    decay = {id(p) for p in param_groups(model, cfg.weight_decay)[0]["params"]}
    beta1, beta2 = cfg.betas
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for t, step_grads in enumerate(grads, start=1):
        for name, p in model.named_parameters():
            if name not in params:
                continue
            g = step_grads[name]
            m, v = state.get(name, (torch.zeros_like(g), torch.zeros_like(g)))
            m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
            state[name] = (m, v)
            wd = cfg.weight_decay if id(p) in decay else 0.0
            x = params[name] * (1 - cfg.lr * wd)
            m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
            params[name] = x - cfg.lr * m_hat / (v_hat.sqrt() + cfg.eps)
    return params


@pytest.mark.parametrize("fused", [False, True])
def test_fused_and_foreach_adamw_match_the_written_out_update(fused):
    """optim.fused picks torch's fused kernel; both kernels give AdamW's update (the formula
    above, over both weight-decay groups) after a few steps of random gradients."""
    torch.manual_seed(0)
    model = _Toy()
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, fused=fused)
    opt = build_optimizer(model, cfg)
    assert all(group["fused"] is (True if fused else None) for group in opt.param_groups)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = [{n: torch.randn_like(p) for n, p in trained.items()} for _ in range(4)]
    expected = _adamw_reference(model, cfg, grads)
    for step_grads in grads:
        for name, p in trained.items():
            p.grad = step_grads[name].clone()
        opt.step()
    for name, p in trained.items():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6)
