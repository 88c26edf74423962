"""AdamW parameter groups, the run's length and the per-step warm-up + cosine LR schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from aclip.config import Config, OptimConfig, steps_per_epoch


@dataclass(frozen=True)
class RunLength:
    """How long a run is: its epoch, the schedule (``total_steps``: the LR and EMA schedules run
    over it) and the step it stops at (``end_step``: ``train.stop_at_step`` if earlier)."""

    samples_per_epoch: int
    batch: int
    steps_per_epoch: int
    total_steps: int
    end_step: int

    def describe(self) -> str:
        """One line for the run's log."""
        epochs = self.total_steps / self.steps_per_epoch
        stop = f", stopping at step {self.end_step}" if self.end_step < self.total_steps else ""
        return (
            f"epoch: {self.samples_per_epoch} samples = {self.steps_per_epoch} steps of batch "
            f"{self.batch}; schedule: {self.total_steps} steps ({epochs:g} epochs){stop}"
        )


def run_length(cfg: Config, samples_per_epoch: int) -> RunLength:
    """The run's length from its epoch size, ``optim.epochs`` / ``optim.total_steps`` and
    ``train.stop_at_step``."""
    batch = cfg.train.global_batch_size
    per_epoch = steps_per_epoch(samples_per_epoch, batch)
    total = cfg.optim.total_steps or max(1, round(cfg.optim.epochs * per_epoch))
    stop = cfg.train.stop_at_step
    end = min(stop, total) if stop else total
    return RunLength(samples_per_epoch, batch, per_epoch, total, end)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on matrices, none on biases, norms, 1-D params, logit scale.

    Every parameter of shape (n,) or () — biases, LayerNorm/BatchNorm weights, the (1,)-shaped
    logit scale — lands in the no-decay group; frozen parameters are left out.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or name.endswith(".bias") or "logit_scale" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with the configured betas and eps."""
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=betas, eps=cfg.eps
    )


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the base LR after ``step`` optimizer steps have been taken.

    Linear warm-up to 1 over ``warmup_steps`` (the first step already uses 1/warmup), then a
    cosine from 1 down to ``min_ratio`` at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR implementing :func:`lr_factor` for this run's length."""
    warmup = max(1, round(cfg.warmup_epochs * steps_per_epoch)) if cfg.warmup_epochs > 0 else 0
    warmup = min(warmup, total_steps)
    min_ratio = cfg.min_lr / cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total_steps, min_ratio)
    )
