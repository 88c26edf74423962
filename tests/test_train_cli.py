"""train.py end to end on generated shards: refusals, a short run, results, resume."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from helpers import TINY_RUN_ARGS, write_cli_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

TINY = [*TINY_RUN_ARGS, "train.log_every=2", "train.image_log_every=2", "train.ckpt_every=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_cli_data(tmp_path_factory.mktemp("synthetic"))


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config",
        "configs/demo.yaml",
        *TINY,
        f"data.train_shards={data}/train/{{00000..00001}}.tar",
        f"eval.zeroshot_sets=[{data}/eval_cls]",
        f"eval.retrieval_sets=[{data}/eval_ret]",
        f"train.output_dir={out}",
        *extra,
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["mask.keep_ratoi=0.5"], "mask.keep_ratoi"),
        (["mask.keep_ratio=1.5"], "mask.keep_ratio"),
        (["data.train_shards=/nonexistent/{00000..00003}.tar"], "data.train_shards"),
        (["eval.zeroshot_sets=[/nonexistent/set]"], "eval.zeroshot_sets"),
        (["train.output_dir=/proc/aclip_run"], "train.output_dir"),
    ],
)
def test_bad_config_is_refused_before_any_work(data, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    argv = _args(data, tmp_path / "run") + extra
    assert train.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("key", "set_name", "message"),
    [
        ("eval.retrieval_sets", "eval_cls", "is a classification set"),
        ("eval.zeroshot_sets", "eval_ret", "is a retrieval set"),
    ],
)
def test_eval_set_of_the_wrong_kind_is_refused_before_any_model(
    data, tmp_path, capsys, monkeypatch, key, set_name, message
):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setattr(train, "run", lambda cfg: pytest.fail("the run started"))
    assert train.main(_args(data, tmp_path / "run", f"{key}=[{data}/{set_name}]")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {key}: evaluation set {data}/{set_name} {message}")
    assert "expected a" in err
    assert not (tmp_path / "run").exists()


def test_failing_final_evaluation_is_recorded_and_loses_nothing(data, tmp_path, monkeypatch,
                                                                 capsys):  # fmt: skip
    import shutil
    import tarfile

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    bad = tmp_path / "bad_ret"  # its first sample is fine (pre-flight passes); the fifth lacks .txt
    shutil.copytree(data / "eval_ret", bad)
    shard = bad / "test" / "0.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.name != "s0000004.txt"]
    with tarfile.open(shard, "w") as tar:
        for info, payload in members:
            tar.addfile(info, io.BytesIO(payload))
    out = tmp_path / "run"
    retrieval = f"eval.retrieval_sets=[{data}/eval_ret,{bad}]"
    assert train.main(_args(data, out, "train.stop_at_step=2", retrieval)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == 2
    assert results["zeroshot/eval_cls"]["n"] == 20  # the other sets still ran
    assert results["retrieval/eval_ret"]["n_images"] == 8
    assert results["retrieval/bad_ret"] == {
        "error": f"ValueError: sample s0000004 in {shard} has no .txt captions"
    }
    assert "evaluation retrieval/bad_ret" in capsys.readouterr().err
    assert (out / "checkpoints" / "step_00000002").is_dir()


def test_short_run_writes_everything_and_resumes(data, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    out = tmp_path / "run"
    assert train.main(_args(data, out, "train.stop_at_step=3")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == 3
    metrics = results["zeroshot/eval_cls"]
    assert metrics["n"] == 20 and 0.0 <= metrics["top1"] <= 1.0
    retrieval = results["retrieval/eval_ret"]
    assert (retrieval["n_images"], retrieval["n_texts"]) == (8, 40)
    assert 0.0 <= retrieval["text_retrieval_recall@1"] <= retrieval["text_retrieval_recall@5"] <= 1
    assert "strategy: attentive" in (out / "config.yaml").read_text()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(out / "tb"))
    scalars.Reload()
    for tag in ("loss/clip", "train/ema_momentum", "perf/data_wait_fraction", "data/skipped"):
        assert tag in scalars.Tags()["scalars"], tag
    assert [e.value for e in scalars.Scalars("data/skipped")] == [0.0, 0.0]  # steps 2, 3: clean
    tags = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert tags == ["step_00000002", "step_00000003"]

    assert train.main(_args(data, out, "train.stop_at_step=5", "train.resume=latest")) == 0
    assert json.loads((out / "results.json").read_text())["step"] == 5
    tags = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert tags[-1] == "step_00000005"


def test_eval_model_loads_online_and_ema_weights(data, tmp_path, monkeypatch):
    import torch

    from aclip.interop.run import find_checkpoint, load_eval_model

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    out = tmp_path / "run"
    assert (
        train.main(
            _args(data, out, "train.stop_at_step=2", "ema.momentum=0.5", "ema.final_momentum=0.5")
        )
        == 0
    )
    states_file = find_checkpoint(out)
    assert find_checkpoint(out / "checkpoints") == states_file
    assert find_checkpoint(out / "checkpoints" / "step_00000002") == states_file
    states = torch.load(states_file, weights_only=False)
    online, cfg = load_eval_model(out)
    ema, _ = load_eval_model(out, use_ema=True)
    assert cfg.train.stop_at_step == 2 and not online.training
    key = "visual.vit.blocks.0.attn.qkv.weight"
    torch.testing.assert_close(online.state_dict()[key], states["module"][f"clip.{key}"])
    torch.testing.assert_close(ema.state_dict()[key], states["ema"][key])
    assert not torch.equal(ema.state_dict()[key], online.state_dict()[key])
    text_key = "text.token_embedding.weight"
    torch.testing.assert_close(ema.state_dict()[text_key], online.state_dict()[text_key])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        find_checkpoint(tmp_path / "nothing")


def _corrupt_images(shard: Path) -> None:
    """Rewrite ``shard`` with every image's bytes replaced by garbage."""
    import io
    import tarfile

    members = []
    with tarfile.open(shard) as tar:
        for info in tar.getmembers():
            data = tar.extractfile(info).read()
            members.append((info, b"not a jpeg" if info.name.endswith(".jpg") else data))
    with tarfile.open(shard, "w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_run_stops_naming_the_shard_when_too_many_samples_are_bad(data, tmp_path, monkeypatch,
                                                                   capsys):  # fmt: skip
    import shutil

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    _corrupt_images(bad / "train" / "00001.tar")
    args = _args(
        bad,
        tmp_path / "run",
        "train.stop_at_step=6",
        "data.max_skip_fraction=0.2",
        "data.resampled=false",
    )  # every shard once per epoch
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "training samples were bad" in err and "corrupt_image=" in err
    assert "00001.tar" in err


def test_epoch_size_from_the_stats_that_exist_and_a_clear_refusal(data, tmp_path, monkeypatch,
                                                                   capsys):  # fmt: skip
    """Shards missing: the epoch is what the others' stats count, printed and recorded in the
    run's config.yaml; a shard without stats: refused before any work, naming it."""
    import shutil

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    shards = tmp_path / "shards"
    shutil.copytree(data / "train", shards)
    (shards / "sizes.json").unlink()
    spec = f"data.train_shards={shards}/{{00000..00003}}.tar"  # 00002 and 00003 are missing
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="2 of 4 shards are missing"):
        # (a missing shard's read counts as one skip: allow it beside 8 samples)
        argv = [*_args(data, out, "train.stop_at_step=1", "data.max_skip_fraction=0.5"), spec]
        assert train.main(argv) == 0
    printed = capsys.readouterr().out
    want = "epoch: 64 samples = 8 steps of batch 8; schedule: 18 steps (2.25 epochs), stopping at "
    assert want in printed
    assert "samples_per_epoch: 64" in (out / "config.yaml").read_text()

    (shards / "00001_stats.json").unlink()
    assert train.main([*_args(data, tmp_path / "run2"), spec]) == 2
    err = capsys.readouterr().err
    assert "data.samples_per_epoch" in err and f"{shards}/00001.tar" in err
    assert "00000.tar" not in err
    assert not (tmp_path / "run2").exists()
