"""Checks that refuse a run before any heavy work: shards, eval sets, output directory."""

from __future__ import annotations

from pathlib import Path

from aclip.config import Config, ConfigError


def check_paths(cfg: Config) -> None:
    """Raise with a message naming the problem when an input is missing or the output unwritable."""
    from aclip.data.pipeline import expand_urls

    if not cfg.data.train_shards:
        raise ConfigError("config key 'data.train_shards': no training shards given")
    for source in expand_urls(cfg.data.train_shards):
        local = [u for u in source if "://" not in u and not u.startswith("pipe:")]
        missing = [u for u in local if not Path(u).is_file()]
        if local and len(missing) == len(local):
            raise FileNotFoundError(f"data.train_shards: no shard found for {source[0]} ...")
    for key, roots in (
        ("eval.zeroshot_sets", cfg.eval.zeroshot_sets),
        ("eval.retrieval_sets", cfg.eval.retrieval_sets),
    ):
        for root in roots:
            if not Path(root).is_dir():
                raise FileNotFoundError(f"{key}: eval set directory not found: {root}")
    _check_writable(Path(cfg.train.output_dir))


def _check_writable(out: Path) -> None:
    """Create ``out`` and write a probe file there (permission bits do not stop root)."""
    probe = out / ".aclip_write_probe"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"train.output_dir: cannot write to {out} ({err.strerror})") from None
