"""Reading a checkpoint never runs code (aclip.interop.safe_load): planted payloads at every entry
point that takes a run or a checkpoint are refused (exit 2, no marker), non-checkpoint files are
named by their magic bytes, and real checkpoints still load bit-identically."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL_ARGS, fake_batch, save_untrained_run, tiny_config
from PIL import Image

from aclip.data.synthetic import write_region_sets, write_synthetic
from aclip.interop import run as run_reader
from aclip.interop import safe_load
from aclip.train import checkpoint as ckpt
from aclip.train import checkpoint_files as ckpt_files
from aclip.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402


class Payload:
    """Unpickled without restriction, this creates the directory ``marker`` (no shell)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant_run(run: Path, marker: Path) -> Path:
    """A run directory whose ``latest`` checkpoint's model-states file holds the payload."""
    tag = run / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    states = {"module": {}, "config": "method: aclip\n", "payload": Payload(marker)}
    torch.save(states, tag / run_reader.MODEL_STATES)
    (run / "checkpoints" / "latest").write_text(tag.name)
    return run


def add_payload(file: Path, marker: Path) -> None:
    """Rewrite one of our own checkpoint files with the payload added to its dict."""
    state = torch.load(file, weights_only=False)  # a file this test wrote: trusted
    state["payload"] = Payload(marker)
    torch.save(state, file)


def assert_refused(code: int, capsys, marker: Path, *words: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert not marker.exists(), "the payload ran"
    assert "error:" in err and "weights_only" not in err, err
    for word in words:
        assert word in err, err
    return err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safe_data")
    write_synthetic(root, n_train=32, n_eval_cls=8, n_eval_ret=4, image_size=32,
                    samples_per_shard=16, seed=0)  # fmt: skip
    write_region_sets(root, n_eval=4, image_size=32, samples_per_shard=16)
    seg = root / "seg"
    (seg / "images").mkdir(parents=True)
    (seg / "masks").mkdir()
    Image.new("RGB", (32, 32)).save(seg / "images" / "a.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(seg / "masks" / "a.png")
    (seg / "classnames.txt").write_text("background\ncat\n")
    return root


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PAYLOAD_RAN"


def test_the_payload_is_live_and_safe_load_refuses_it(tmp_path, marker) -> None:
    """Unrestricted unpickling runs the payload (the tests below would catch a reader that does
    it); safe_load.load refuses the same file, naming the type and not advising to unpickle."""
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": Payload(marker)}, evil)
    torch.load(evil, weights_only=False)
    assert marker.is_dir()
    marker.rmdir()
    with pytest.raises(safe_load.UnsafeCheckpointError, match="posix.mkdir") as info:
        safe_load.load(evil)
    assert not marker.exists()
    assert "--trust-checkpoint" in str(info.value) and "weights_only" not in str(info.value)


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "a JPEG image"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "a PNG image"),
        (b"\x1f\x8b\x08\x00\x00\x00", "a gzip-compressed file"),
        (b"\x80\x04\x95\x05\x00\x00\x00", "a plain pickle file (not written by torch.save)"),
        (b"model: ViT-B-16\n", "a text file (beginning 'model: ViT-B-16')"),
        (b"", "an empty file"),
    ],
)
def test_non_checkpoint_files_are_named_by_their_magic_bytes(tmp_path, head, kind) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(head + b"\x00" * 32 if head else b"")
    assert safe_load.file_kind(path) == kind
    with pytest.raises(safe_load.CheckpointError, match="not a PyTorch checkpoint") as info:
        safe_load.load(path)
    assert kind in str(info.value) and "weights_only" not in str(info.value)


def test_torch_files_are_recognised_in_both_formats(tmp_path) -> None:
    for zipped, protocol in ((True, 2), (False, 2), (False, 4)):  # 4: a FRAME before the magic
        path = tmp_path / f"sd_{zipped}_{protocol}.pt"
        torch.save({"w": torch.arange(3)}, path, _use_new_zipfile_serialization=zipped,
                   pickle_protocol=protocol)  # fmt: skip
        assert safe_load.file_kind(path) is None
        if protocol == 2:  # torch's restricted unpickler has no FRAME opcode
            assert torch.equal(safe_load.load(path)["w"], torch.arange(3))


def test_fp16_dynamic_loss_scaler_is_read(tmp_path) -> None:
    """A GPU fp16 run's optimizer states hold DeepSpeed's DynamicLossScaler (CPU runs train fp16
    as fp32, so no test run writes one): built as DeepSpeed builds it, it reads back whole."""
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler

    args = {"init_scale": 2**16, "scale_window": 1000, "min_scale": 1, "delayed_shift": 2,
            "consecutive_hysteresis": False, "raise_error_at_min_scale": True}  # fmt: skip
    scaler = CreateLossScaler(torch.half, 0, True, args)
    scaler.cur_iter, scaler.cur_scale = 7, 2.0**14
    torch.save({"loss_scaler": scaler}, tmp_path / "optim.pt")
    back = safe_load.load(tmp_path / "optim.pt")["loss_scaler"]
    assert type(back) is type(scaler) and vars(back) == vars(scaler)


# ------------------------------------------------------------------ every entry point
def _eval_argvs(run: Path, data: Path, out: Path) -> dict[str, list[str]]:
    cls, run_s = str(data / "eval_cls"), str(run)
    return {
        "zeroshot": ["--checkpoint", run_s, "--data", cls, "--no-progress"],
        "retrieval": ["--checkpoint", run_s, "--data", str(data / "eval_ret"), "--no-progress"],
        "segmentation": [
            "--checkpoint",
            run_s,
            "--dataset",
            "generic",
            "--root",
            str(data / "seg"),
            "--no-progress",
        ],  # fmt: skip
        "region": ["--checkpoint", run_s, "--data", str(data / "eval_region"), "--no-progress"],
        "probe": ["--checkpoint", run_s, "--data", cls, "--no-progress"],
        "keep_ratio": [
            "checkpoint",
            "--checkpoint",
            run_s,
            "--data",
            cls,
            "--out",
            str(out),
            "--workers",
            "0",
        ],  # fmt: skip
    }


@pytest.mark.parametrize(
    "cli", ["zeroshot", "retrieval", "segmentation", "region", "probe", "keep_ratio"]
)
def test_eval_clis_refuse_a_planted_checkpoint(cli, data, tmp_path, marker, capsys) -> None:
    import importlib

    run = plant_run(tmp_path / "run", marker)
    main = importlib.import_module(f"evals.{cli}").main
    code = main(_eval_argvs(run, data, tmp_path / "out")[cli])
    assert_refused(
        code, capsys, marker, run_reader.MODEL_STATES, "posix.mkdir", "--trust-checkpoint"
    )


def test_demo_report_refuses_a_planted_run(data, tmp_path, marker, capsys) -> None:
    from evals import demo_report

    run = plant_run(tmp_path / "run", marker)
    code = demo_report.main(["--run", str(run), "--data", str(data)])
    assert_refused(code, capsys, marker, "posix.mkdir")


def test_export_refuses_a_bare_payload_file_and_a_planted_run(tmp_path, marker, capsys) -> None:
    from aclip.interop import export as export_cli

    evil = tmp_path / "evil.pt"
    torch.save({"module": {}, "config": "", "x": Payload(marker)}, evil)
    code = export_cli.main(["--checkpoint", str(evil), "--out", str(tmp_path / "out")])
    assert_refused(code, capsys, marker, "evil.pt", "posix.mkdir")
    run = plant_run(tmp_path / "run", marker)
    code = export_cli.main(["--checkpoint", str(run), "--out", str(tmp_path / "out")])
    assert_refused(code, capsys, marker, "posix.mkdir")


def _train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "configs/demo.yaml"), *TINY_MODEL_ARGS,
        "train.global_batch_size=8", "train.precision=fp32", "train.progress=false",
        "train.stop_at_step=2", "train.ckpt_every=2", "train.image_log_every=0",
        "data.workers=0", "data.shuffle_buffer=8", "eval.zeroshot_sets=[]",
        "eval.retrieval_sets=[]", f"data.train_shards={data}/train/{{00000..00001}}.tar",
        f"train.output_dir={out}", *extra,
    ]  # fmt: skip


def test_train_refuses_planted_init_from_and_resume(data, tmp_path, marker, capsys) -> None:
    """model.init_from=<planted run>, train.resume=<planted step dir> and train.resume=latest
    over a planted checkpoints/ (DeepSpeed's own read of the model states): exit 2."""
    run = plant_run(tmp_path / "planted", marker)
    code = train.main(_train_argv(data, tmp_path / "a", f"model.init_from={run}"))
    assert_refused(code, capsys, marker, "posix.mkdir", "train.trust_checkpoint=true")
    tag = run / "checkpoints" / "step_00000001"
    code = train.main(_train_argv(data, tmp_path / "b", f"train.resume={tag}"))
    assert_refused(code, capsys, marker, "posix.mkdir")
    code = train.main(_train_argv(data, run, "train.resume=latest"))
    assert_refused(code, capsys, marker, "posix.mkdir")


def test_resume_latest_refuses_planted_optimizer_states(data, tmp_path, marker, capsys) -> None:
    """A real ZeRO-1 run whose optimizer-states file (read by DeepSpeed's engine) was given a
    payload and a matching manifest: resume=latest exits 2, the payload does not run."""
    out = tmp_path / "run"
    assert train.main(_train_argv(data, out, "train.zero_stage=1")) == 0
    capsys.readouterr()
    ckpt_dir = out / "checkpoints"
    tag = ckpt_dir / (ckpt_dir / "latest").read_text()
    (optim,) = tag.glob("*optim_states.pt")
    add_payload(optim, marker)
    ckpt_files.commit_checkpoint(ckpt_dir, tag.name)  # the manifest agrees: only safety can refuse
    code = train.main(_train_argv(data, out, "train.zero_stage=1", "train.resume=latest",
                                  "train.stop_at_step=3"))  # fmt: skip
    assert_refused(code, capsys, marker, optim.name, "posix.mkdir")


def test_resume_refuses_a_planted_rank_file(tmp_path, dist_info, marker) -> None:
    cfg = tiny_config(str(tmp_path))
    trainer = Trainer(cfg, dist_info)
    trainer.train_step(fake_batch(cfg, 8, seed=0))
    tag = trainer.save_checkpoint()
    trainer.close()
    add_payload(tag / "rank_00000.pt", marker)
    ckpt_files.commit_checkpoint(tag.parent, tag.name)
    resumed = Trainer(cfg, dist_info)
    with pytest.raises(safe_load.UnsafeCheckpointError, match="rank_00000.pt"):
        resumed.resume("latest")
    resumed.close()
    assert not marker.exists()


# ------------------------------------------------------------------ bf16: zero_to_fp32
@pytest.fixture(scope="module")
def bf16_tag(tmp_path_factory, dist_info) -> Path:
    cfg = tiny_config(str(tmp_path_factory.mktemp("bf16")),
                      **{"train.precision": "bf16", "train.zero_stage": 1})  # fmt: skip
    trainer = Trainer(cfg, dist_info)
    for i in range(2):
        trainer.train_step(fake_batch(cfg, 8, seed=10 + i))
    tag = trainer.save_checkpoint()
    trainer.close()
    return tag


def test_bf16_fp32_weights_read_safely_equal_deepspeeds_unrestricted_read(bf16_tag) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    unsafe = get_fp32_state_dict_from_zero_checkpoint(str(bf16_tag.parent), tag=bf16_tag.name)
    clip, _ = run_reader.load_eval_model(bf16_tag)
    ours = clip.state_dict()
    clip_keys = [k for k in unsafe if k.startswith("clip.")]
    assert clip_keys and set(ours) == {k[5:] for k in clip_keys}
    for key in clip_keys:
        assert unsafe[key].dtype == torch.float32
        assert torch.equal(ours[key[5:]], unsafe[key]), key


def test_zero_to_fp32_refuses_planted_optimizer_states(bf16_tag, data, tmp_path, marker, capsys):
    """The bf16 run's genuine model states with a payload in its optimizer states (which only
    zero_to_fp32 reads, for the fp32 weights): load_eval_model and evals.zeroshot refuse."""
    import shutil

    from evals import zeroshot

    tag = tmp_path / "checkpoints" / bf16_tag.name
    shutil.copytree(bf16_tag, tag)
    (tag.parent / "latest").write_text(tag.name)
    (optim,) = tag.glob("*optim_states.pt")
    add_payload(optim, marker)
    with pytest.raises(safe_load.UnsafeCheckpointError, match=optim.name):
        run_reader.load_eval_model(tag)
    assert not marker.exists()
    code = zeroshot.main(["--checkpoint", str(tmp_path), "--data", str(data / "eval_cls"),
                          "--no-progress"])  # fmt: skip
    assert_refused(code, capsys, marker, optim.name, "posix.mkdir")


# ------------------------------------------------------------------ what the user sees
def test_a_jpeg_given_as_a_checkpoint_is_named(data, tmp_path, capsys) -> None:
    from aclip.interop import export as export_cli
    from evals import zeroshot

    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(photo)
    for run in (
        lambda: zeroshot.main(["--checkpoint", str(photo), "--data", str(data / "eval_cls")]),
        lambda: export_cli.main(["--checkpoint", str(photo), "--out", str(tmp_path / "out")]),
        lambda: train.main(_train_argv(data, tmp_path / "run", f"model.init_from={photo}")),
    ):
        code = run()
        err = capsys.readouterr().err
        assert code == 2 and "photo.jpg is a JPEG image, not a PyTorch checkpoint" in err, err
        assert "weights_only" not in err


@pytest.mark.parametrize("cli", ["zeroshot", "segmentation"])
def test_trust_checkpoint_reads_what_it_otherwise_refuses(cli, data, tmp_path, marker, capsys):
    """--trust-checkpoint unpickles without restriction (the payload runs, with a warning, and
    the evaluation goes on); the next command line without it refuses again."""
    import importlib

    main = importlib.import_module(f"evals.{cli}").main
    run = tmp_path / "run"
    save_untrained_run(run)
    add_payload(run / "checkpoints" / "global_step0" / run_reader.MODEL_STATES, marker)
    argv = _eval_argvs(run, data, tmp_path / "out")[cli]
    assert main([*argv, "--trust-checkpoint"]) == 0
    assert marker.is_dir() and "declared trusted" in capsys.readouterr().err
    marker.rmdir()
    assert_refused(main(argv), capsys, marker, "posix.mkdir")


def test_rank_files_store_numpy_rng_without_numpy_types_and_old_ones_still_resume(tmp_path):
    """The rank file's numpy RNG state is a tensor now (no numpy type to allow); a rank file
    written before (a numpy array) is still read safely and restores the same draws."""
    np.random.seed(3)
    random.seed(3)
    new, old = tmp_path / "new.pt", tmp_path / "old.pt"
    torch.save({"rng": ckpt.rng_state()}, new)
    torch.save({"rng": ckpt.rng_state() | {"numpy": np.random.get_state()}}, old)
    want = np.random.rand(4)
    torch.load(new, weights_only=True)  # no allow-list needed
    for path in (new, old):
        state = safe_load.load(path, extra_globals=safe_load.numpy_rng_globals())
        ckpt.set_rng_state(state["rng"])
        assert np.array_equal(np.random.rand(4), want)


def test_a_checkpoint_whose_weights_do_not_fit_its_config_exits_2(data, tmp_path, capsys):
    """A damaged model-states file (here: no weights at all) is an error naming the file, not a
    load_state_dict traceback."""
    from aclip.config import to_yaml
    from evals import zeroshot

    tag = tmp_path / "run" / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    torch.save(
        {"module": {}, "config": to_yaml(tiny_config(str(tmp_path)))}, tag / run_reader.MODEL_STATES
    )
    code = zeroshot.main(["--checkpoint", str(tag), "--data", str(data / "eval_cls")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{tag / run_reader.MODEL_STATES}: its weights do not fit the model" in err
