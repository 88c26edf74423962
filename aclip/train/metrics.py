"""Training metrics between logging steps: loss sums, time waiting for data, throughput, and the
loader's skip counts, averaged (losses) or summed (counts) over ranks in one all-reduce."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from aclip import distributed as dist_utils
from aclip.data.skips import CONVERT_REASONS, COUNT_KEYS, SKIP_REASONS


class TrainMetrics:
    """Sums of the per-step losses (``keys``) and timings since the last :meth:`flush`."""

    def __init__(self, keys: Sequence[str], world_size: int, device: torch.device) -> None:
        self.keys, self.world_size, self.device = tuple(keys), world_size, device
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.data_wait = self.total_time = 0.0
        self.samples = self.steps = 0

    def add(
        self, losses: Mapping[str, torch.Tensor], wait: float, total: float, batch: int
    ) -> None:
        """One applied step: its detached losses, seconds waiting for data and in all, and this
        rank's batch size."""
        for key in self.keys:
            self.sums[key] = self.sums.get(key, 0) + losses[key]
        self.data_wait += wait
        self.total_time += total
        self.samples += batch * self.world_size
        self.steps += 1

    def flush(self, skip_totals: Mapping[str, int]) -> tuple[dict[str, float], dict[str, int]]:
        """Mean losses over the interval's steps and the ranks, and the skip counts summed over
        ranks (one all-reduce: every rank calls it at the same step); the sums start again."""
        n_steps = max(1, self.steps)
        losses = torch.stack([self.sums[k] for k in self.keys]).float().cpu() / n_steps
        counts = torch.tensor([float(skip_totals[k]) for k in COUNT_KEYS])
        reduced = dist_utils.all_reduce_mean(torch.cat([losses, counts]).to(self.device)).cpu()
        means = dict(zip(self.keys, reduced[: len(self.keys)].tolist(), strict=True))
        summed = (reduced[len(self.keys) :] * self.world_size).round().long().tolist()
        return means, dict(zip(COUNT_KEYS, summed, strict=True))

    def perf_and_data(self, counts_all: Mapping[str, int]) -> dict[str, float]:
        """Throughput and data-wait fraction of the interval, and the data counts (``data/...``);
        then the interval starts again."""
        scalars = {
            "perf/samples_per_s": self.samples / max(self.total_time, 1e-9),
            "perf/data_wait_fraction": self.data_wait / max(self.total_time, 1e-9),
            "data/skipped": float(sum(counts_all[k] for k in SKIP_REASONS)),
            "data/converted": float(sum(counts_all[k] for k in CONVERT_REASONS)),
        } | {f"data/{key}": float(val) for key, val in counts_all.items() if val}
        self._reset()
        return scalars
