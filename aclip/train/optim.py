"""AdamW parameter groups, the run's length and the per-step warm-up + cosine LR schedule."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from aclip.config import Config, ConfigError, OptimConfig, ParamGroupConfig, steps_per_epoch


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


def _decays(name: str, param: nn.Parameter) -> bool:
    """Weight decay on matrices only: none on biases, norms, 1-D params or the logit scale."""
    return not (param.ndim < 2 or name.endswith(".bias") or "logit_scale" in name)


def rule_matches(pattern: str, name: str) -> bool:
    """Whether an ``optim.param_groups`` pattern matches the parameter ``name``: an fnmatch
    pattern over the whole name, or a module name (the parameter lies under it)."""
    return fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")


def _rule_of(name: str, rules: Sequence[ParamGroupConfig]) -> int | None:
    return next((i for i, rule in enumerate(rules) if rule_matches(rule.pattern, name)), None)


def apply_param_rules(model: nn.Module, rules: Sequence[ParamGroupConfig]) -> dict[int, int]:
    """Freeze the parameters a ``frozen`` rule matches (``requires_grad=False``); return how
    many parameters each rule decides (rule index -> count).

    Raises:
        ConfigError: for a rule that matches no parameter (a typo would silently do nothing).
    """
    counts = dict.fromkeys(range(len(rules)), 0)
    for name, param in model.named_parameters():
        i = _rule_of(name, rules)
        if i is None:
            continue
        counts[i] += 1
        if rules[i].frozen:
            param.requires_grad_(False)
    for i, n in counts.items():
        if n == 0:
            raise ConfigError(
                f"config key 'optim.param_groups[{i}].pattern': {rules[i].pattern!r} matches no "
                f"parameter of the model (names look like "
                f"{next(iter(dict(model.named_parameters())), '?')!r})"
            )
    return counts


def param_groups(
    model: nn.Module,
    weight_decay: float,
    rules: Sequence[ParamGroupConfig] = (),
    lr: float | None = None,
) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases, norms, 1-D params, logit scale.

    Every parameter of shape (n,) or () — biases, LayerNorm/BatchNorm weights, the (1,)-shaped
    logit scale — lands in a no-decay group; frozen parameters are left out. Without ``rules``
    these are the two groups (decay, no decay). With ``optim.param_groups`` ``rules`` the
    parameters no rule matches come first (those two groups, when not empty), then per rule
    its decay and no-decay groups, with ``lr`` x ``lr_scale`` as their learning rate and the
    rule's weight decay (if it sets one) on its matrices; empty groups are left out.
    """
    groups: dict[tuple[int | None, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = (_rule_of(name, rules), _decays(name, param))
            groups.setdefault(key, []).append(param)
    if not rules:
        return [
            {"params": groups.get((None, True), []), "weight_decay": weight_decay},
            {"params": groups.get((None, False), []), "weight_decay": 0.0},
        ]
    out = []
    for index in [None, *range(len(rules))]:
        rule = rules[index] if index is not None else None
        for decays in (True, False):
            params = groups.get((index, decays))
            if not params:
                continue
            wd = weight_decay if rule is None or rule.weight_decay is None else rule.weight_decay
            group = {"params": params, "weight_decay": wd if decays else 0.0}
            if rule is not None and lr is not None:
                group["lr"] = lr * rule.lr_scale
            out.append(group)
    return out


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with the configured betas and eps (torch's fused kernel
    with ``optim.fused``); the parameters that ``optim.param_groups`` freezes are frozen first
    (:func:`apply_param_rules`)."""
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    rules = list(cfg.param_groups)
    if rules:
        apply_param_rules(model, rules)
    groups = param_groups(model, cfg.weight_decay, rules, cfg.lr)
    if cfg.fused:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)


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
    """Per-step LambdaLR implementing :func:`lr_factor` for this run's length (each group's
    learning rate, ``optim.param_groups``' scaled ones too, follows the same factor)."""
    warmup = max(1, round(cfg.warmup_epochs * steps_per_epoch)) if cfg.warmup_epochs > 0 else 0
    warmup = min(warmup, total_steps)
    min_ratio = cfg.min_lr / cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total_steps, min_ratio)
    )
