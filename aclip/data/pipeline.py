"""The training loader: webdataset shards -> per-sample views + caption tokens, batched.

The stages live beside this file: `shards` (specs, counts, splits), `workers` (worker ids,
seeds, signals, stall guards), `decode` and `skips` (bad samples), `position` (stream position),
`transform` (sample transform, collation); `stream` keeps one rank's stream across loaders.

Reproducibility: every random choice (shard order, sample shuffle, source mixing, views) is drawn
from RNGs seeded by (seed, epoch, rank, worker), so with the same seed, epoch, world size and
number of workers the batches are identical, and a new epoch reorders and re-augments. A sample's
views are seeded by its position in its worker's stream, so a loader rebuilt from a
`LoaderPosition` skips the samples already consumed unread and goes on exactly (exact resume).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from functools import partial

import torch
import webdataset as wds
from webdataset.utils import pytorch_worker_info

from aclip.data.position import PositionStage
from aclip.data.shards import check_shard_split, expand_urls
from aclip.data.skips import SkipStats
from aclip.data.stall import ShardRun, guard_stalls
from aclip.data.tars import tarfile_to_samples
from aclip.data.transform import SampleTransform, Tokenizer, Views, collate
from aclip.data.workers import (
    ResampledShards,
    SplitByWorker,
    derive_seed,
    end_workers_at_exit,
    worker_init,
    worker_seed,
)


def _source(
    index: int,
    urls: list[str],
    resampled: bool,
    seed: int,
    epoch: int,
    stats: SkipStats,
    offset: int,
) -> wds.DataPipeline:
    """Samples of one source: shard list split by node and worker, tar -> dict samples."""
    read = tarfile_to_samples(handler=stats.tar_handler)
    if resampled:  # each rank/worker draws its own shard stream; guarded against spinning
        run = ShardRun(index, urls, stats)
        return wds.DataPipeline(ResampledShards(urls, seed, epoch, offset), run.shards, read,
                                run.samples)  # fmt: skip
    # same permutation on all ranks, then disjoint slices per rank and worker
    shards = wds.SimpleShardList(urls, seed=derive_seed(seed, epoch))
    return wds.DataPipeline(shards, wds.split_by_node, SplitByWorker(offset), read)


class _WeightedMix(torch.utils.data.IterableDataset):
    """Draw each sample from source i with probability weights[i]; stop when one runs dry.

    Like `wds.RandomMix`, but with a seeded per-worker RNG (RandomMix uses the global one).
    """

    def __init__(
        self, sources: list, weights: Sequence[float], seed: int, epoch: int, offset: int
    ) -> None:
        self.sources, self.weights, self.seed, self.epoch = sources, list(weights), seed, epoch
        self.offset = offset

    def __iter__(self) -> Iterator[dict]:
        rng = random.Random(worker_seed(self.seed, self.epoch, "mix", self.offset))
        its = [iter(s) for s in self.sources]
        while True:
            i = rng.choices(range(len(its)), weights=self.weights)[0]
            try:
                yield next(its[i])
            except StopIteration:
                return


class _Shuffle:
    """Buffer shuffle stage with a per-worker seeded RNG (a class so that it pickles)."""

    def __init__(self, bufsize: int, seed: int, epoch: int, offset: int) -> None:
        self.bufsize, self.seed, self.epoch, self.offset = bufsize, seed, epoch, offset

    def __call__(self, src: Iterator) -> Iterator:
        rng = random.Random(worker_seed(self.seed, self.epoch, "shuffle", self.offset))
        buf: list = []
        for sample in src:
            if len(buf) < self.bufsize:
                buf.append(sample)
                continue
            k = rng.randrange(self.bufsize)
            buf[k], sample = sample, buf[k]
            yield sample
        rng.shuffle(buf)
        yield from buf


def build_train_loader(
    spec: str,
    tokenizer: Tokenizer,
    views: Views,
    batch_size: int,
    num_workers: int,
    *,
    weights: list[float] | None = None,
    resampled: bool = True,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    epoch: int = 0,
    start: Mapping[int, int] | None = None,
    worker_offset: int = 0,
) -> wds.WebLoader:
    """Loader of dict batches `views` [B,V,3,S,S], `ema` [B,3,S,S], `boxes` [B,V,4],
    `tokens` [B,L] long, from the shards in `spec` (sources joined by `::`).

    With `resampled=True` shards are drawn with replacement and the stream never ends (the
    trainer decides the number of steps); otherwise each epoch walks every shard once, split
    disjointly by rank and worker. Bad samples and shards are skipped and counted by reason
    (SKIP_REASONS; conversions in CONVERT_REASONS): each batch also carries its worker's
    cumulative counts `skipped` [len(COUNT_KEYS)] long, `worker_id` [] long and `bad_shards`
    (uint8, newline-joined urls of recent bad shards); fold them with `SkipCounter`. Counts
    made after a worker's last full batch never reach the main process (with num_workers=0
    read `loader.skip_stats.counts` instead) (only matters for finite streams). The loader
    never hangs on bad data: with `resampled=False` a source with fewer shards than ranks x
    workers is refused here (ValueError); with `resampled=True` a worker raises
    `LoaderStalled` when max(MIN_STALL_READS, 2 x its shards) reads in a row of one source gave
    no sample, or when up to MAX_STALL_READS reads in a row gave no good sample.
    Only full batches are yielded. Build a new loader for each epoch (pass `epoch`): the
    stream's seeds are fixed at construction. Each batch also carries `data_pos` [B] long, the
    samples' positions in their worker's stream; `LoaderPosition` folds them, and its
    `loader_kwargs()` (`epoch`, `start`: samples each logical worker drops unread,
    `worker_offset`) rebuild the loader exactly where it stood (same seed, world size, workers).
    """
    sources = expand_urls(spec)
    if weights is not None and len(weights) != len(sources):
        raise ValueError(f"{len(weights)} weights for {len(sources)} sources in {spec!r}")
    check_shard_split(sources, pytorch_worker_info()[1], num_workers, resampled)
    stats, off = SkipStats(), worker_offset
    pipes = [_source(i, urls, resampled, seed, epoch, stats, off) for i, urls in enumerate(sources)]
    transform = guard_stalls(
        SampleTransform(views, tokenizer, seed, epoch, stats, off), sources, resampled, stats
    )
    if len(pipes) == 1:
        head = pipes[0]
    else:
        head = _WeightedMix(pipes, weights or [1.0] * len(pipes), seed, epoch, off)
    pipeline = wds.DataPipeline(
        head,
        _Shuffle(max(1, shuffle_buffer), seed, epoch, off),
        PositionStage(start, off),
        wds.map(transform, handler=stats),
        wds.batched(batch_size, collation_fn=collate, partial=False),
        partial(stats.attach, offset=off),
    )
    loader = wds.WebLoader(
        pipeline,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=worker_init if num_workers > 0 else None,
    )
    if num_workers > 0:
        end_workers_at_exit()
    loader.skip_stats = stats  # live counts with num_workers=0; workers count in their copies
    return loader
