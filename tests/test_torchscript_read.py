"""TorchScript archives (OpenAI's CLIP releases) read as data: the state dict torch.jit.load gives,
bit for bit, and a payload in the archive (a ``__setstate__`` with a side effect) never runs."""

from __future__ import annotations

import io
import os
import pickle
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODEL_ARGS
from test_interop import OPENAI_LIKE, inputs, open_clip_model, openai_release
from torch import nn

from aclip import interop
from aclip.data.synthetic import write_synthetic
from aclip.interop.torchscript import TorchScriptReadError, read_torchscript_state_dict
from evals import zeroshot as zeroshot_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

SAFE = "not a weights file we can read safely"


def assert_same_state_dict(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    """Same keys in the same order; each tensor the same dtype, shape, strides and bits."""
    assert list(ours) == list(ref)
    for key, value in ref.items():
        got = ours[key]
        assert (got.dtype, got.shape, got.stride()) == (value.dtype, value.shape, value.stride())
        assert torch.equal(got, value), key


def jit_state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.jit.load(str(path), map_location="cpu").state_dict()


# ------------------------------------------------------------------ parity with torch.jit.load
def test_scripted_openai_layout_clip_reads_as_torch_jit_load_gives_it(tmp_path) -> None:
    """open_clip's model in OpenAI's layout and dtypes (fp16 linear and conv weights), with the
    buffers OpenAI's archives list (input_resolution, context_length, vocab_size, attn_mask)."""
    sd, archive, _ = openai_release(tmp_path)
    ours = read_torchscript_state_dict(archive)
    assert_same_state_dict(ours, jit_state_dict(archive))
    assert {"input_resolution", "attn_mask"} <= set(ours)
    assert ours["visual.conv1.weight"].dtype == torch.float16
    raw, jit = interop.read_state_dict(archive)
    assert jit and set(raw) == set(sd)


def test_traced_openai_layout_clip_reads_as_torch_jit_load_gives_it(tmp_path) -> None:
    """OpenAI's release files are traced modules (mangled class names, constants.pkl)."""
    model = open_clip_model(OPENAI_LIKE, tmp_path / "cfg")
    model.register_buffer("input_resolution", torch.tensor(32))
    traced = torch.jit.trace(model, inputs(32, 16), check_trace=False)
    archive = tmp_path / "ViT-traced.pt"
    traced.save(str(archive))
    with zipfile.ZipFile(archive) as zf:
        assert any("___torch_mangle_" in n for n in zf.namelist())
    assert_same_state_dict(read_torchscript_state_dict(archive), jit_state_dict(archive))


class Zoo(nn.Module):
    """Every way a module lays out its tensors: dtypes, a transposed (non-contiguous) parameter,
    two parameters on one storage, a Linear without bias, a non-persistent buffer (listed by
    TorchScript's state_dict), a plain tensor attribute (not listed), lists and dicts of
    modules, an empty tensor, complex numbers."""

    def __init__(self) -> None:
        super().__init__()
        base = torch.randn(6, 4)
        self.t = nn.Parameter(base.t())  # stride (1, 4)
        self.tied = nn.Parameter(torch.randn(8))
        self.tied_half = nn.Parameter(self.tied.data[2:6])  # a view of tied's storage
        self.nobias = nn.Linear(3, 2, bias=False)
        self.layers = nn.ModuleList([nn.LayerNorm(3), nn.Linear(3, 3).to(torch.bfloat16)])
        self.heads = nn.ModuleDict({"a": nn.Linear(2, 2).double(), "b": nn.Embedding(5, 2)})
        self.register_buffer("ids", torch.arange(7))
        self.register_buffer("flags", torch.tensor([True, False, True]))
        self.register_buffer("small", torch.tensor([1, -2, 3], dtype=torch.int8))
        self.register_buffer("wide", torch.tensor([1, 2], dtype=torch.int32))
        self.register_buffer("empty", torch.zeros(0, 3))
        self.register_buffer("phase", torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64))
        self.register_buffer("temp", torch.ones(2), persistent=False)
        self.plain = torch.zeros(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x.to(torch.float32)).float()
        return x.sum() + self.plain.sum() + self.heads["a"].weight.sum().float()


def test_module_zoo_reads_as_torch_jit_load_gives_it(tmp_path) -> None:
    torch.manual_seed(0)
    archive = tmp_path / "zoo.pt"
    torch.jit.script(Zoo()).save(str(archive))
    ours = read_torchscript_state_dict(archive)
    assert_same_state_dict(ours, jit_state_dict(archive))
    assert "temp" in ours and "plain" not in ours and "nobias.bias" not in ours
    assert ours["tied_half"].untyped_storage().data_ptr() == ours["tied"].untyped_storage(
    ).data_ptr()  # one storage, as in the file  # fmt: skip
    assert ours["t"].stride() == (1, 4) and not ours["t"].is_contiguous()


def rewrite(src: Path, dst: Path, change: dict[str, bytes | None]) -> None:
    """A copy of the zip ``src`` with the records named in ``change`` replaced (None: dropped)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = change.get(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
        for name, data in change.items():
            if name not in zin.namelist() and data is not None:
                zout.writestr(name, data)


def test_class_source_in_another_file_is_found_by_its_methods(tmp_path) -> None:
    """A class printed in a file other than its qualified name's (older torch versions): found
    by the class its methods' ``self`` is annotated with."""
    torch.manual_seed(0)
    archive = tmp_path / "lin.pt"
    torch.jit.script(nn.Linear(3, 2)).save(str(archive))
    with zipfile.ZipFile(archive) as zf:
        (source,) = [n for n in zf.namelist() if n.startswith("lin/code/") and n.endswith(".py")]
        text = zf.read(source)
    moved = tmp_path / "moved.pt"
    rewrite(archive, moved, {source: None, "lin/code/__torch__/elsewhere.py": text})
    assert_same_state_dict(read_torchscript_state_dict(moved), jit_state_dict(archive))


def test_big_endian_archive_is_byte_swapped(tmp_path) -> None:
    """An archive written on a big-endian machine (``byteorder`` = big, every storage's elements
    byte-reversed, a complex number's two parts each) reads as the same tensors."""
    torch.manual_seed(0)
    little = tmp_path / "zoo.pt"
    torch.jit.script(Zoo()).save(str(little))
    change: dict[str, bytes | None] = {"zoo/byteorder": b"big"}
    itemsize = {}
    with zipfile.ZipFile(little) as zf:
        pickled = zf.read("zoo/data.pkl")
    for kind, key in _storage_ids(pickled):
        dtype = getattr(torch, kind).dtype
        size = torch.empty((), dtype=dtype).element_size()
        itemsize[key] = size // 2 if dtype.is_complex else size  # big-endian real, imaginary
    with zipfile.ZipFile(little) as zf:
        for key, size in itemsize.items():
            raw = bytearray(zf.read(f"zoo/data/{key}"))
            for i in range(0, len(raw), size):
                raw[i : i + size] = raw[i : i + size][::-1]
            change[f"zoo/data/{key}"] = bytes(raw)
    assert any(size > 1 for size in itemsize.values())
    big = tmp_path / "zoo_big.pt"
    rewrite(little, big, change)
    assert_same_state_dict(read_torchscript_state_dict(big), read_torchscript_state_dict(little))


def _storage_ids(pickled: bytes) -> list[tuple[str, str]]:
    """(storage type name, key) of every storage data.pkl names (a test-side unpickler of a file
    this test wrote: every class a dummy, the persistent ids recorded)."""
    found = set()

    class Dummy:
        def __init__(self, *args: object) -> None: ...

        def __setstate__(self, state: object) -> None: ...

    class Ids(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            return name if name.endswith("Storage") else Dummy

        def persistent_load(self, pid: tuple) -> None:
            found.add((pid[1], pid[2]))

    Ids(io.BytesIO(pickled)).load()
    return sorted(found)


# ------------------------------------------------------------------ nothing in the archive runs
class Payload(nn.Module):
    """A module whose ``__setstate__`` (TorchScript, run by torch.jit.load) creates a file."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.weight = nn.Parameter(torch.ones(2))
        self.touched = torch.zeros(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool, torch.Tensor]:
        return (self.marker, self.training, self.weight)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool, torch.Tensor]) -> None:
        self.marker = state[0]
        self.training = state[1]
        self.weight = state[2]
        self.touched = torch.from_file(state[0], shared=True, size=1)  # creates the file


class Carrier(nn.Module):
    """A payload one level down, beside ordinary weights."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 2)
        self.inner = Payload(marker)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.proj(x))


@pytest.fixture(scope="module")
def payloads(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """(the marker file's path, {name: archive}); torch.jit.load on either creates the marker."""
    tmp = tmp_path_factory.mktemp("payload")
    marker = tmp / "marker"
    files = {"root": tmp / "ViT-B-32.pt", "nested": tmp / "nested.pt"}
    torch.jit.script(Payload(str(marker))).save(str(files["root"]))
    torch.jit.script(Carrier(str(marker))).save(str(files["nested"]))
    for path in files.values():  # the payload is live: torch.jit.load runs it
        assert not marker.exists()
        torch.jit.load(str(path))
        assert marker.exists(), path
        marker.unlink()
    return marker, files


@pytest.mark.parametrize("name", ["root", "nested"])
def test_payload_is_refused_and_does_not_run(payloads, name) -> None:
    marker, files = payloads
    marker.unlink(missing_ok=True)  # each test sees only what it ran
    with pytest.raises(TorchScriptReadError) as err:
        read_torchscript_state_dict(files[name])
    assert str(err.value).startswith(f"{SAFE}: its class __torch__.test_torchscript_read.Payload ")
    assert "__setstate__" in str(err.value)
    with pytest.raises(interop.WeightsError, match=SAFE):
        interop.read_state_dict(files[name])
    assert not marker.exists()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root, n_train=32, n_eval_cls=8, n_eval_ret=0, image_size=32,
                    samples_per_shard=32, seed=0)  # fmt: skip
    return root


def test_payload_through_the_clis_exits_2_without_running(payloads, data, tmp_path, capsys):
    """train.py's model.init_from, an eval CLI's --checkpoint and python -m aclip.interop."""
    marker, files = payloads
    marker.unlink(missing_ok=True)
    payload = files["root"]
    argv = [
        *TINY_MODEL_ARGS, "method=clip", f"model.init_from={payload}",
        f"data.train_shards={data}/train/00000.tar", "data.workers=0", "data.shuffle_buffer=16",
        "data.samples_per_epoch=32", "train.global_batch_size=8", "train.precision=fp32",
        "train.zero_stage=0", "train.progress=false", "train.image_log_every=0",
        "eval.zeroshot_sets=[]", "eval.retrieval_sets=[]", f"train.output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    assert train.main(argv) == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert f"error: {payload}: {SAFE}: its class __torch__.test_torchscript_read.Payload" in err
    cli = ["--checkpoint", str(payload), "--data", str(data / "eval_cls"), "--no-progress",
           "--device", "cpu"]  # fmt: skip
    assert zeroshot_cli.main(cli) == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert f"error: cannot evaluate {payload}" in err and SAFE in err, err
    assert interop.main([str(payload)]) == 2
    assert not marker.exists()
    assert SAFE in capsys.readouterr().err


class _Shell:
    """Pickles as a call of os.system (pickling it runs nothing)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


def test_any_other_name_in_data_pkl_is_refused(payloads, tmp_path) -> None:
    """A data.pkl that calls os.system: refused by name, the command never runs."""
    marker, _ = payloads
    marker.unlink(missing_ok=True)
    torch.manual_seed(0)
    plain = tmp_path / "plain.pt"
    torch.jit.script(nn.Linear(2, 2)).save(str(plain))
    evil = tmp_path / "evil.pt"
    rewrite(plain, evil, {"plain/data.pkl": pickle.dumps(_Shell(f"touch {marker}"), protocol=2)})
    with pytest.raises(TorchScriptReadError, match=f"{SAFE}: it references {os.system.__module__}"):
        read_torchscript_state_dict(evil)
    assert not marker.exists()


def test_damaged_archives_are_refused_naming_the_record(tmp_path) -> None:
    torch.manual_seed(0)
    good = tmp_path / "good.pt"
    torch.jit.script(nn.Linear(3, 2)).save(str(good))
    with zipfile.ZipFile(good) as zf:
        weight = zf.read("good/data/0")
        code = {n: None for n in zf.namelist() if n.startswith("good/code/")}
    cases = {
        "short": ({"good/data/0": weight[:-4]}, "good/data/0 holds 20 bytes; its storage is 6"),
        "missing": ({"good/data/1": None}, "the archive has no record good/data/1"),
        "no code": (code, r"its class __torch__\.torch\.nn\.modules\.linear\..*Linear is not "
                          "declared"),
        "state dict": ({"good/data.pkl": pickle.dumps({"w": 1}, protocol=2)},
                       "data.pkl holds a dict, not a module"),
    }  # fmt: skip
    for name, (change, message) in cases.items():
        bad = tmp_path / f"{name.replace(' ', '_')}.pt"
        rewrite(good, bad, change)
        with pytest.raises(TorchScriptReadError, match=f"{SAFE}: {message}"):
            read_torchscript_state_dict(bad)
