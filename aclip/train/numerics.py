"""Non-finite losses and gradients: the step is skipped on every rank alike, K in a row stop.

A skipped step changes nothing that an applied step would: weights, optimizer moments, LR
schedule, EMA teacher, step counter and the student's buffers (BatchNorm running statistics,
which the forward pass updates and the EMA teacher copies) are left as they were; the next batch
is used instead. Where DeepSpeed's optimizer checks the gradients itself (ZeRO 1/2, bf16, fp16)
the decision adds nothing to its check; with a plain fp32 optimizer (ZeRO 0) it costs one small
all-reduce and one host sync per step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from aclip import distributed as dist_utils


class NonFiniteLoss(RuntimeError):
    """Too many steps in a row had a NaN/Inf loss or gradient; the last good state was saved."""


def nonfinite_anywhere(values: torch.Tensor) -> list[bool]:
    """For each element of ``values``: whether it is NaN or Inf on any rank.

    One all-reduce of a few flags and one host sync; every rank gets the same answer.
    """
    flags = (~torch.isfinite(values.detach().float().reshape(-1))).float()
    return [mean > 0 for mean in dist_utils.all_reduce_mean(flags).tolist()]


def grad_norm_sum(params: Iterable[nn.Parameter], device: torch.device) -> torch.Tensor:
    """Sum of the per-tensor gradient norms (NaN/Inf iff some gradient is), fused (foreach)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    return torch.stack([n.float() for n in torch._foreach_norm(grads)]).sum()


_ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps")


def engine_counters(engine: Any) -> dict[str, int]:
    """The DeepSpeed engine's step counters (its `step()` advances them even when it skips)."""
    return {name: getattr(engine, name) for name in _ENGINE_COUNTERS if hasattr(engine, name)}


def set_engine_counters(engine: Any, counters: dict[str, int]) -> None:
    """Put back counters saved by `engine_counters`."""
    for name, value in counters.items():
        setattr(engine, name, value)


class StepGuard:
    """Bookkeeping of skipped steps for one student module.

    `snapshot()` before the forward pass keeps a copy of the module's buffers (small: BatchNorm
    statistics and counters), `restore()` puts them back when the step is skipped. `skipped` is
    the run total, `in_a_row` the current run of consecutive skipped steps, reset by `good()`.
    """

    def __init__(self, module: nn.Module, max_bad_steps: int) -> None:
        self.module = module
        self.max_bad_steps = max(1, max_bad_steps)
        self.skipped = 0
        self.in_a_row = 0
        self.last_skipped = False
        self._saved: list[torch.Tensor] = []

    def snapshot(self) -> None:
        """Copy the module's buffers (reusing the copies of the last call)."""
        buffers = list(self.module.buffers())
        same = len(buffers) == len(self._saved) and all(
            b.shape == s.shape and b.dtype == s.dtype
            for b, s in zip(buffers, self._saved, strict=True)
        )
        if not same:
            self._saved = [b.detach().clone() for b in buffers]
        elif buffers:
            torch._foreach_copy_(self._saved, [b.detach() for b in buffers])

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the buffers saved by the last `snapshot()`."""
        buffers = list(self.module.buffers())
        if buffers and len(buffers) == len(self._saved):
            torch._foreach_copy_(buffers, self._saved)

    def good(self) -> None:
        """An applied step: the run of bad steps ends."""
        self.in_a_row, self.last_skipped = 0, False

    def bad(self) -> bool:
        """A skipped step; True when it makes `max_bad_steps` in a row (time to stop)."""
        self.skipped += 1
        self.in_a_row += 1
        self.last_skipped = True
        return self.in_a_row >= self.max_bad_steps


def apply_step(engine: Any, model: nn.Module, losses: Iterable[Any]) -> tuple[Any, str]:
    """Backward of each micro-batch's loss (``losses``: StepLoss objects, one per micro-batch,
    computed lazily) and one optimizer step, unless the loss or a gradient is NaN/Inf on any rank.

    Returns the last micro-batch's loss and "" when the step was applied, else "loss" or
    "gradients". DeepSpeed's own optimizers (ZeRO 1/2, bf16, fp16) find non-finite gradients
    themselves (global grad norm and overflow flag, all-reduced: every rank skips alike) and a
    NaN/Inf loss makes NaN gradients, so the step adds no host sync of its own; only a skipped
    step asks (all ranks together) whether the loss was at fault. A plain fp32 optimizer (ZeRO 0)
    has no such check: loss and gradients (all-reduced in backward) are checked together before
    stepping (one sync). Gradients of the micro-batches add up (no division by their number:
    each micro-batch's loss is the whole batch's, see aclip.train.accumulation); DeepSpeed steps the
    optimizer at the last one.
    """
    counters = engine_counters(engine)
    last = None
    for loss in losses:
        if last is not None:
            engine.step()  # between micro-batches: DeepSpeed only counts it
        engine.backward(loss.total, scale_wrt_gas=False)
        last = loss
    if hasattr(engine.optimizer, "overflow"):
        engine.step()
        if engine.was_step_applied():
            return last, ""
        set_engine_counters(engine, counters)  # a skipped step is not a step
        return last, "loss" if nonfinite_anywhere(last.total)[0] else "gradients"
    grads = grad_norm_sum(model.parameters(), last.total.device)
    checked = torch.stack([last.total.detach().float(), grads])
    bad_loss, bad_grads = nonfinite_anywhere(checked)
    if bad_loss or bad_grads:
        engine.zero_grad()
        set_engine_counters(engine, counters)
        return last, "loss" if bad_loss else "gradients"
    engine.step()
    return last, ""
