"""Bad samples: the reasons they are skipped or converted, counting them in the loader workers,
folding and logging the counts in the main process, and the limit on how many may be bad."""

from __future__ import annotations

import logging
import tarfile
from collections import deque
from collections.abc import Iterable, Iterator, Mapping

import torch

from aclip.data.workers import logical_worker

log = logging.getLogger(__name__)
_skipped = {"count": 0}

# Fixed layouts of the per-worker count tensor `batch["skipped"]`: skip reasons, then conversions.
SKIP_REASONS: tuple[str, ...] = (
    "corrupt_image",  # image bytes PIL cannot decode (bad or truncated JPEG/PNG ...)
    "empty_image",  # zero-byte image member
    "no_image",  # sample without any image member (e.g. a member lost to a cut tar)
    "no_caption",  # sample without a `.txt` member
    "empty_caption",  # caption empty, whitespace only, or of no token (NULs, control chars)
    "too_large",  # more than MAX_DECODE_PIXELS and not reducible at decode time
    "too_small",  # shorter side below MIN_IMAGE_SIDE
    "bad_tar",  # shard not a tar, or cut in the middle (the rest of the shard is lost)
    "missing_shard",  # shard path missing or unreadable
    "bad_mask",  # region mask unusable: undecodable RLE/PNG, wrong size, empty, bad region entry
    "other",  # any other error while making views / tokens
)
CONVERT_REASONS: tuple[str, ...] = (
    "caption_not_utf8",  # caption decoded with U+FFFD replacements and kept
    "mode_converted",  # non-RGB image (L, LA, P, RGBA, CMYK, I;16, ...) converted to RGB
    "reduced_large",  # huge JPEG decoded at 1/2, 1/4 or 1/8 scale (PIL draft mode)
)
COUNT_KEYS: tuple[str, ...] = SKIP_REASONS + CONVERT_REASONS
RECENT_BAD_URLS = 4  # shards of the last skipped samples kept per worker for error messages
LOGGED_SKIPS = 20  # the first this many skipped samples are logged one by one, then every 1000th


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
    """A stream can make no progress: many shard reads in a row of a resampled stream gave no
    (good) sample, or a fresh loader yielded not one batch."""


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
