"""Training data: webdataset shards -> A-CLIP views + caption tokens, batched.

A spec names one or more sources joined with `::`, each a brace pattern of tar shards, e.g.
`/data/yfcc/{00000..01499}.tar::/data/cc3m/{00000..00331}.tar`. Sources are mixed with weights.

Reproducibility: every random choice (shard order, sample shuffle, source mixing, views) is drawn
from RNGs seeded by (seed, epoch, rank, worker), so with the same seed, epoch, world size and
number of workers the batches are identical, and a new epoch reorders and re-augments. A sample's
views are seeded by its position in its worker's stream, so a loader rebuilt from a
`LoaderPosition` skips the samples already consumed unread and goes on exactly (exact resume).
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import signal
import tarfile
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from webdataset.utils import pytorch_worker_info

from aclip.data.views import ACLIPViews, to_rgb

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "png", "jpeg", "webp")
Tokenizer = Callable[[list[str]], torch.Tensor]
_skipped = {"count": 0}


def expand_urls(spec: str) -> list[list[str]]:
    """Split `spec` on `::` into sources and brace-expand each -> one url list per source."""
    sources = [s.strip() for s in spec.split("::") if s.strip()]
    if not sources:
        raise ValueError(f"empty data spec {spec!r}")
    return [list(braceexpand(s)) for s in sources]


def _shard_count(url: str) -> int | None:
    """Samples in one local shard from `<stem>_stats.json` or `sizes.json`; None if unknown."""
    path = Path(url)
    stats = path.with_name(f"{path.stem}_stats.json")
    if stats.is_file():
        return int(json.loads(stats.read_text())["successes"])
    sizes = path.with_name("sizes.json")
    if sizes.is_file():
        return json.loads(sizes.read_text()).get(path.name)
    return None


class EpochSizeUnknown(ValueError):
    """Some shard of a spec has no sample count (no `_stats.json`, no `sizes.json` entry)."""


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def samples_per_epoch(spec: str) -> int:
    """Total samples over the shards of `spec` that exist, from img2dataset's
    `<shard>_stats.json` or a `sizes.json` beside them (missing shards count 0: the loader
    skips them). Raises `EpochSizeUnknown` naming the shards whose count is unknown
    (remote shards included)."""
    total, unknown = 0, []
    for url in (u for source in expand_urls(spec) for u in source):
        if _is_local(url) and not Path(url).is_file():
            continue
        n = _shard_count(url) if _is_local(url) else None
        if n is None:
            unknown.append(url)
        else:
            total += n
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        listed = ", ".join(unknown[:5]) + more
        raise EpochSizeUnknown(
            f"{len(unknown)} shard(s) have no sample count (no <shard>_stats.json as img2dataset "
            f"writes, no entry in a sizes.json beside them): {listed}"
        )
    return total


# Fixed layouts of the per-worker count tensor `batch["skipped"]`: skip reasons, then conversions.
SKIP_REASONS: tuple[str, ...] = (
    "corrupt_image",  # image bytes PIL cannot decode (bad or truncated JPEG/PNG ...)
    "empty_image",  # zero-byte image member
    "no_image",  # sample without any image member (e.g. a member lost to a cut tar)
    "no_caption",  # sample without a `.txt` member
    "empty_caption",  # caption empty or whitespace only
    "too_large",  # more than MAX_DECODE_PIXELS and not reducible at decode time
    "too_small",  # shorter side below MIN_IMAGE_SIDE
    "bad_tar",  # shard not a tar, or cut in the middle (the rest of the shard is lost)
    "missing_shard",  # shard path missing or unreadable
    "other",  # any other error while making views / tokens
)
CONVERT_REASONS: tuple[str, ...] = (
    "caption_not_utf8",  # caption decoded with U+FFFD replacements and kept
    "mode_converted",  # non-RGB image (L, LA, P, RGBA, CMYK, I;16, ...) converted to RGB
    "reduced_large",  # huge JPEG decoded at 1/2, 1/4 or 1/8 scale (PIL draft mode)
)
COUNT_KEYS: tuple[str, ...] = SKIP_REASONS + CONVERT_REASONS
MAX_DECODE_PIXELS = 32 * 1024 * 1024  # ~100 MB as RGB; larger images are reduced or skipped
MIN_IMAGE_SIDE = 8  # smaller images carry no usable content for 2 random crops: skipped
RECENT_BAD_URLS = 4  # shards of the last skipped samples kept per worker for error messages
LOGGED_SKIPS = 20  # the first this many skipped samples are logged one by one, then every 1000th
# A resampled stream never ends, so a source it cannot read would spin forever: a source raises
# LoaderStalled after max(MIN_STALL_READS, 2 x its shards) shard reads in a row gave no sample,
# and the stream after MIN_STALL_READS..MAX_STALL_READS reads in a row gave no good sample.
MIN_STALL_READS = 16
MAX_STALL_READS = 64


def skip_reasons_text(counts: Mapping[str, int]) -> str:
    """The non-zero skip counts, e.g. "missing_shard=3, bad_tar=1" ("" when there are none)."""
    return ", ".join(f"{k}={counts[k]}" for k in SKIP_REASONS if counts.get(k))


class BadSample(ValueError):
    """A sample that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str, url: str = "") -> None:
        super().__init__(f"{reason}: {message}")
        self.reason, self.url = reason, url


class SkipLimitExceeded(RuntimeError):
    """Too large a fraction of the training samples were bad (see `check_skip_fraction`)."""


class LoaderStalled(RuntimeError):
    """A resampled stream can make no progress: many shard reads in a row gave no (good) sample."""


def skipped_samples() -> int:
    """Number of bad samples skipped so far in this process (workers count separately; use
    `batch["skipped"]` with `SkipCounter` to see theirs)."""
    return _skipped["count"]


def _url_of(exn: Exception) -> str:
    """The shard url webdataset appends to a tar-stage exception's args ('' if none)."""
    if isinstance(exn, BadSample):
        return exn.url
    if isinstance(exn, OSError) and isinstance(exn.filename, str):
        return exn.filename
    last = exn.args[-1] if len(exn.args) > 1 else None
    return last if isinstance(last, str) else ""


def _tar_reason(exn: Exception) -> str | None:
    """Reason for an error of the tar stage; None for a member-level error that webdataset
    reports again for the whole stream (a cut tar raises twice: count it once)."""
    if isinstance(exn, OSError) and not isinstance(exn, tarfile.TarError):
        return "missing_shard"
    return "bad_tar" if _url_of(exn) else None


class SkipStats:
    """Per-loader skip/convert counts; also the webdataset error handler of its stages.

    Each DataLoader worker gets its own pickled copy, so the counts are per worker process;
    they reach the main process as `batch["skipped"]` (cumulative, COUNT_KEYS layout),
    `batch["worker_id"]` and `batch["bad_shards"]` (see `SkipCounter`).
    """

    def __init__(self) -> None:
        self.counts = dict.fromkeys(COUNT_KEYS, 0)
        self.bad_urls: deque[str] = deque(maxlen=RECENT_BAD_URLS)
        self.pending: deque[str] = deque(maxlen=LOGGED_SKIPS)  # skips not yet sent with a batch

    def convert(self, reason: str) -> None:
        """Count a sample that was kept after a conversion (one of CONVERT_REASONS)."""
        self.counts[reason] += 1

    def skip(self, reason: str, url: str, exn: Exception) -> None:
        """Count one skipped sample or shard and remember its shard and what went wrong (sent
        with the next batch; `SkipCounter` logs it when the batch is consumed)."""
        self.counts[reason] += 1
        _skipped["count"] += 1
        if url and url not in self.bad_urls:
            self.bad_urls.append(url)
        self.pending.append(f"{reason}: {exn!r}"[:1000])

    def tar_handler(self, exn: Exception) -> bool:
        """webdataset handler of the shard-reading stage: count and go on to the next shard."""
        reason = _tar_reason(exn)
        if reason is None:
            log.debug("bad tar member: %r", exn)
        else:
            self.skip(reason, _url_of(exn), exn)
        return True

    def __call__(self, exn: Exception) -> bool:
        """webdataset handler of the per-sample stage: count by reason and continue
        (`LoaderStalled` is raised on)."""
        if isinstance(exn, LoaderStalled):
            raise exn
        reason = exn.reason if isinstance(exn, BadSample) else "other"
        self.skip(reason, _url_of(exn), exn)
        return True

    def reasons(self) -> str:
        """The non-zero skip counts of this worker, e.g. "missing_shard=3, bad_tar=1"."""
        return skip_reasons_text(self.counts) or "none"

    def tensor(self) -> torch.Tensor:
        """Cumulative counts as a LongTensor in COUNT_KEYS order."""
        return torch.tensor([self.counts[k] for k in COUNT_KEYS], dtype=torch.long)

    def attach(self, batches: Iterable[dict], offset: int = 0) -> Iterator[dict]:
        """Pipeline stage adding this worker's counts, its (logical) id, recent bad shards and
        what was skipped since its previous batch (`skip_log`) to each batch."""
        worker = torch.tensor(logical_worker(offset)[2], dtype=torch.long)
        for batch in batches:
            batch["skipped"], batch["worker_id"] = self.tensor(), worker
            batch["bad_shards"] = _encode_lines(self.bad_urls)
            batch["skip_log"] = _encode_lines(self.pending)
            self.pending.clear()
            yield batch


def _encode_lines(lines: Iterable[str]) -> torch.Tensor:
    """Lines (urls, messages without newlines) as one uint8 tensor: batches hold only tensors."""
    text = "\n".join(line.replace("\n", " ") for line in lines)
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def _decode_lines(data: torch.Tensor) -> list[str]:
    text = bytes(data.tolist()).decode(errors="replace")
    return [u for u in text.split("\n") if u]


class SkipCounter:
    """Run totals of skip/convert counts from the batches of one or more loaders.

    Each worker sends its cumulative counts with every batch; the total is the max per worker
    (the latest), summed over workers. Call `new_loader()` when a fresh loader (new epoch)
    starts, since its workers count from zero again. The skips a batch reports (`skip_log`) are
    logged here, when the batch is consumed, numbered by the run total: "skipping bad sample
    #N" is the N-th skip the progress bar's `skipped` count includes (the first LOGGED_SKIPS,
    then every 1000th). ``prefix`` starts each line (e.g. the rank).
    """

    def __init__(self, prefix: str = "") -> None:
        self.per_worker: dict[int, torch.Tensor] = {}
        self.base = torch.zeros(len(COUNT_KEYS), dtype=torch.long)
        self.bad_shards: dict[int, list[str]] = {}
        self.prefix = prefix

    def update(self, batch: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Fold one batch's worker counts in, log its skips; return the run totals."""
        if "skipped" in batch:
            before = self.skipped()
            wid = int(batch["worker_id"])
            prev = self.per_worker.get(wid, torch.zeros_like(batch["skipped"]))
            self.per_worker[wid] = torch.maximum(prev, batch["skipped"].cpu())
            if "bad_shards" in batch:
                self.bad_shards[wid] = _decode_lines(batch["bad_shards"])
            if "skip_log" in batch:
                self._log(_decode_lines(batch["skip_log"]), before, self.skipped())
        return self.totals()

    def _log(self, messages: list[str], before: int, after: int) -> None:
        """Log the skips numbered before+1..after (``messages`` are the last of them)."""
        first = after - len(messages) + 1
        for number, message in enumerate(messages, start=first):
            if number > before and (number <= LOGGED_SKIPS or number % 1000 == 0):
                log.warning("%sskipping bad sample #%d (%s)", self.prefix, number, message)
        thousand = after // 1000 * 1000
        if thousand > max(before, LOGGED_SKIPS) and thousand < first:  # its message was dropped
            log.warning("%s%d bad samples skipped so far", self.prefix, thousand)

    def new_loader(self) -> None:
        """Keep the totals so far and start counting a fresh loader's workers from zero."""
        self.base = self.base + sum(self.per_worker.values(), torch.zeros_like(self.base))
        self.per_worker = {}

    def restore(self, totals: Mapping[str, int]) -> None:
        """Start from run totals saved earlier (:meth:`totals`), with no loader counted yet."""
        self.base = torch.tensor([int(totals.get(k, 0)) for k in COUNT_KEYS], dtype=torch.long)
        self.per_worker, self.bad_shards = {}, {}

    def totals(self) -> dict[str, int]:
        """Run totals per reason (COUNT_KEYS)."""
        total = self.base + sum(self.per_worker.values(), torch.zeros_like(self.base))
        return dict(zip(COUNT_KEYS, total.tolist(), strict=True))

    def skipped(self) -> int:
        """Total skipped samples and shards (SKIP_REASONS only, conversions excluded)."""
        totals = self.totals()
        return sum(totals[k] for k in SKIP_REASONS)

    def recent_bad_shards(self) -> list[str]:
        """Shards of the latest skipped samples, over all workers."""
        return sorted({u for urls in self.bad_shards.values() for u in urls})


def check_skip_fraction(
    counts: Mapping[str, int], seen: int, max_fraction: float, shards_hint: Iterable[str] = ()
) -> None:
    """Raise SkipLimitExceeded if skipped / (skipped + seen) > max_fraction.

    `counts` are run totals per reason (conversions are ignored), `seen` the good samples
    delivered so far, `shards_hint` the shards of recent bad samples, named in the message.
    """
    skipped = sum(int(counts.get(k, 0)) for k in SKIP_REASONS)
    total = skipped + seen
    if total == 0 or skipped / total <= max_fraction:
        return
    reasons = skip_reasons_text(counts)
    shards = ", ".join(shards_hint) or "unknown"
    raise SkipLimitExceeded(
        f"{skipped} of {total} training samples were bad ({skipped / total:.1%} > "
        f"{max_fraction:.1%}): {reasons}; recent bad shards: {shards}"
    )


def check_shard_split(
    sources: Sequence[Sequence[str]], world_size: int, num_workers: int, resampled: bool
) -> None:
    """Refuse a finite stream (`resampled=False`) in which a rank or loader worker would get no
    shard of some source: each source's shards are split over world_size x workers, and a rank
    left without data would hang the others at their next collective. Raises ValueError."""
    if resampled:
        return
    workers = max(1, num_workers)
    need = world_size * workers
    for i, urls in enumerate(sources):
        if len(urls) >= need:
            continue
        fix = f"data.workers <= {len(urls) // world_size}, " if len(urls) >= world_size else ""
        raise ValueError(
            f"source {i + 1} of the training data ({urls[0]} ...) has {len(urls)} shard(s), but "
            f"with data.resampled=false they are split over {world_size} rank(s) x {workers} "
            f"loader worker(s) = {need}: some would get no shard. Use data.resampled=true, "
            f"{fix}or split the data into at least {need} shards"
        )


def _derive_seed(*parts: int | str) -> int:
    """Stable 63-bit seed from ints/strings (independent of PYTHONHASHSEED)."""
    return zlib.crc32(repr(parts).encode()) * 2654435761 % (2**63)


def logical_worker(offset: int = 0) -> tuple[int, int, int, int]:
    """(rank, world_size, worker, num_workers) with the worker id rotated by ``offset``.

    A resumed loader renumbers its workers so that its first worker continues the stream of
    the worker whose batch was due next when the checkpoint was taken (see `LoaderPosition`).
    """
    rank, world, worker, num_workers = pytorch_worker_info()
    return rank, world, (worker + offset) % max(1, num_workers), num_workers


def _worker_seed(seed: int, epoch: int, tag: str, offset: int = 0) -> int:
    rank, _, worker, _ = logical_worker(offset)
    return _derive_seed(seed, epoch, rank, worker, tag)


class _SplitByWorker:
    """Every `num_workers`-th shard from this logical worker's index on (a class: it pickles)."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def __call__(self, src: Iterable) -> Iterator:
        _, _, worker, num_workers = logical_worker(self.offset)
        for i, item in enumerate(src):
            if i % max(1, num_workers) == worker:
                yield item


class _ResampledShards(torch.utils.data.IterableDataset):
    """Shards drawn with replacement, forever, from an RNG seeded by (seed, epoch, rank,
    logical worker) (webdataset's ResampledShards seeds by the physical worker)."""

    def __init__(self, urls: list[str], seed: int, epoch: int, offset: int) -> None:
        self.urls, self.seed, self.epoch, self.offset = urls, seed, epoch, offset

    def __iter__(self) -> Iterator[dict[str, str]]:
        rng = random.Random(_worker_seed(self.seed, self.epoch, "shards", self.offset))
        while True:
            yield {"url": self.urls[rng.randrange(len(self.urls))]}


class _Position:
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


class _ShardRun:
    """Stall guard of one resampled source (stages around its tar reader).

    `shards` counts the shard reads and raises LoaderStalled when `limit` reads in a row gave
    no sample (every shard missing or unreadable: the stream would spin forever); `samples`
    ends the run and tags each sample with its read (`__read__`) for `_GoodSampleGuard`.
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


class _GoodSampleGuard:
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
    read = wds.tarfile_to_samples(handler=stats.tar_handler)
    if resampled:  # each rank/worker draws its own shard stream; guarded against spinning
        run = _ShardRun(index, urls, stats)
        return wds.DataPipeline(_ResampledShards(urls, seed, epoch, offset), run.shards, read,
                                run.samples)  # fmt: skip
    # same permutation on all ranks, then disjoint slices per rank and worker
    shards = wds.SimpleShardList(urls, seed=_derive_seed(seed, epoch))
    return wds.DataPipeline(shards, wds.split_by_node, _SplitByWorker(offset), read)


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
        rng = random.Random(_worker_seed(self.seed, self.epoch, "mix", self.offset))
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
        rng = random.Random(_worker_seed(self.seed, self.epoch, "shuffle", self.offset))
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


def _caption(sample: dict, url: str, stats: SkipStats | None) -> str:
    """The sample's caption. Non-UTF-8 bytes are decoded with U+FFFD replacements and the
    sample is kept (counted as "caption_not_utf8"); a missing or blank caption is skipped."""
    raw = sample.get("txt")
    if raw is None:
        raise BadSample("no_caption", f"sample {sample.get('__key__')} has no caption", url)
    try:
        caption = raw.decode("utf-8")
    except UnicodeDecodeError:
        caption = raw.decode("utf-8", errors="replace")
        if stats is not None:
            stats.convert("caption_not_utf8")
    caption = caption.strip()
    if not caption:
        raise BadSample(
            "empty_caption", f"sample {sample.get('__key__')} has an empty caption", url
        )
    return caption


def _open_image(data: bytes, key: str, url: str) -> Image.Image:
    """Read the image header (no pixel decode). PIL's decompression-bomb warning is silenced
    (our own MAX_DECODE_PIXELS guard applies) and its error becomes a "too_large" skip."""
    if not data:
        raise BadSample("empty_image", f"sample {key} has a zero-byte image", url)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exn:
        raise BadSample("too_large", f"sample {key}: {exn}", url) from exn
    except Exception as exn:
        raise BadSample("corrupt_image", f"sample {key}: {exn!r}", url) from exn


def _check_size(img: Image.Image, key: str, url: str, stats: SkipStats | None) -> None:
    """Skip tiny images; decode huge JPEGs reduced (draft) to at most MAX_DECODE_PIXELS and
    skip other huge images before their pixels are decoded."""
    w, h = img.size
    if min(w, h) < MIN_IMAGE_SIDE:
        raise BadSample("too_small", f"sample {key} is {w}x{h} (< {MIN_IMAGE_SIDE})", url)
    if w * h <= MAX_DECODE_PIXELS:
        return
    if img.format == "JPEG":
        # draft picks the smallest 1/2^k scale keeping each side >= the request, so asking for
        # half the target scale gives at most the target pixel count.
        scale = math.sqrt(MAX_DECODE_PIXELS / (w * h)) / 2
        img.draft(None, (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))))
        if img.size[0] * img.size[1] <= MAX_DECODE_PIXELS:
            if stats is not None:
                stats.convert("reduced_large")
            return
    raise BadSample("too_large", f"sample {key} is {w}x{h} (> {MAX_DECODE_PIXELS} px)", url)


def _decode_image(sample: dict, url: str, stats: SkipStats | None) -> Image.Image:
    """The sample's image as 8-bit RGB; non-RGB modes are converted (counted)."""
    key = str(sample.get("__key__"))
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise BadSample("no_image", f"sample {key} has no image", url)
    with _open_image(sample[ext], key, url) as img:
        _check_size(img, key, url, stats)
        try:
            img.load()
        except Exception as exn:
            raise BadSample("corrupt_image", f"sample {key}: {exn!r}", url) from exn
        if img.mode != "RGB" and stats is not None:
            stats.convert("mode_converted")
        rgb = to_rgb(img)
        if rgb is img:
            rgb = img.copy()  # the context manager closes `img`
    return rgb


def decode_sample(sample: dict, stats: SkipStats | None = None) -> tuple[Image.Image, str, str]:
    """Raw webdataset sample -> (RGB PIL image, caption, sample id).

    Raises `BadSample` (reason in SKIP_REASONS) on unusable samples; conversions (non-RGB
    image, reduced huge JPEG, non-UTF-8 caption) are counted in `stats` if given.
    """
    url = str(sample.get("__url__", ""))
    caption = _caption(sample, url, stats)
    rgb = _decode_image(sample, url, stats)
    return rgb, caption, f"{url}/{sample.get('__key__')}"


class SampleTransform:
    """Raw sample -> {"views", "ema", "boxes", "tokens", "data_pos"}.

    The views of the sample at stream position n (`__pos__`, set by the loader) draw from torch's
    CPU RNG seeded by (seed, epoch, rank, worker, n), swapped in around the call so the
    process's global RNG is left untouched: a sample's views do not depend on the samples before
    it, so a resumed loader can drop those unread. Without `__pos__` calls are numbered in order.
    """

    def __init__(
        self,
        views: ACLIPViews,
        tokenizer: Tokenizer,
        seed: int,
        epoch: int,
        stats: SkipStats | None = None,
        offset: int = 0,
    ) -> None:
        self.views, self.tokenizer, self.seed, self.epoch = views, tokenizer, seed, epoch
        self.stats, self.offset = stats, offset
        self._calls = 0

    def _views(self, img: Image.Image, pos: int) -> dict[str, torch.Tensor]:
        cpu_rng = torch.default_generator
        saved = cpu_rng.get_state()
        cpu_rng.manual_seed(_worker_seed(self.seed, self.epoch, f"views{pos}", self.offset))
        try:
            return self.views(img)
        finally:
            cpu_rng.set_state(saved)

    def __call__(self, sample: dict) -> dict[str, torch.Tensor]:
        pos = int(sample.get("__pos__", self._calls))
        self._calls += 1
        img, caption, _ = decode_sample(sample, self.stats)
        out = self._views(img, pos)
        out["tokens"] = self.tokenizer([caption])[0].long()
        out["data_pos"] = torch.tensor(pos, dtype=torch.long)
        return out


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-sample dicts of tensors into a batch dict (webdataset's `__key__` dropped)."""
    keys = [k for k in samples[0] if not k.startswith("__")]
    return {k: torch.stack([s[k] for s in samples]) for k in keys}


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


WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _worker_init(_: int) -> None:
    """Loader workers leave the stop signals to the main process: SIGTERM, SIGUSR1 and SIGINT
    are ignored here (``timeout``, ``scancel`` and Ctrl-C signal the whole process group, workers
    included; the main process checkpoints and stops). A worker whose main process is gone exits
    by itself (PyTorch's worker watchdog)."""
    for sig in WORKER_IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _guarded(
    transform: SampleTransform, sources: list[list[str]], resampled: bool, stats: SkipStats
) -> Callable[[dict], dict]:
    """The sample transform, guarded against spinning when the stream is resampled."""
    if not resampled:
        return transform
    limit = max(MIN_STALL_READS, min(2 * sum(len(u) for u in sources), MAX_STALL_READS))
    return _GoodSampleGuard(transform, limit, stats)


def build_train_loader(
    spec: str,
    tokenizer: Tokenizer,
    views: ACLIPViews,
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
    transform = _guarded(
        SampleTransform(views, tokenizer, seed, epoch, stats, off), sources, resampled, stats
    )
    if len(pipes) == 1:
        head = pipes[0]
    else:
        head = _WeightedMix(pipes, weights or [1.0] * len(pipes), seed, epoch, off)
    pipeline = wds.DataPipeline(
        head,
        _Shuffle(max(1, shuffle_buffer), seed, epoch, off),
        _Position(start, off),
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
        worker_init_fn=_worker_init if num_workers > 0 else None,
    )
    loader.skip_stats = stats  # live counts with num_workers=0; workers count in their copies
    return loader
