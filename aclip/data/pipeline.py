"""Training data: webdataset shards -> A-CLIP views + caption tokens, batched.

A spec names one or more sources joined with `::`, each a brace pattern of tar shards, e.g.
`/data/yfcc/{00000..01499}.tar::/data/cc3m/{00000..00331}.tar`. Sources are mixed with weights.

Reproducibility: every random choice (shard order, sample shuffle, source mixing, views) is drawn
from RNGs seeded by (seed, epoch, rank, worker), so with the same seed, epoch, world size and
number of workers the batches are identical, and a new epoch reorders and re-augments.
"""

from __future__ import annotations

import io
import json
import logging
import random
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

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


def samples_per_epoch(spec: str) -> int | None:
    """Total samples over all shards of `spec` (img2dataset stats or sizes.json); None if any
    shard's count is unknown."""
    total = 0
    for url in (u for source in expand_urls(spec) for u in source):
        n = _shard_count(url)
        if n is None:
            return None
        total += n
    return total


def skipped_samples() -> int:
    """Number of bad samples skipped so far in this process (workers count separately)."""
    return _skipped["count"]


def skip_and_count(exn: Exception) -> bool:
    """webdataset handler: log the bad sample (first 20, then every 1000th), count, continue.

    Unlike `wds.warn_and_continue` it does not sleep 0.5 s per bad sample.
    """
    _skipped["count"] += 1
    n = _skipped["count"]
    if n <= 20 or n % 1000 == 0:
        log.warning("skipping bad sample #%d: %r", n, exn)
    return True


def _derive_seed(*parts: int | str) -> int:
    """Stable 63-bit seed from ints/strings (independent of PYTHONHASHSEED)."""
    return zlib.crc32(repr(parts).encode()) * 2654435761 % (2**63)


def _worker_seed(seed: int, epoch: int, tag: str) -> int:
    rank, _, worker, _ = pytorch_worker_info()
    return _derive_seed(seed, epoch, rank, worker, tag)


def _source(urls: list[str], resampled: bool, seed: int, epoch: int) -> wds.DataPipeline:
    """Samples of one source: shard list split by node and worker, tar -> dict samples."""
    if resampled:  # each rank/worker draws its own shard stream (seeded by rank*1000+worker)
        shards = [wds.ResampledShards(urls, seed=_derive_seed(seed, epoch), deterministic=True)]
    else:  # same permutation on all ranks, then disjoint slices per rank and worker
        shards = [wds.SimpleShardList(urls, seed=_derive_seed(seed, epoch)), wds.split_by_node]
        shards.append(wds.split_by_worker)
    return wds.DataPipeline(*shards, wds.tarfile_to_samples(handler=skip_and_count))


class _WeightedMix(torch.utils.data.IterableDataset):
    """Draw each sample from source i with probability weights[i]; stop when one runs dry.

    Like `wds.RandomMix`, but with a seeded per-worker RNG (RandomMix uses the global one).
    """

    def __init__(self, sources: list, weights: Sequence[float], seed: int, epoch: int) -> None:
        self.sources, self.weights, self.seed, self.epoch = sources, list(weights), seed, epoch

    def __iter__(self) -> Iterator[dict]:
        rng = random.Random(_worker_seed(self.seed, self.epoch, "mix"))
        its = [iter(s) for s in self.sources]
        while True:
            i = rng.choices(range(len(its)), weights=self.weights)[0]
            try:
                yield next(its[i])
            except StopIteration:
                return


class _Shuffle:
    """Buffer shuffle stage with a per-worker seeded RNG (a class so that it pickles)."""

    def __init__(self, bufsize: int, seed: int, epoch: int) -> None:
        self.bufsize, self.seed, self.epoch = bufsize, seed, epoch

    def __call__(self, src: Iterator) -> Iterator:
        rng = random.Random(_worker_seed(self.seed, self.epoch, "shuffle"))
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


def decode_sample(sample: dict) -> tuple[Image.Image, str, str]:
    """Raw webdataset sample -> (RGB PIL image, caption, sample id). Raises on bad samples."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None or "txt" not in sample:
        raise ValueError(f"sample {sample.get('__key__')} lacks an image or a caption")
    caption = sample["txt"].decode("utf-8", errors="replace").strip()
    if not caption:
        raise ValueError(f"sample {sample.get('__key__')} has an empty caption")
    with Image.open(io.BytesIO(sample[ext])) as img:
        img.load()
        rgb = to_rgb(img)
    return rgb, caption, f"{sample.get('__url__', '')}/{sample['__key__']}"


class SampleTransform:
    """Raw sample -> {"views", "ema", "boxes", "tokens"}.

    The views draw from a private torch RNG stream seeded by (seed, epoch, rank, worker),
    swapped in around each call so the process's global RNG is left untouched.
    """

    def __init__(self, views: ACLIPViews, tokenizer: Tokenizer, seed: int, epoch: int) -> None:
        self.views, self.tokenizer, self.seed, self.epoch = views, tokenizer, seed, epoch
        self._rng_state: torch.Tensor | None = None

    def _views(self, img: Image.Image) -> dict[str, torch.Tensor]:
        cpu_rng = torch.default_generator
        saved = cpu_rng.get_state()
        if self._rng_state is None:
            cpu_rng.manual_seed(_worker_seed(self.seed, self.epoch, "views"))
        else:
            cpu_rng.set_state(self._rng_state)
        try:
            return self.views(img)
        finally:
            self._rng_state = cpu_rng.get_state()
            cpu_rng.set_state(saved)

    def __call__(self, sample: dict) -> dict[str, torch.Tensor]:
        img, caption, _ = decode_sample(sample)
        out = self._views(img)
        out["tokens"] = self.tokenizer([caption])[0].long()
        return out


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-sample dicts of tensors into a batch dict (webdataset's `__key__` dropped)."""
    keys = [k for k in samples[0] if not k.startswith("__")]
    return {k: torch.stack([s[k] for s in samples]) for k in keys}


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
) -> wds.WebLoader:
    """Loader of dict batches `views` [B,V,3,S,S], `ema` [B,3,S,S], `boxes` [B,V,4],
    `tokens` [B,L] long, from the shards in `spec` (sources joined by `::`).

    With `resampled=True` shards are drawn with replacement and the stream never ends (the
    trainer decides the number of steps); otherwise each epoch walks every shard once, split
    disjointly by rank and worker. Bad samples are skipped and counted (`skip_and_count`).
    Only full batches are yielded. Build a new loader for each epoch (pass `epoch`): the
    stream's seeds are fixed at construction.
    """
    sources = expand_urls(spec)
    if weights is not None and len(weights) != len(sources):
        raise ValueError(f"{len(weights)} weights for {len(sources)} sources in {spec!r}")
    pipes = [_source(urls, resampled, seed, epoch) for urls in sources]
    if len(pipes) == 1:
        head = pipes[0]
    else:
        head = _WeightedMix(pipes, weights or [1.0] * len(pipes), seed, epoch)
    pipeline = wds.DataPipeline(
        head,
        _Shuffle(max(1, shuffle_buffer), seed, epoch),
        wds.map(SampleTransform(views, tokenizer, seed, epoch), handler=skip_and_count),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    )
    return wds.WebLoader(
        pipeline,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers > 0 else None,
    )
