"""Where a rank stands in its training stream, and the pipeline stage that numbers samples."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from aclip.data.workers import logical_worker


@dataclass
class LoaderPosition:
    """Where one rank stands in its training stream: enough to rebuild a loader whose next
    batch is the one the uninterrupted loader would have delivered next.

    `epoch` seeds the stream (the trainer uses the samples seen when it was built); per logical
    worker, `next_pos` is the stream position after the last batch consumed from that worker;
    the rebuilt loader's workers drop that many samples unread and are renumbered to start
    with the worker after `last_worker` (DataLoader hands out batches round-robin).
    """

    epoch: int = 0
    num_workers: int = 0
    batches: int = 0
    last_worker: int = -1
    next_pos: dict[int, int] = field(default_factory=dict)

    def update(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Record one consumed batch (needs the loader's `worker_id` and `data_pos`)."""
        worker = int(batch["worker_id"])
        self.last_worker = worker
        self.next_pos[worker] = int(batch["data_pos"].max()) + 1
        self.batches += 1

    def loader_kwargs(self) -> dict[str, Any]:
        """`epoch`, `start` and `worker_offset` for `build_train_loader`."""
        offset = (self.last_worker + 1) % max(1, self.num_workers)
        return {"epoch": self.epoch, "start": dict(self.next_pos), "worker_offset": offset}

    def state_dict(self) -> dict[str, Any]:
        """Plain types, for a checkpoint."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> LoaderPosition:
        """Inverse of `state_dict`."""
        pos = cls(**{k: v for k, v in state.items() if k != "next_pos"})
        pos.next_pos = {int(k): int(v) for k, v in state.get("next_pos", {}).items()}
        return pos


class PositionStage:
    """Numbers the samples of this worker's stream (`__pos__`) and drops the first `start`.

    Dropping happens before any decode, so fast-forwarding a resumed loader costs only the tar
    reads; the views of sample n are drawn from a seed of n, so they do not depend on it.
    """

    def __init__(self, start: Mapping[int, int] | None, offset: int) -> None:
        self.start, self.offset = dict(start or {}), offset

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        skip = self.start.get(logical_worker(self.offset)[2], 0)
        for pos, sample in enumerate(src):
            if pos >= skip:
                sample["__pos__"] = pos
                yield sample
