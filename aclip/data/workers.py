"""Loader workers: who they are (logical ids, seeds), which shards each reads, and the signals
they leave to the main process."""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # noqa: F401  (its exit hook first: ours, registered later, runs before)
import random
import signal
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from webdataset.utils import pytorch_worker_info

WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def derive_seed(*parts: int | str) -> int:
    """Stable 63-bit seed from ints/strings (independent of PYTHONHASHSEED)."""
    return zlib.crc32(repr(parts).encode()) * 2654435761 % (2**63)


def logical_worker(offset: int = 0) -> tuple[int, int, int, int]:
    """(rank, world_size, worker, num_workers) with the worker id rotated by ``offset``.

    A resumed loader renumbers its workers so that its first worker continues the stream of
    the worker whose batch was due next when the checkpoint was taken (see `LoaderPosition`).
    """
    rank, world, worker, num_workers = pytorch_worker_info()
    return rank, world, (worker + offset) % max(1, num_workers), num_workers


def worker_seed(seed: int, epoch: int, tag: str, offset: int = 0) -> int:
    rank, _, worker, _ = logical_worker(offset)
    return derive_seed(seed, epoch, rank, worker, tag)


class SplitByWorker:
    """Every `num_workers`-th shard from this logical worker's index on (a class: it pickles)."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def __call__(self, src: Iterable) -> Iterator:
        _, _, worker, num_workers = logical_worker(self.offset)
        for i, item in enumerate(src):
            if i % max(1, num_workers) == worker:
                yield item


class ResampledShards(torch.utils.data.IterableDataset):
    """Shards drawn with replacement, forever, from an RNG seeded by (seed, epoch, rank,
    logical worker) (webdataset's ResampledShards seeds by the physical worker)."""

    def __init__(self, urls: list[str], seed: int, epoch: int, offset: int) -> None:
        self.urls, self.seed, self.epoch, self.offset = urls, seed, epoch, offset

    def __iter__(self) -> Iterator[dict[str, str]]:
        rng = random.Random(worker_seed(self.seed, self.epoch, "shards", self.offset))
        while True:
            yield {"url": self.urls[rng.randrange(len(self.urls))]}


def worker_init(_: int) -> None:
    """Loader workers leave the stop signals to the main process: SIGTERM, SIGUSR1 and SIGINT
    are ignored here (``timeout``, ``scancel`` and Ctrl-C signal the whole process group, workers
    included; the main process checkpoints and stops). A worker whose main process is gone exits
    by itself (PyTorch's worker watchdog); at the main process's exit, `end_workers_at_exit`
    kills them."""
    for sig in WORKER_IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def end_workers_at_exit() -> None:
    """Make sure the loader workers of this process end when it exits (call once a loader whose
    workers run `worker_init` exists; calling again does nothing).

    The workers ignore SIGTERM, so multiprocessing's own exit hook, which terminates daemonic
    children with SIGTERM and then joins them, would wait forever for the workers of a loader
    still referenced at exit (their watchdog sees the main process alive). This hook, run first
    (registered after multiprocessing's), kills the daemonic children that ignore SIGTERM with
    SIGKILL: the run is over, and a daemonic child is ended at exit anyway.
    """
    global _EXIT_HOOK
    if not _EXIT_HOOK:
        atexit.register(_kill_deaf_daemons)
        _EXIT_HOOK = True


_EXIT_HOOK = False


def ignores_sigterm(pid: int) -> bool:
    """Whether process ``pid`` ignores SIGTERM (Linux: its ``SigIgn`` mask in /proc; True where
    that cannot be read)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    for line in status.splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return True


def _kill_deaf_daemons() -> None:
    deaf = [p for p in multiprocessing.active_children() if p.daemon and ignores_sigterm(p.pid)]
    if not deaf:
        return
    # PyTorch's SIGCHLD handler would report the killed workers as a loader failure
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for proc in deaf:
        proc.kill()
    for proc in deaf:
        proc.join(timeout=5)
