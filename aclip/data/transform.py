"""The per-sample transform (decode, views, tokens, stream position) and batch collation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image

from aclip.data.decode import decode_sample
from aclip.data.skips import BadSample, SkipStats
from aclip.data.workers import worker_seed

Tokenizer = Callable[[list[str]], torch.Tensor]
Views = Callable[[Image.Image], dict[str, torch.Tensor]]


@runtime_checkable
class SampleViews(Protocol):
    """A method's per-sample transform that reads the raw sample's members (e.g. Alpha-CLIP's
    region masks in ``.json`` or ``.mask.png``) and chooses the caption the sample trains with.
    ``SampleTransform`` calls ``from_sample`` instead of ``views(image)`` for such an object,
    under the same seeded RNG; views that are plain callables are called as before."""

    def from_sample(
        self, img: Image.Image, caption: str, sample: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], str]:
        """(tensors of this sample, the caption to tokenize) from the decoded image, the
        sample's caption and its raw members (``BadSample`` to skip it)."""
        ...


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-sample dicts of tensors into a batch dict (webdataset's `__key__` dropped)."""
    keys = [k for k in samples[0] if not k.startswith("__")]
    return {k: torch.stack([s[k] for s in samples]) for k in keys}


class SampleTransform:
    """Raw sample -> {"views", "ema", "boxes", "tokens", "data_pos"} (the views' keys: those of
    the method's views, e.g. Alpha-CLIP's "views", "alpha").

    The views of the sample at stream position n (`__pos__`, set by the loader) draw from torch's
    CPU RNG seeded by (seed, epoch, rank, worker, n), swapped in around the call so the
    process's global RNG is left untouched: a sample's views do not depend on the samples before
    it, so a resumed loader can drop those unread. Without `__pos__` calls are numbered in order.
    """

    def __init__(
        self,
        views: Views,
        tokenizer: Tokenizer,
        seed: int,
        epoch: int,
        stats: SkipStats | None = None,
        offset: int = 0,
    ) -> None:
        self.views, self.tokenizer, self.seed, self.epoch = views, tokenizer, seed, epoch
        self.stats, self.offset = stats, offset
        self._calls = 0
        self._reads_sample = isinstance(views, SampleViews)

    def _seeded(self, pos: int, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` with torch's CPU RNG seeded for the sample at position ``pos``."""
        cpu_rng = torch.default_generator
        saved = cpu_rng.get_state()
        cpu_rng.manual_seed(worker_seed(self.seed, self.epoch, f"views{pos}", self.offset))
        try:
            return fn(*args)
        finally:
            cpu_rng.set_state(saved)

    def __call__(self, sample: dict) -> dict[str, torch.Tensor]:
        pos = int(sample.get("__pos__", self._calls))
        self._calls += 1
        img, caption, _ = decode_sample(sample, self.stats)
        if self._reads_sample:
            out, caption = self._seeded(pos, self.views.from_sample, img, caption, sample)
        else:
            out = self._seeded(pos, self.views, img)
        out["tokens"] = self._tokens(caption, sample)
        out["data_pos"] = torch.tensor(pos, dtype=torch.long)
        return out

    def _tokens(self, caption: str, sample: dict) -> torch.Tensor:
        """The caption's token row [L]; a caption of no BPE token at all (NULs, control
        characters, a bare ``&nbsp;``: SOT then EOT) is skipped as ``empty_caption``, like a
        blank one. Checked when the tokenizer names its EOT id (``eot_token_id``) and its rows
        have room for a token (L > 2)."""
        tokens_L = self.tokenizer([caption])[0].long()
        eot = getattr(self.tokenizer, "eot_token_id", None)
        if eot is not None and tokens_L.numel() > 2 and int(tokens_L[1]) == eot:
            where = f"sample {sample.get('__key__')}"
            raise BadSample(
                "empty_caption",
                f"{where}: caption {caption[:80]!r} has no token once cleaned",
                str(sample.get("__url__", "")),
            )
        return tokens_L
