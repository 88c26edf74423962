"""EMA teacher (docs/design.md, A-CLIP step 7): a frozen copy of the student, updated by
momentum after each step.

The teacher is deliberately *not* an ``nn.Module`` attribute of the model: its parameters never
reach the optimizer, the DeepSpeed engine, DDP or ``student.parameters()``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn


def ema_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """Cosine momentum schedule from ``base`` (step 0) to ``final`` (step >= total_steps).

    m(step) = final - (final - base) * (cos(pi * step / total_steps) + 1) / 2, step clamped to
    [0, total_steps]; ``final`` when ``total_steps`` <= 0.
    """
    if total_steps <= 0:
        return final
    step = min(max(step, 0), total_steps)
    return final - (final - base) * (math.cos(math.pi * step / total_steps) + 1) / 2


class EMATeacher:
    """Momentum copy of a student module, without gradients: in eval mode (no dropout or drop
    path) except its BatchNorm layers, which normalise with the statistics of the batch they see
    (as BYOL's target network and the official A-CLIP code, whose EMA modules run in train mode,
    do; cross-rank BatchNorm gathers them over the ranks) and leave their running statistics
    alone (those are copied from the student at each update)."""

    def __init__(self, student: nn.Module) -> None:
        self.module = copy.deepcopy(student)
        self._freeze()

    def _freeze(self) -> None:
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._set_modes()

    def _set_modes(self) -> None:
        self.module.eval()
        for layer in self.module.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.train()
                layer.track_running_stats = False  # batch statistics; buffers not updated

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """teacher = momentum * teacher + (1 - momentum) * student for every parameter; buffers
        (BatchNorm running statistics and counters) are copied from the student."""
        t_params = list(self.module.parameters())
        s_params = list(student.parameters())
        if len(t_params) != len(s_params):
            raise ValueError(
                f"student has {len(s_params)} parameters, teacher {len(t_params)}: not its copy"
            )
        s_params = [s.detach().to(t.dtype) for s, t in zip(s_params, t_params, strict=True)]
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)
        for t_buf, s_buf in zip(self.module.buffers(), student.buffers(), strict=True):
            t_buf.copy_(s_buf)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the teacher without gradients."""
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher module's state dict (for checkpoints)."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a state dict saved by ``state_dict``; the teacher stays frozen, in its modes."""
        self.module.load_state_dict(state_dict)
        self._freeze()

    def to(self, device: torch.device | str) -> EMATeacher:
        """Move the teacher to ``device``; returns self."""
        self.module.to(device)
        return self

    def train(self, mode: bool = True) -> EMATeacher:
        """The teacher keeps its modes (eval, BatchNorm on batch statistics) whatever ``mode``
        says; returns self."""
        self._set_modes()
        return self

    def eval(self) -> EMATeacher:
        """The teacher's modes (see the class docstring); returns self."""
        self._set_modes()
        return self
