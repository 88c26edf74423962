"""Checks that refuse a run before any heavy work: shards, eval sets, output directory."""

from __future__ import annotations

import glob
import os
import re
import warnings
from functools import partial
from pathlib import Path

from aclip.config import Config, ConfigError


def check_paths(cfg: Config) -> None:
    """Raise with a message naming the problem when data.weights do not match the sources, the
    method's settings cannot run, an input is missing or of the wrong kind, the epoch size is
    unknown or the output unwritable."""
    from aclip.data.shards import expand_urls
    from aclip.methods import get_method

    if cfg.data.weights is not None:
        _check_weights(cfg.data.weights, cfg.data.train_shards)
    get_method(cfg.method).validate(cfg)
    _check_image_size(cfg)
    _check_pretrained(cfg)
    if not cfg.data.train_shards:
        raise ConfigError("config key 'data.train_shards': no training shards given")
    try:
        sources = expand_urls(cfg.data.train_shards)
    except ValueError as err:
        raise ConfigError(f"config key 'data.train_shards': {err}") from None
    for source in sources:
        _check_source(source)
    _check_split(sources, cfg)
    resolve_epoch_size(cfg)
    _check_eval_sets(cfg)
    _check_writable(Path(cfg.train.output_dir))


def _check_weights(weights: list[float], spec: str) -> None:
    """One weight per source of the spec (counted as the loader counts them)."""
    from aclip.data.shards import source_count

    try:
        sources = source_count(spec)
    except ValueError as err:
        raise ConfigError(f"config key 'data.weights': {err}") from None
    if len(weights) != sources:
        raise ConfigError(
            f"config key 'data.weights': {len(weights)} weights for {sources} '::'-joined "
            f"source(s) of data.train_shards"
        )


def _check_pretrained(cfg: Config) -> None:
    """Refuse a ``model.init_from`` that names nothing (a resumed run does not read it): no such
    file or folder, or an ``hf-hub:`` name that is not in the local Hugging Face cache."""
    from aclip.interop.source import HF_HUB, hf_hub_folder
    from aclip.interop.weights import WeightsError
    from aclip.train.checkpoint import will_resume

    pretrained = cfg.model.init_from.removeprefix("local-dir:")
    if not pretrained or will_resume(cfg):
        return
    if pretrained.startswith(HF_HUB):
        try:
            hf_hub_folder(pretrained)
        except WeightsError as err:
            raise FileNotFoundError(f"model.init_from: {err}") from None
    elif not Path(pretrained).exists():
        raise FileNotFoundError(
            f"model.init_from: no such file or folder: {cfg.model.init_from} (give the pretrained "
            "weights to start from: an OpenAI release file, an open_clip checkpoint or folder, or "
            "an aclip run; nothing is downloaded)"
        )


def _check_image_size(cfg: Config) -> None:
    """Refuse a ``model.image_size`` that does not cut into whole patches (ConfigError from
    ``build_vision``), or a patch grid that ``mask.block_size`` does not cut into blocks,
    building the vision tower on the meta device: no memory, no weights, no random draws."""
    import torch

    from aclip.model import build_vision

    with torch.device("meta"):
        grid_hw = build_vision(cfg.model).grid_hw
    block = cfg.mask.block_size
    if block > 1 and (grid_hw[0] % block or grid_hw[1] % block):
        raise ConfigError(
            f"config key 'mask.block_size': the {grid_hw[0]}x{grid_hw[1]} patch grid of "
            f"model.image_size={cfg.model.image_size} does not cut into {block}x{block} blocks; "
            "use a block size that divides the grid (1 selects single patches)"
        )


def _check_eval_sets(cfg: Config) -> None:
    """Refuse an eval set that is missing, of the wrong kind or laid out wrong, naming the key
    (the final evaluation would otherwise find it only after training): a zero-shot or
    retrieval set is checked by the registered format that claims it
    (``aclip.data.sets.registry``), with that format's default options, as the evaluation
    reads it."""
    from aclip.data.sets.regions import WdsRegionSet
    from aclip.data.sets.registry import prepare_set

    checks = (
        ("eval.zeroshot_sets", cfg.eval.zeroshot_sets, partial(prepare_set, task="classification")),
        ("eval.retrieval_sets", cfg.eval.retrieval_sets, partial(prepare_set, task="retrieval")),
        ("eval.region_sets", cfg.eval.region_sets, WdsRegionSet),
    )
    for key, roots, check in checks:
        for root in roots:
            try:
                check(root)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"{key}: {err}") from None
            except ValueError as err:
                raise ConfigError(f"{key}: {err}") from None


def resolve_epoch_size(cfg: Config) -> int:
    """Set ``cfg.data.samples_per_epoch`` from the shards' stats files when it is not set (so a
    run's config.yaml records it) and return it; refuse, naming the shards without counts."""
    from aclip.data.shards import EpochSizeUnknown, ShardCountError, samples_per_epoch

    if not cfg.data.samples_per_epoch:
        try:
            counted = samples_per_epoch(cfg.data.train_shards)
        except EpochSizeUnknown as err:
            raise ConfigError(
                f"config key 'data.samples_per_epoch': not set, and {err}. Set "
                "data.samples_per_epoch=<samples in one epoch>, or write the missing stats files"
            ) from None
        except ShardCountError as err:
            raise ConfigError(
                f"config key 'data.samples_per_epoch': not set, and a shard's sample count is "
                f"wrong: {err}. Fix that file, or set data.samples_per_epoch=<samples in one "
                "epoch>"
            ) from None
        if not counted:
            raise ConfigError(
                "config key 'data.samples_per_epoch': not set, and the stats files of the shards "
                f"that exist count 0 samples ({cfg.data.train_shards})"
            )
        cfg.data.samples_per_epoch = counted
    return int(cfg.data.samples_per_epoch)


def _check_source(source: list[str]) -> None:
    """Refuse a source none of whose local shards exists; warn, naming them, when some are
    missing (the loader skips those and counts them as ``missing_shard``)."""
    from aclip.data.shards import is_local

    local = [u for u in source if is_local(u)]
    missing = [u for u in local if not Path(u).is_file()]
    if not missing:
        return
    if len(missing) == len(local):
        hint = _brace_hint(source[0]) if len(source) == 1 else ""
        none = f"no shard found for {source[0]} ... (none of its {len(local)} files exists)"
        raise FileNotFoundError(f"data.train_shards: {hint or none}")
    listed = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
    warnings.warn(
        f"data.train_shards: {len(missing)} of {len(local)} shards are missing and will be "
        f"skipped: {listed}",
        stacklevel=3,
    )


def _brace_hint(url: str) -> str:
    """For a directory or a wildcard pattern given as a shard spec, how to name its shards
    instead: a brace pattern computed from the tar files there ('' for any other path)."""
    path = Path(url)
    if path.is_dir():
        what, paths = f"{url} is a directory", list(path.iterdir())
    elif "*" in url or "?" in url:
        what, paths = f"{url} is a wildcard pattern", [Path(p) for p in glob.glob(url)]
    else:
        return ""
    found = sorted(p for p in paths if ".tar" in p.suffixes and p.is_file())
    usage = "data.train_shards takes brace patterns of shards, not directories or wildcards"
    if not found:
        return f"{what} with no .tar file: {usage}, e.g. 'DIR/{{00000..00011}}.tar'"
    spec = _brace_spec(found)
    if spec is not None:
        return f"{what}: {usage}: use '{spec}' for the {len(found)} .tar file(s) found there"
    names = ", ".join(p.name for p in found[:3]) + (" ..." if len(found) > 3 else "")
    return (
        f"{what}: {usage}. Its {len(found)} .tar file(s) ({names}) are not one numbered series: "
        "name them with brace patterns, e.g. 'DIR/{00000..00011}.tar', joined with '::' if need be"
    )


_NUMBERED = re.compile(r"^(?P<stem>.*?)(?P<num>\d+)(?P<ext>(?:\.\w+)+)$")


def _brace_spec(files: list[Path]) -> str | None:
    """``DIR/STEM{first..last}EXT`` naming exactly ``files`` (one folder, stem and extension,
    consecutive numbers all of one width or none zero-padded), or None when no pattern does."""
    matches = [_NUMBERED.match(f.name) for f in files]
    if len({f.parent for f in files}) != 1 or not all(matches):
        return None
    parts = {(m["stem"], m["ext"]) for m in matches if m}
    nums = sorted((int(m["num"]), m["num"]) for m in matches if m)
    values = [i for i, _ in nums]
    one_width = len({len(n) for _, n in nums}) == 1 or all(n == str(i) for i, n in nums)
    if len(parts) != 1 or not one_width or values != list(range(values[0], values[-1] + 1)):
        return None
    (stem, ext), first, last = parts.pop(), nums[0][1], nums[-1][1]
    middle = first if first == last else f"{{{first}..{last}}}"
    return f"{files[0].parent}/{stem}{middle}{ext}"


def _check_split(sources: list[list[str]], cfg: Config) -> None:
    """Refuse a finite stream whose shards cannot give every rank and loader worker one."""
    from aclip.data.shards import check_shard_split
    from aclip.distributed import launcher_ranks

    try:
        world = launcher_ranks(os.environ)[1]
        check_shard_split(sources, world, cfg.data.workers, cfg.data.resampled)
    except ValueError as err:
        raise ConfigError(f"config key 'data.workers': {err}") from None


def check_resume(cfg: Config) -> None:
    """Refuse ``train.resume`` naming a checkpoint that is missing or damaged, or ``latest``
    when checkpoints exist and none can be resumed
    (:func:`aclip.train.checkpoint.check_resume`); run it holding the output directory's lock
    (:mod:`aclip.train.runlock`). With several ranks each runs
    this: sizes only, as N ranks reading every file over a shared file system multiplies the
    I/O; the trainer's rank 0 reads the CRC32s and every rank stops alike."""
    from aclip.distributed import launcher_ranks
    from aclip.train import checkpoint

    checkpoint.check_resume(cfg, crc=launcher_ranks(os.environ)[1] == 1)


def _check_writable(out: Path) -> None:
    """Create ``out`` and write a probe file there (permission bits do not stop root)."""
    probe = out / ".aclip_write_probe"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"train.output_dir: cannot write to {out} ({err.strerror})") from None
