"""One rank's training stream: batches without end, where they stand, and how to go on from there.

The stream builds its loaders (`build_train_loader`) at its `LoaderPosition`, rebuilds them when a
finite one runs out (the next epoch) or when a new stream is due (`restart`), folds each batch's
stream positions and skip counts as the batch is handed out, and saves and restores all of it
(`state_dict` / `load_state_dict`). A checkpoint of another world size or number of workers cannot
continue sample-exactly: the stream then restarts at the number of samples seen.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from aclip.config import DataConfig
from aclip.data.pipeline import build_train_loader
from aclip.data.position import LoaderPosition
from aclip.data.shards import expand_urls
from aclip.data.skips import LoaderStalled, SkipCounter, check_skip_fraction
from aclip.data.transform import Tokenizer, Views


class TrainStream:
    """This rank's training batches from ``data.train_shards`` (see the module docstring).

    ``views`` is the per-image transform of the training method, ``batch_size`` this rank's part
    of the global batch; ``skip_prefix`` starts each "skipping bad sample" line (the rank).
    """

    def __init__(
        self,
        data: DataConfig,
        tokenizer: Tokenizer,
        views: Views,
        batch_size: int,
        seed: int,
        skip_prefix: str = "",
    ) -> None:
        self.data, self.tokenizer, self.views = data, tokenizer, views
        self.batch_size, self.seed = batch_size, seed
        self.position = LoaderPosition(epoch=0, num_workers=data.workers)
        self.skips = SkipCounter(skip_prefix)
        self._batches: Iterator[dict] | None = None
        self._fresh = True
        self._external: Iterable[dict] | None = None
        self._reading_external = False

    def build_loader(self) -> Iterable[dict]:
        """A loader at the current position: a stream seeded by the samples seen when it began,
        fast-forwarded past the batches already consumed from it."""
        data = self.data
        return build_train_loader(
            data.train_shards,
            self.tokenizer,
            self.views,
            self.batch_size,
            data.workers,
            weights=data.weights,
            resampled=data.resampled,
            shuffle_buffer=data.shuffle_buffer,
            seed=self.seed,
            **self.position.loader_kwargs(),
        )

    def use(self, batches: Iterable[dict]) -> None:
        """Take the next batches from ``batches`` (e.g. a list in tests); when they run out the
        stream goes on with its own loaders."""
        self._external = batches

    def restart(self, samples_seen: int) -> None:
        """Begin a fresh stream here, seeded by ``samples_seen``."""
        self.position = LoaderPosition(epoch=samples_seen, num_workers=self.data.workers)
        self._batches = None

    def close(self) -> None:
        """Drop the current loader now, so that its workers end here rather than whenever the
        garbage collector reaches it (a loader in a reference cycle, collected later, makes
        PyTorch wait ~5 s on each worker that has stopped answering)."""
        self._batches, self._external = None, None

    def at_checkpoint(self, samples_seen: int) -> None:
        """Before a periodic checkpoint: a resampled stream of our own loaders begins afresh here,
        so that resuming from the checkpoint reads no sample twice."""
        if self.data.resampled and not self._reading_external:
            self.restart(samples_seen)

    def next(self, samples_seen: int) -> dict:
        """The next batch; its stream positions and skip counts are folded in. A finite loader
        that runs out is followed by the next epoch's (seeded by ``samples_seen``); one that
        yields nothing at all is an error."""
        while True:
            if self._batches is None:
                self._reading_external = self._external is not None
                source = self._external if self._reading_external else self.build_loader()
                self._batches, self._fresh, self._external = iter(source), True, None
                self.skips.new_loader()
            batch = next(self._batches, None)
            if batch is not None:
                break
            if self._fresh:
                raise LoaderStalled(self._no_batch_message())
            self.restart(samples_seen)  # the next epoch of a finite stream
        self._fresh = False
        if "data_pos" in batch:
            self.position.update(batch)
        self.skips.update(batch)
        return batch

    def _no_batch_message(self) -> str:
        """Why a fresh loader yielded nothing, naming the shards of ``data.train_shards``."""
        spec = self.data.train_shards
        try:
            urls = [u for source in expand_urls(spec) for u in source]
        except ValueError:
            urls = []
        listed = ", ".join(urls[:5]) + (f" and {len(urls) - 5} more" if len(urls) > 5 else "")
        finite = "" if self.data.resampled else ", data.resampled=false"
        return (
            f"the training data yielded no batch: data.train_shards ({spec}{finite}) gave not one "
            f"batch of {self.batch_size} samples from its {len(urls)} shard(s): {listed}. Do "
            "the shards hold samples (an image and a caption each) in readable tar archives?"
        )

    def check_health(self, counts_all: Mapping[str, int], samples_seen: int) -> None:
        """Stop when more than ``data.max_skip_fraction`` of the samples read were bad
        (``counts_all``: run totals summed over ranks), naming recent bad shards."""
        check_skip_fraction(
            counts_all, samples_seen, self.data.max_skip_fraction, self.skips.recent_bad_shards()
        )

    def state_dict(self) -> dict[str, Any]:
        """This rank's position and skip counts, for a checkpoint."""
        return {"data": self.position.state_dict(), "skips": self.skips.totals()}

    def load_state_dict(self, state: Mapping[str, Any] | None, samples_seen: int) -> bool:
        """Go on from a saved state; True when the stream continues sample-exactly. ``None`` (no
        saved state of this rank) or a state saved with another number of workers restarts the
        stream at ``samples_seen`` and returns False (the caller knows about world sizes)."""
        pos = LoaderPosition.from_state(state["data"]) if state else None
        if pos is None or pos.num_workers != self.data.workers:
            self.restart(samples_seen)
            return False
        self.position = pos
        self.skips.restore(state["skips"])
        self._batches = None
        return True
