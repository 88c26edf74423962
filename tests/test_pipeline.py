"""Tests for the training loader (aclip.data.pipeline and its stages) on tiny synthetic shards."""

import io
import json
import tarfile
from itertools import islice

import pytest
import torch

from aclip.data import skips
from aclip.data.pipeline import build_train_loader
from aclip.data.position import LoaderPosition
from aclip.data.shards import EpochSizeUnknown, expand_urls, samples_per_epoch
from aclip.data.synthetic import write_synthetic
from aclip.data.transform import SampleTransform
from aclip.data.views import ACLIPViews
from aclip.tokenizer import Tokenizer

CTX = 24


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(context_length=CTX)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_synthetic(root / "a", n_train=20, n_eval_cls=0, n_eval_ret=0, image_size=48,
                    samples_per_shard=10, seed=0)  # fmt: skip
    write_synthetic(root / "b", n_train=10, n_eval_cls=0, n_eval_ret=0, image_size=48,
                    samples_per_shard=10, seed=1)  # fmt: skip
    return root


def _captions(tar_paths):
    caps = []
    for p in tar_paths:
        with tarfile.open(p) as tar:
            caps += [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")]
    return caps


def _norm(text: str) -> str:
    return " ".join(text.replace(".", " .").split())


def _loader(spec, tok, **kw):
    kw.setdefault("resampled", False)
    kw.setdefault("shuffle_buffer", 8)
    bs, nw = kw.pop("batch_size", 4), kw.pop("num_workers", 0)
    return build_train_loader(spec, tok, ACLIPViews(32), bs, nw, **kw)


def test_expand_urls():
    got = expand_urls("/d/a-{0..2}.tar :: /e/b-{08..10}.tar")
    assert got == [
        ["/d/a-0.tar", "/d/a-1.tar", "/d/a-2.tar"],
        ["/e/b-08.tar", "/e/b-09.tar", "/e/b-10.tar"],
    ]
    with pytest.raises(ValueError):
        expand_urls(" :: ")


def test_samples_per_epoch(shards, tmp_path):
    spec_a = str(shards / "a" / "train" / "{00000..00001}.tar")
    assert samples_per_epoch(spec_a) == 20
    assert samples_per_epoch(spec_a + "::" + str(shards / "b" / "train" / "00000.tar")) == 30
    # sizes.json alone is enough; neither -> the shard is named
    (tmp_path / "00000.tar").write_bytes(b"")
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 7}))
    assert samples_per_epoch(str(tmp_path / "00000.tar")) == 7
    (tmp_path / "sizes.json").unlink()
    with pytest.raises(EpochSizeUnknown, match=r"1 shard\(s\) have no sample count.*00000\.tar"):
        samples_per_epoch(str(tmp_path / "00000.tar"))


def test_samples_per_epoch_sums_the_shards_that_exist(shards, tmp_path):
    """Missing shards count 0 (the loader skips them); a shard that exists without stats is
    named, the others not."""
    spec = str(shards / "a" / "train" / "{00000..00003}.tar")  # 00002, 00003 do not exist
    assert samples_per_epoch(spec) == 20
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        (tmp_path / name).write_bytes(b"")
    for name in ("00000", "00002"):
        (tmp_path / f"{name}_stats.json").write_text(json.dumps({"successes": 5}))
    with pytest.raises(EpochSizeUnknown) as err:
        samples_per_epoch(str(tmp_path / "{00000..00003}.tar"))
    assert "00001.tar" in str(err.value) and "00000.tar" not in str(err.value)


def test_batches_shapes_tokens_and_boxes(shards, tok):
    tars = [shards / "a" / "train" / f"0000{i}.tar" for i in range(2)]
    spec = str(shards / "a" / "train" / "{00000..00001}.tar")
    batches = list(_loader(spec, tok, batch_size=4))
    assert len(batches) == 5
    b = batches[0]
    assert b["views"].shape == (4, 2, 3, 32, 32) and b["views"].dtype == torch.float32
    assert b["ema"].shape == (4, 3, 32, 32)
    assert b["boxes"].shape == (4, 2, 4) and b["tokens"].shape == (4, CTX)
    assert b["tokens"].dtype == torch.long
    boxes = torch.cat([x["boxes"] for x in batches])
    assert (boxes >= 0).all() and (boxes <= 1).all()
    decoded = sorted(tok.decode(t) for x in batches for t in x["tokens"])
    assert decoded == sorted(_norm(c) for c in _captions(tars))


def test_deterministic_with_seed_and_epoch_changes_order(shards, tok):
    spec = str(shards / "a" / "train" / "{00000..00001}.tar")
    first = list(_loader(spec, tok, seed=5, epoch=0))
    again = list(_loader(spec, tok, seed=5, epoch=0))
    other = list(_loader(spec, tok, seed=5, epoch=1))
    for x, y in zip(first, again, strict=True):
        for k in x:
            assert torch.equal(x[k], y[k]), k
    tokens = lambda bs: torch.cat([x["tokens"] for x in bs])
    assert not torch.equal(tokens(first), tokens(other))
    # same samples, different order
    assert sorted(map(tuple, tokens(first).tolist())) == sorted(map(tuple, tokens(other).tolist()))


def test_resampled_stream_is_infinite_and_deterministic(shards, tok):
    spec = str(shards / "a" / "train" / "{00000..00001}.tar")
    a = list(islice(iter(_loader(spec, tok, resampled=True, seed=2)), 8))  # 32 > 20 samples
    b = list(islice(iter(_loader(spec, tok, resampled=True, seed=2)), 8))
    assert len(a) == 8
    assert all(torch.equal(x["views"], y["views"]) for x, y in zip(a, b, strict=True))


def test_mixing_weights_select_sources(shards, tok):
    spec = (
        str(shards / "a" / "train" / "00000.tar") + "::" + str(shards / "b" / "train" / "00000.tar")
    )
    caps_b = {_norm(c) for c in _captions([shards / "b" / "train" / "00000.tar"])}
    for weights, want_b in (([1.0, 0.0], False), ([0.0, 1.0], True)):
        batches = islice(iter(_loader(spec, tok, resampled=True, weights=weights)), 3)
        got = [tok.decode(t) in caps_b for x in batches for t in x["tokens"]]
        assert len(got) == 12 and all(g == want_b for g in got)
    with pytest.raises(ValueError):
        _loader(spec, tok, weights=[1.0])


def _rewrite_with_bad_samples(src, dst):
    """Copy a shard, corrupting one jpeg and emptying one caption."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin:
            data = tin.extractfile(m).read()
            if m.name == "000000001.jpg":
                data = b"\xff\xd8\xff\xe0 this is not a jpeg" + data[40:60]
            if m.name == "000000004.txt":
                data = b"   "
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))


def test_bad_samples_are_skipped_and_counted(shards, tok, tmp_path):
    _rewrite_with_bad_samples(shards / "a" / "train" / "00000.tar", tmp_path / "bad.tar")
    before = skips.skipped_samples()
    batches = list(_loader(str(tmp_path / "bad.tar"), tok, batch_size=1))
    assert len(batches) == 8  # 10 samples, 2 bad
    assert skips.skipped_samples() - before == 2


def test_workers_split_shards(shards, tok):
    spec = str(shards / "a" / "train" / "{00000..00001}.tar")
    batches = list(_loader(spec, tok, batch_size=2, num_workers=2))
    decoded = sorted(tok.decode(t) for x in batches for t in x["tokens"])
    tars = [shards / "a" / "train" / f"0000{i}.tar" for i in range(2)]
    assert decoded == sorted(_norm(c) for c in _captions(tars))


def test_loader_ignores_global_rng_and_reaugments_repeats(shards, tok):
    spec = str(shards / "a" / "train" / "00000.tar")  # 10 samples, so 40 draws repeat samples
    torch.manual_seed(0)
    batches = list(islice(iter(_loader(spec, tok, resampled=True, batch_size=8)), 5))
    torch.manual_seed(99)  # the loader's stream does not depend on the global RNG
    again = list(islice(iter(_loader(spec, tok, resampled=True, batch_size=8)), 5))
    assert all(torch.equal(x["views"], y["views"]) for x, y in zip(batches, again, strict=True))
    tokens = torch.cat([b["tokens"] for b in batches])
    boxes = torch.cat([b["boxes"] for b in batches])
    first: dict[tuple, torch.Tensor] = {}
    repeats = differing = 0
    for t, bx in zip(map(tuple, tokens.tolist()), boxes, strict=True):
        if t in first:
            repeats += 1
            differing += int(not torch.equal(first[t], bx))
        first.setdefault(t, bx)
    assert repeats >= 20 and differing == repeats


def test_sample_transform_restores_global_rng(shards, tok):
    with tarfile.open(shards / "a" / "train" / "00000.tar") as tar:
        raw = {m.name: tar.extractfile(m).read() for m in tar}
    sample = {"jpg": raw["000000000.jpg"], "txt": raw["000000000.txt"], "__key__": "000000000"}
    transform = SampleTransform(ACLIPViews(32), tok, seed=0, epoch=0)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    out = transform(sample)
    assert torch.equal(torch.get_rng_state(), state)
    assert tok.decode(out["tokens"]) == _norm(raw["000000000.txt"].decode())
    # the private stream advances: the same sample again gets a different crop
    assert not torch.equal(transform(sample)["boxes"], out["boxes"])


@pytest.mark.parametrize(
    ("workers", "resampled", "consumed"), [(0, False, 3), (2, False, 3), (2, True, 5)]
)
def test_rebuilt_loader_continues_exactly_where_it_stood(
    shards, tok, tmp_path, workers, resampled, consumed
):
    """A loader rebuilt from a LoaderPosition delivers the uninterrupted loader's next batches:
    same samples, same views, same order (bad samples in the stream included)."""
    _rewrite_with_bad_samples(shards / "a" / "train" / "00000.tar", tmp_path / "00000.tar")
    (tmp_path / "00001.tar").write_bytes((shards / "a" / "train" / "00001.tar").read_bytes())
    spec = str(tmp_path / "{00000..00001}.tar")
    kw = {"resampled": resampled, "batch_size": 2, "num_workers": workers, "seed": 3, "epoch": 7}
    full = list(islice(iter(_loader(spec, tok, **kw)), consumed + 3))
    assert len(full) == consumed + 3
    position = LoaderPosition(epoch=7, num_workers=workers)
    for batch in full[:consumed]:
        position.update(batch)
    state = LoaderPosition.from_state(position.state_dict())
    kw.update(state.loader_kwargs())
    rest = list(islice(iter(_loader(spec, tok, **kw)), 3))
    for want, got in zip(full[consumed:], rest, strict=True):
        for key in ("views", "ema", "boxes", "tokens", "data_pos", "worker_id"):
            assert torch.equal(want[key], got[key]), key


@pytest.mark.parametrize("workers", [0, 1])
def test_each_rank_reads_different_shards(shards, tok, monkeypatch, workers):
    """2 ranks over 2 shards: one whole shard each, none shared; resampled streams differ."""
    tars = [shards / "a" / "train" / "00000.tar", shards / "a" / "train" / "00001.tar"]
    spec = str(shards / "a" / "train" / "{00000..00001}.tar")
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        batches = list(_loader(spec, tok, batch_size=1, num_workers=workers))
        per_rank.append(sorted(tok.decode(t) for b in batches for t in b["tokens"]))
    by_shard = [sorted(_norm(c) for c in _captions([t])) for t in tars]
    assert sorted(per_rank) == sorted(by_shard)  # one whole shard each, none shared
    resampled = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        batches = islice(iter(_loader(spec, tok, resampled=True, batch_size=4)), 3)
        resampled.append(torch.cat([b["tokens"] for b in batches]))
    assert not torch.equal(resampled[0], resampled[1])  # each rank its own shard stream


_HOLD_A_LOADER_AT_EXIT = """
import sys
from aclip.data.pipeline import build_train_loader
from aclip.data.views import ACLIPViews
from aclip.tokenizer import Tokenizer

loader = build_train_loader(sys.argv[1], Tokenizer(context_length=24), ACLIPViews(32), 4, 2,
                            resampled=True, shuffle_buffer=8)
batches = iter(loader)
next(batches)
print("got a batch", flush=True)
"""


def test_a_process_holding_a_loader_with_workers_exits(shards):
    """The workers ignore SIGTERM (it is the main process's to handle), so multiprocessing's exit
    hook, which SIGTERMs and joins daemonic children, used to wait forever for the workers of a
    loader still referenced at exit; they are killed first now."""
    import subprocess
    import sys

    spec = str(shards / "a" / "train" / "{00000..00001}.tar")
    proc = subprocess.run([sys.executable, "-c", _HOLD_A_LOADER_AT_EXIT, spec], timeout=60,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0 and "got a batch" in proc.stdout, proc.stderr[-2000:]
