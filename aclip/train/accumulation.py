"""Gradient accumulation that keeps the contrastive batch whole (open_clip's feature cache).

A rank's batch of B samples is split into K micro-batches (``train.accum_freq``). Every
micro-batch first goes through the student without gradients, its outputs cached; then each
micro-batch j goes through again with gradients, and the loss is the whole batch's loss with
micro-batch j's outputs fresh and the others' cached. Its backward gives the whole-batch loss's
gradient through micro-batch j's outputs; over j these sum to the whole batch's gradient. So
InfoNCE and NT-Xent see every sample of the global batch as a negative, and loss and gradients
equal those of one batch of B (exactly in real arithmetic; tests/test_accumulation.py checks
1e-5 in fp32) wherever the student has no statistics across samples.

What the split does change: BatchNorm layers in the student (A-CLIP's SimCLR and BYOL heads)
normalise each micro-batch with its own statistics (over the ranks), as a "ghost" batch norm of
B/K samples per rank; their running statistics are updated in both passes. Outputs shared by
all rows (``Method.whole_outputs``: the logit scale) carry gradients in the first pass only. The
method's
``prepare`` (the teacher's pass, its BYOL target and BatchNorm, token selection) runs once on the
whole batch, so it is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from aclip.config import ConfigError
from aclip.methods.base import Forward, Method, StepLoss


def split_rows(prepared: Mapping[str, Tensor], parts: int) -> list[dict[str, Tensor]]:
    """``prepared`` cut along dim 0 into ``parts`` equal micro-batches (every tensor is per
    sample, or per sample and view in sample-major order, so equal cuts stay aligned)."""
    for key, value in prepared.items():
        if value.shape[0] % parts:
            raise ValueError(f"{key} has {value.shape[0]} rows: not divisible into {parts} parts")
    chunks = {key: value.chunk(parts, dim=0) for key, value in prepared.items()}
    return [{key: chunks[key][i] for key in prepared} for i in range(parts)]


def merge_rows(
    outputs: Sequence[Mapping[str, Tensor]], shared: Mapping[str, Tensor], whole: Sequence[str]
) -> dict[str, Tensor]:
    """The micro-batches' outputs as one batch: concatenated along dim 0, except the ``whole``
    keys (outputs shared by all rows, e.g. the logit scale), taken from ``shared``."""
    return {
        key: shared[key] if key in whole else torch.cat([out[key] for out in outputs], dim=0)
        for key in shared
    }


def micro_losses(
    method: Method, forward: Forward, batch: Mapping[str, Tensor], step: int, parts: int
) -> Iterator[StepLoss]:
    """The losses to back-propagate, one per micro-batch (see the module docstring); a single
    part is the method's ordinary step (``Method.loss``)."""
    if parts == 1:
        yield method.loss(forward, batch, step)
        return
    if type(method).prepare is Method.prepare:
        raise ConfigError(
            f"config key 'train.accum_freq': method {method.name!r} does not split its step into "
            "prepare / forward / loss_from, which gradient accumulation needs"
        )
    prepared = method.prepare(batch, step)
    micro = split_rows(prepared, parts)
    with torch.no_grad():
        cached = [method.forward(forward, part) for part in micro]
    for j, part in enumerate(micro):
        fresh = method.forward(forward, part)
        # an output shared by all rows (the logit scale) takes its gradient in the first pass
        # only: every pass's loss is the whole batch's, so K passes would count it K times
        shared = fresh if j == 0 else cached[j]
        outputs = merge_rows([*cached[:j], fresh, *cached[j + 1 :]], shared, method.whole_outputs)
        yield method.loss_from(outputs, prepared)
