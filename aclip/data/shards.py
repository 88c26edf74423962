"""Shard specs: which tar files a spec names, how many samples they hold, how they split.

A spec names one or more sources joined with `::`, each a brace pattern of tar shards, e.g.
`/data/yfcc/{00000..01499}.tar::/data/cc3m/{00000..00331}.tar`; sources are mixed with
`data.weights`. Empty parts (a trailing `::`) name no source.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from braceexpand import braceexpand


def expand_urls(spec: str) -> list[list[str]]:
    """Split `spec` on `::` into sources and brace-expand each -> one url list per source."""
    sources = [s.strip() for s in spec.split("::") if s.strip()]
    if not sources:
        raise ValueError(
            f"the data spec {spec!r} names no shard (give one or more brace patterns of tar "
            "shards joined with '::', e.g. /data/cc3m/{00000..00331}.tar)"
        )
    return [list(braceexpand(s)) for s in sources]


def source_count(spec: str) -> int:
    """The number of sources in `spec` (what `data.weights` must match)."""
    return len(expand_urls(spec))


# the most samples one shard's count may claim: img2dataset writes ~10^4 per shard, and 10^9
# samples would be a shard of a terabyte or more; a larger count is a damaged or wrong file
MAX_SHARD_SAMPLES = 10**9


class ShardCountError(ValueError):
    """A shard's stats file (or its `sizes.json` entry) is unreadable or holds no valid count."""


def _shard_count(url: str) -> int | None:
    """Samples in one local shard from `<stem>_stats.json` or `sizes.json`; None if unknown.
    Raises `ShardCountError` naming the file when it is not JSON or its count is not an integer
    in [0, MAX_SHARD_SAMPLES]."""
    path = Path(url)
    stats = path.with_name(f"{path.stem}_stats.json")
    if stats.is_file():
        record = _read_json_object(stats)
        if "successes" not in record:
            raise ShardCountError(f"{stats}: no 'successes' count (img2dataset writes one)")
        return _checked_count(record["successes"], f"{stats}: 'successes'")
    sizes = path.with_name("sizes.json")
    if sizes.is_file():
        count = _read_json_object(sizes).get(path.name)
        return None if count is None else _checked_count(count, f"{sizes}: {path.name!r}")
    return None


def _read_json_object(path: Path) -> dict:
    """The JSON object in ``path``; ShardCountError naming the file otherwise."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardCountError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(record, dict):
        raise ShardCountError(f"{path}: not a JSON object (got {type(record).__name__})")
    return record


def _checked_count(value: object, where: str) -> int:
    """``value`` as a shard's sample count: an integer in [0, MAX_SHARD_SAMPLES]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ShardCountError(f"{where} must be a whole number of samples (got {value!r})")
    if not 0 <= value <= MAX_SHARD_SAMPLES:
        raise ShardCountError(
            f"{where} must be between 0 and {MAX_SHARD_SAMPLES:,} samples for one shard "
            f"(got {value:,})"
        )
    return value


class EpochSizeUnknown(ValueError):
    """Some shard of a spec has no sample count (no `_stats.json`, no `sizes.json` entry)."""


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def samples_per_epoch(spec: str) -> int:
    """Total samples over the shards of `spec` that exist, from img2dataset's
    `<shard>_stats.json` or a `sizes.json` beside them (missing shards count 0: the loader
    skips them). Raises `EpochSizeUnknown` naming the shards whose count is unknown
    (remote shards included), `ShardCountError` naming a stats file that holds no valid count."""
    total, unknown = 0, []
    for url in (u for source in expand_urls(spec) for u in source):
        if is_local(url) and not Path(url).is_file():
            continue
        n = _shard_count(url) if is_local(url) else None
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
