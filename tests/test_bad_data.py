"""Bad training data is skipped or converted, counted by reason, and never hangs the loader."""

import io
import itertools
import logging
import os
import re
import signal
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from aclip.data import pipeline as pipeline_module
from aclip.data import skips
from aclip.data.pipeline import build_train_loader
from aclip.data.skips import (
    COUNT_KEYS,
    SKIP_REASONS,
    LoaderStalled,
    SkipCounter,
    SkipLimitExceeded,
    check_skip_fraction,
)
from aclip.data.synthetic import write_synthetic
from aclip.data.views import ACLIPViews
from aclip.tokenizer import Tokenizer

S = 32
CAP = b"a photo of a red circle."


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(context_length=24)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("good")
    write_synthetic(root, n_train=20, n_eval_cls=0, n_eval_ret=0, image_size=48,
                    samples_per_shard=10, seed=0)  # fmt: skip
    return root / "train"


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _members(tar_path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _jpg(members: list[tuple[str, bytes]]) -> bytes:
    return next(d for n, d in members if n.endswith(".jpg"))


def _bad_members(jpg: bytes) -> list[tuple[str, bytes]]:
    """One sample per skip reason of a single shard: 9 skipped."""
    return [
        ("b_corrupt.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg" + jpg[40:60]),
        ("b_corrupt.txt", CAP),
        ("b_cut.jpg", jpg[: len(jpg) // 2]),  # truncated JPEG
        ("b_cut.txt", CAP),
        ("b_zero.jpg", b""),
        ("b_zero.txt", CAP),
        ("b_nocap.jpg", jpg),
        ("b_blank.jpg", jpg),
        ("b_blank.txt", b" \n "),
        ("b_noimg.txt", CAP),
        ("b_tiny.png", _encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")),
        ("b_tiny.txt", CAP),
        ("b_hugepng.png", _encode(Image.new("1", (10000, 10000)), "PNG")),  # 100 Mpx, not JPEG
        ("b_hugepng.txt", CAP),
        ("b_bomb.png", _encode(Image.new("1", (15000, 15000)), "PNG")),  # PIL bomb error
        ("b_bomb.txt", CAP),
    ]


def _converted_members(jpg: bytes) -> list[tuple[str, bytes]]:
    """Samples that are kept after a conversion: 6 kept."""
    i16 = Image.new("I;16", (40, 30))
    i16.putpixel((3, 3), 60000)
    return [
        ("c_utf8.jpg", jpg),
        ("c_utf8.txt", b"caf\xe9 \xff a red circle"),
        ("c_gray.png", _encode(Image.new("L", (40, 30), 77), "PNG")),
        ("c_gray.txt", CAP),
        ("c_cmyk.jpg", _encode(Image.new("CMYK", (40, 30), (0, 50, 90, 10)), "JPEG")),
        ("c_cmyk.txt", CAP),
        ("c_rgba.png", _encode(Image.new("RGBA", (40, 30), (1, 2, 3, 4)), "PNG")),
        ("c_rgba.txt", CAP),
        ("c_i16.png", _encode(i16, "PNG")),
        ("c_i16.txt", CAP),
        ("c_huge.jpg", _encode(Image.new("L", (10000, 10000), 128), "JPEG")),  # 100 Mpx
        ("c_huge.txt", CAP),
    ]


def _truncated(src: Path, dst: Path) -> None:
    """Copy `src` cut in the middle of its 6th sample's JPEG (5 samples survive)."""
    with tarfile.open(src) as tar:
        m = [m for m in tar.getmembers() if m.name.endswith(".jpg")][5]
    dst.write_bytes(src.read_bytes()[: m.offset_data + m.size // 2])


@pytest.fixture(scope="module")
def bad_dir(good, tmp_path_factory) -> Path:
    """0.tar: 10 good + 9 bad + 6 converted; 1.tar cut (5 good); 2.tar not a tar; 3 missing."""
    root = tmp_path_factory.mktemp("bad")
    members = _members(good / "00000.tar")
    jpg = _jpg(members)
    _write_tar(root / "0.tar", members[:15] + _bad_members(jpg) + members[15:]
               + _converted_members(jpg))  # fmt: skip
    _truncated(good / "00001.tar", root / "1.tar")
    (root / "2.tar").write_bytes(b"this is not a tar file\n" * 40)
    return root


def _loader(spec: str, tok: Tokenizer, **kw):
    kw.setdefault("resampled", False)
    kw.setdefault("shuffle_buffer", 1)
    bs, nw = kw.pop("batch_size", 1), kw.pop("num_workers", 0)
    return build_train_loader(spec, tok, ACLIPViews(S), bs, nw, **kw)


WANT_IN_PROCESS = {
    "corrupt_image": 2,
    "empty_image": 1,
    "no_image": 1,
    "no_caption": 1,
    "empty_caption": 1,
    "too_large": 2,
    "too_small": 1,
    "bad_tar": 2,
    "missing_shard": 1,
    "bad_mask": 0,
    "other": 0,
    "caption_not_utf8": 1,
    "mode_converted": 5,  # L, CMYK, RGBA, I;16, the huge L JPEG
    "reduced_large": 1,
}


@pytest.mark.timeout(60)
def test_every_bad_case_is_skipped_or_converted_and_counted(bad_dir, tok):
    before = skips.skipped_samples()
    loader = _loader(str(bad_dir / "{0..3}.tar"), tok)
    batches = list(loader)
    assert len(batches) == 10 + 6 + 5
    for b in batches:
        assert b["views"].shape == (1, 2, 3, S, S) and b["ema"].shape == (1, 3, S, S)
        assert torch.isfinite(b["views"]).all()
    assert loader.skip_stats.counts == WANT_IN_PROCESS
    n_skipped = sum(WANT_IN_PROCESS[k] for k in SKIP_REASONS)
    assert skips.skipped_samples() - before == n_skipped
    # the counts ride on the batches too (up to the last batch)
    last = dict(zip(COUNT_KEYS, batches[-1]["skipped"].tolist(), strict=True))
    assert all(last[k] <= WANT_IN_PROCESS[k] for k in COUNT_KEYS)
    assert last["reduced_large"] == 1 and int(batches[-1]["worker_id"]) == 0


@pytest.mark.timeout(60)
def test_counts_reach_main_process_from_workers(good, tok, tmp_path):
    members = [_members(good / f"0000{i}.tar") for i in range(2)]
    jpg = _jpg(members[0])
    bad = _bad_members(jpg)
    # bad samples first: counts made after a worker's last batch would not reach us
    _write_tar(tmp_path / "0.tar", bad[:4] + bad[10:12] + members[0])
    utf8 = _converted_members(jpg)[:2]
    _write_tar(tmp_path / "1.tar", bad[4:10] + utf8 + members[1])
    batches = list(_loader(str(tmp_path / "{0..1}.tar"), tok, num_workers=2))
    assert len(batches) == 21
    counter = SkipCounter()
    for b in batches:
        totals = counter.update(b)
    want = dict.fromkeys(COUNT_KEYS, 0)
    want.update(corrupt_image=2, too_small=1, empty_image=1, no_caption=1, empty_caption=1)
    want.update(no_image=1, caption_not_utf8=1)
    assert totals == want
    assert counter.skipped() == 7
    assert set(counter.per_worker) == {0, 1}
    assert counter.recent_bad_shards() == [str(tmp_path / "0.tar"), str(tmp_path / "1.tar")]


@pytest.mark.timeout(60)
def test_skip_lines_are_numbered_as_the_skipped_count_when_their_batch_arrives(
    good, tok, tmp_path, caplog
):
    """With 2 workers prefetching, each skip is logged by the main process when the batch that
    reports it is consumed, numbered by the run total: the lines are #1..#N without gaps or
    repeats, and after each batch the last number is the counter's (the progress bar's) count."""
    members = [_members(good / f"0000{i}.tar") for i in range(2)]
    bad = _bad_members(_jpg(members[0]))
    _write_tar(tmp_path / "0.tar", bad[:4] + members[0][:6] + bad[10:12] + members[0][6:])
    _write_tar(tmp_path / "1.tar", bad[4:10] + members[1])
    counter = SkipCounter()
    numbers: list[int] = []
    with caplog.at_level(logging.WARNING, logger="aclip.data.skips"):
        for batch in _loader(str(tmp_path / "{0..1}.tar"), tok, num_workers=2):
            caplog.clear()
            counter.update(batch)
            new = [int(m) for m in re.findall(r"skipping bad sample #(\d+) \(", caplog.text)]
            numbers += new
            assert not numbers or numbers[-1] == counter.skipped(), (numbers, counter.totals())
    assert counter.skipped() == 7
    assert numbers == list(range(1, 8))


def test_skip_counter_takes_max_per_worker_and_sums_workers():
    def batch(worker: int, **counts: int) -> dict:
        row = torch.tensor([counts.get(k, 0) for k in COUNT_KEYS])
        return {"skipped": row, "worker_id": torch.tensor(worker)}

    counter = SkipCounter()
    counter.update(batch(0, bad_tar=1))
    counter.update(batch(1, no_caption=2))
    counter.update(batch(0, bad_tar=3))
    assert counter.update(batch(1, no_caption=1))["no_caption"] == 2  # stale batch: max kept
    assert counter.totals()["bad_tar"] == 3
    counter.new_loader()  # next epoch: workers count from zero again
    totals = counter.update(batch(0, bad_tar=1))
    assert totals["bad_tar"] == 4 and totals["no_caption"] == 2 and counter.skipped() == 6


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_over_only_bad_data_ends(bad_dir, tok, tmp_path, num_workers):
    jpg = _jpg(_members(bad_dir / "0.tar"))
    _write_tar(tmp_path / "0.tar", _bad_members(jpg))
    _write_tar(tmp_path / "1.tar", _bad_members(jpg)[::-1])
    spec = f"{tmp_path / '{0..1}.tar'}::{bad_dir / '{2..3}.tar'}"
    loader = _loader(spec, tok, num_workers=num_workers, weights=[1.0, 1.0])
    assert list(loader) == []
    if num_workers == 0:
        assert sum(loader.skip_stats.counts[k] for k in SKIP_REASONS) >= 1


@pytest.mark.timeout(60)
def test_check_skip_fraction_names_the_bad_shards(bad_dir, tok):
    loader = _loader(str(bad_dir / "{0..3}.tar"), tok)
    seen = sum(len(b["tokens"]) for b in loader)
    counts, shards = loader.skip_stats.counts, list(loader.skip_stats.bad_urls)
    check_skip_fraction(counts, seen, max_fraction=0.5, shards_hint=shards)  # 12 / 33: fine
    with pytest.raises(SkipLimitExceeded) as err:
        check_skip_fraction(counts, seen, max_fraction=0.1, shards_hint=shards)
    msg = str(err.value)
    assert "12 of 33" in msg and "missing_shard=1" in msg and "caption_not_utf8" not in msg
    for name in ("0.tar", "1.tar", "2.tar", "3.tar"):
        assert str(bad_dir / name) in msg
    check_skip_fraction(dict.fromkeys(COUNT_KEYS, 0), 0, 0.0)  # nothing seen yet: no error


# ---------------------------------------------------------------- the loader never hangs
def test_too_few_shards_for_ranks_and_workers_are_refused_at_build(good, tok, monkeypatch):
    spec = str(good / "{00000..00001}.tar")
    with pytest.raises(ValueError, match=r"2 shard\(s\).* 1 rank\(s\) x 3 loader worker\(s\) = 3"):
        _loader(spec, tok, num_workers=3)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"= 4: .*data.workers <= 1, .*at least 4 shards"):
        _loader(spec, tok, num_workers=2)
    _loader(spec, tok, num_workers=1)  # 2 ranks x 1 worker: one shard each
    _loader(spec, tok, num_workers=2, resampled=True)  # each worker draws its own shards


def test_preflight_refuses_a_split_that_leaves_a_worker_without_shards(good, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    from aclip.config import ConfigError, load_config
    from aclip.train.preflight import check_paths

    def cfg(*extra: str):
        base = [f"data.train_shards={good}/{{00000..00001}}.tar", f"train.output_dir={tmp_path}"]
        return load_config(None, base + list(extra))

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_paths(cfg("data.workers=2"))  # resampled (the default): fine
    with pytest.raises(ConfigError, match=r"data.workers.*2 rank\(s\) x 2 loader worker"):
        check_paths(cfg("data.workers=2", "data.resampled=false"))
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")  # under srun, before RANK is set
    with pytest.raises(ConfigError, match=r"4 rank\(s\) x 1 loader worker"):
        check_paths(cfg("data.workers=0", "data.resampled=false"))


def test_preflight_names_missing_shards(good, tmp_path):
    from aclip.config import load_config
    from aclip.train.preflight import check_paths

    def cfg(spec: str):
        return load_config(None, [f"data.train_shards={spec}", f"train.output_dir={tmp_path}"])

    with pytest.raises(FileNotFoundError, match=r"none of its 5 files exists"):
        check_paths(cfg(f"{tmp_path}/nothing_{{0..4}}.tar"))
    with pytest.warns(UserWarning, match=r"1 of 3 shards are missing .*00002.tar"):
        check_paths(cfg(f"{good}/{{00000..00002}}.tar"))


def _first_batch_error(loader) -> tuple[Exception, float]:
    """The error of the first batch and the seconds it took; the loader's workers are shut down
    (garbage-collecting a failed loader joins each worker with a 5 s timeout)."""
    start = time.perf_counter()
    with pytest.raises(Exception) as err:  # noqa: B017 - the type is asserted by the caller
        next(iter(loader))
    seconds = time.perf_counter() - start
    _shut_down(loader)
    return err.value, seconds


def _shut_down(loader) -> None:
    workers = getattr(loader.pipeline[0], "_iterator", None)
    if workers is not None and hasattr(workers, "_shutdown_workers"):
        workers._shutdown_workers()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("case", ["no_file", "unreadable", "one_source_unreadable"])
def test_resampled_stream_over_unreadable_shards_raises_at_once(good, bad_dir, tok, tmp_path,
                                                                num_workers, case):  # fmt: skip
    spec = {
        "no_file": f"{tmp_path}/nothing_{{0..4}}.tar",  # a spec matching no file
        "unreadable": f"{bad_dir}/{{2..3}}.tar",  # not a tar, missing
        "one_source_unreadable": f"{good}/{{00000..00001}}.tar::{bad_dir}/{{2..3}}.tar",
    }[case]
    weights = [1.0, 1.0] if "::" in spec else None
    loader = _loader(spec, tok, resampled=True, num_workers=num_workers, weights=weights)
    exn, seconds = _first_batch_error(loader)
    assert isinstance(exn, LoaderStalled), repr(exn)
    msg = str(exn)
    assert "no sample could be read from 16 shards in a row" in msg, msg
    assert ("nothing_" if case == "no_file" else "3.tar") in msg and "missing_shard=" in msg
    assert seconds < 20


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resampled_stream_without_a_good_sample_raises(good, tok, tmp_path, num_workers):
    for i in range(2):  # readable shards in another layout: captions in .json, not .txt
        members = [(n.replace(".txt", ".json"), d) for n, d in _members(good / f"0000{i}.tar")]
        _write_tar(tmp_path / f"{i}.tar", members)
    loader = _loader(str(tmp_path / "{0..1}.tar"), tok, resampled=True, num_workers=num_workers)
    exn, seconds = _first_batch_error(loader)
    assert isinstance(exn, LoaderStalled), repr(exn)
    msg = str(exn)
    assert "no good sample from 16 shard reads in a row" in msg and "no_caption=" in msg, msg
    assert str(tmp_path / "0.tar") in msg or str(tmp_path / "1.tar") in msg
    assert seconds < 20


@pytest.mark.timeout(60)
def test_resampled_stream_with_some_bad_shards_goes_on(good, bad_dir, tok, tmp_path):
    for i in range(2):
        (tmp_path / f"{i}.tar").write_bytes((good / f"0000{i}.tar").read_bytes())
    (tmp_path / "2.tar").write_bytes((bad_dir / "2.tar").read_bytes())  # not a tar; 3 missing
    loader = _loader(str(tmp_path / "{0..3}.tar"), tok, resampled=True, batch_size=4)
    batches = list(itertools.islice(iter(loader), 50))  # 200 samples: 20 good shard reads
    assert len(batches) == 50
    counts = loader.skip_stats.counts
    assert counts["missing_shard"] >= 5 and counts["bad_tar"] >= 5


class _KillingTokenizer:
    """Kills the loader worker process that calls it (as the kernel's OOM killer would)."""

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(len(texts), 16, dtype=torch.long)


def _broken_collate(samples: list[dict]) -> dict:
    raise RuntimeError("collate broke (not a sample error)")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("failure", ["worker_killed", "worker_raises"])
def test_a_failing_loader_worker_stops_the_trainer_at_once(good, tmp_path, dist_info,
                                                           monkeypatch, failure):  # fmt: skip
    from helpers import tiny_config

    from aclip.train.trainer import Trainer

    trainer = Trainer(tiny_config(str(tmp_path / "run")), dist_info)
    tokenizer: Any = Tokenizer(context_length=16)
    if failure == "worker_killed":
        tokenizer, match = _KillingTokenizer(), r"DataLoader worker \(pid.*\) (is killed|exited)"
    else:
        monkeypatch.setattr(pipeline_module, "collate", _broken_collate)
        match = r"(?s)Caught RuntimeError in DataLoader worker.*collate broke"
    loader = build_train_loader(str(good / "{00000..00001}.tar"), tokenizer, ACLIPViews(32), 8, 1)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=match):
        trainer.fit(loader=loader)
    assert time.perf_counter() - start < 20
    assert trainer.step == 0
    _shut_down(loader)


def _rank_with_bad_data(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1's loader fails at its third batch while rank 0 trains on."""
    from helpers import fake_batch, rank_slice, set_rank_env, tiny_config

    from aclip.distributed import init_distributed
    from aclip.train.trainer import Trainer

    set_rank_env(rank, world, port)
    trainer = Trainer(tiny_config(out, **{"train.stop_at_step": 50}), init_distributed())

    def batches():
        for i in itertools.count():
            if rank == 1 and i == 2:
                raise LoaderStalled("rank 1's shards are all unreadable")
            yield rank_slice(fake_batch(trainer.cfg, 8, seed=i), rank, world)

    try:
        trainer.fit(loader=batches())
    except Exception as exn:
        Path(out, f"rank{rank}.txt").write_text(f"{type(exn).__name__}: {exn}")
        raise


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_loader_error_on_one_rank_ends_every_rank(tmp_path):
    """The failing rank exits non-zero at once; the other, waiting in a collective, gets an
    error from gloo when its peer is gone (with NCCL the launcher ends it: srun
    --kill-on-bad-exit=1, torchrun)."""
    import torch.multiprocessing as mp
    from helpers import free_port

    with pytest.raises(mp.ProcessRaisedException, match="all unreadable"):
        mp.spawn(_rank_with_bad_data, args=(2, free_port(), str(tmp_path)), nprocs=2)
    assert (tmp_path / "rank1.txt").read_text().startswith("LoaderStalled")


def test_train_cli_exits_2_naming_unreadable_shards(bad_dir, tmp_path, capsys):
    """Shards that exist but are no tar archives pass the path check; the resampled stream
    then stops the run at once instead of spinning."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from test_train_cli import TINY

    import train

    for i in range(2):
        (tmp_path / f"{i}.tar").write_bytes((bad_dir / "2.tar").read_bytes())
    argv = [*TINY, f"data.train_shards={tmp_path}/{{0..1}}.tar", "data.samples_per_epoch=64",
            f"train.output_dir={tmp_path / 'run'}"]  # fmt: skip
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "error: no sample could be read from 16 shards in a row" in err, err
    assert f"{tmp_path}/0.tar" in err and "bad_tar=" in err
