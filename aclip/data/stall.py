"""Stall guards: a resampled stream never ends, so one over shards it cannot read (or whose
samples are all bad) would spin forever; these stages raise `LoaderStalled` instead.

A source raises after max(MIN_STALL_READS, 2 x its shards) shard reads in a row gave no sample,
and the stream after MIN_STALL_READS..MAX_STALL_READS reads in a row gave no good sample.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator

from aclip.data.decode import IMAGE_EXTS
from aclip.data.skips import RECENT_BAD_URLS, LoaderStalled, SkipStats

MIN_STALL_READS = 16
MAX_STALL_READS = 64


class ShardRun:
    """Stall guard of one resampled source (stages around its tar reader).

    `shards` counts the shard reads and raises LoaderStalled when `limit` reads in a row gave
    no sample (every shard missing or unreadable: the stream would spin forever); `samples`
    ends the run and tags each sample with its read (`__read__`) for `GoodSampleGuard`.
    """

    def __init__(self, index: int, urls: list[str], stats: SkipStats) -> None:
        self.index, self.num_urls, self.stats = index, len(urls), stats
        self.limit = max(MIN_STALL_READS, 2 * len(urls))
        self.reads, self.run = 0, 0
        self.recent: deque[str] = deque(maxlen=RECENT_BAD_URLS)

    def shards(self, src: Iterable[dict]) -> Iterator[dict]:
        for item in src:
            if self.run >= self.limit:
                raise LoaderStalled(
                    f"no sample could be read from {self.run} shards in a row of source "
                    f"{self.index + 1} ({self.num_urls} shards; last tried: "
                    f"{', '.join(self.recent)}); skipped here: {self.stats.reasons()}. "
                    "Are the paths right and the files readable tar archives?"
                )
            self.reads, self.run = self.reads + 1, self.run + 1
            self.recent.append(str(item.get("url")))
            yield item

    def samples(self, src: Iterable[dict]) -> Iterator[dict]:
        for sample in src:
            self.run = 0
            sample["__read__"] = (self.index, self.reads)
            yield sample


class GoodSampleGuard:
    """The sample transform of a resampled stream, raising LoaderStalled when the bad samples
    since the last good one came from `limit` different shard reads (e.g. shards in another
    format: every sample would be skipped and the stream spin forever)."""

    def __init__(self, transform: Callable[[dict], dict], limit: int, stats: SkipStats) -> None:
        self.transform, self.limit, self.stats = transform, limit, stats
        self.bad_reads: set = set()

    def __call__(self, sample: dict) -> dict:
        try:
            out = self.transform(sample)
        except Exception as exn:
            self.bad_reads.add(sample.get("__read__"))
            if len(self.bad_reads) >= self.limit:
                raise LoaderStalled(
                    f"no good sample from {len(self.bad_reads)} shard reads in a row (recent "
                    f"bad shards: {', '.join(self.stats.bad_urls) or 'unknown'}); skipped here: "
                    f"{self.stats.reasons()}; last error: {exn}. Does each sample hold an image "
                    f"({', '.join(IMAGE_EXTS)}) and a .txt caption?"
                ) from exn
            raise
        self.bad_reads.clear()
        return out


def guard_stalls(
    transform: Callable[[dict], dict], sources: list[list[str]], resampled: bool, stats: SkipStats
) -> Callable[[dict], dict]:
    """The sample transform, guarded against spinning when the stream is resampled."""
    if not resampled:
        return transform
    limit = max(MIN_STALL_READS, min(2 * sum(len(u) for u in sources), MAX_STALL_READS))
    return GoodSampleGuard(transform, limit, stats)
