"""Counts and config values that train.py refuses with exit 2 naming the key or the file (shard
stats files, data.samples_per_epoch, data.train_shards, model.image_size), messages that point
the user the right way (directories and wildcards as shards), and the install name."""

from __future__ import annotations

import json
import re
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
from helpers import TINY_RUN_ARGS, write_cli_data

from aclip.config import ConfigError, load_config
from aclip.data.shards import samples_per_epoch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train  # noqa: E402

TINY = [*TINY_RUN_ARGS, "train.image_log_every=0", "train.ckpt_every=0", "train.stop_at_step=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_cli_data(tmp_path_factory.mktemp("synthetic"))


def _main(data: Path, out: Path, shards: str, *extra: str) -> int:
    return train.main(
        [
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            *TINY,
            f"data.train_shards={shards}",
            f"eval.zeroshot_sets=[{data}/eval_cls]",
            f"eval.retrieval_sets=[{data}/eval_ret]",
            f"train.output_dir={out}",
            *extra,
        ]
    )


def _copy_shards(data: Path, tmp_path: Path) -> Path:
    shards = tmp_path / "shards"
    shutil.copytree(data / "train", shards)
    return shards


# ----------------------------------------------------------------------------- shard stats files
@pytest.mark.parametrize(
    ("stats", "why"),
    [
        ('{"successes": 3', "not a readable JSON file"),
        ('{"count": 3}', "no 'successes' count"),
        ('{"successes": "many"}', "must be a whole number of samples (got 'many')"),
        ("[3]", "not a JSON object"),
        ('{"successes": -1000}', "must be between 0 and 1,000,000,000 samples"),
        ('{"successes": 1e11}', "must be a whole number of samples (got 100000000000.0)"),
        ('{"successes": 100000000000}', "(got 100,000,000,000)"),
    ],
)
def test_a_wrong_stats_file_is_refused_naming_it(data, tmp_path, capsys, stats, why):
    """Before: a traceback without the file's name (JSONDecodeError, KeyError, ValueError), or
    an epoch of -968 samples / 28 billion steps accepted."""
    shards = _copy_shards(data, tmp_path)
    (shards / "00000_stats.json").write_text(stats)
    assert _main(data, tmp_path / "run", f"{shards}/{{00000..00001}}.tar") == 2
    err = capsys.readouterr().err
    assert f"{shards}/00000_stats.json" in err and why in err
    assert "data.samples_per_epoch" in err
    assert not (tmp_path / "run").exists()


def test_a_wrong_sizes_json_entry_is_refused_naming_it(tmp_path):
    from aclip.data.shards import ShardCountError

    (tmp_path / "00000.tar").write_bytes(b"")
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": -7}))
    with pytest.raises(ShardCountError, match=r"sizes\.json: '00000\.tar' must be between 0"):
        samples_per_epoch(str(tmp_path / "00000.tar"))
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 7}))
    assert samples_per_epoch(str(tmp_path / "00000.tar")) == 7


# ----------------------------------------------------------------------------- config values
def test_a_negative_samples_per_epoch_is_refused(data, tmp_path, capsys):
    """Before: accepted, an epoch of -5 samples."""
    shards = f"{data}/train/{{00000..00001}}.tar"
    assert _main(data, tmp_path / "run", shards, "data.samples_per_epoch=-5") == 2
    assert "config key 'data.samples_per_epoch': must be >= 1" in capsys.readouterr().err
    # unset and 0 still mean: count the epoch from the shards' stats files
    assert load_config(None, ["data.samples_per_epoch=0"]).data.samples_per_epoch == 0
    assert load_config(None, []).data.samples_per_epoch is None


def test_a_spec_of_no_shard_is_refused(data, tmp_path, capsys):
    """Before: ValueError traceback (exit 1) from expand_urls."""
    assert _main(data, tmp_path / "run", '"::"') == 2
    err = capsys.readouterr().err
    assert "config key 'data.train_shards'" in err and "names no shard" in err


def test_shards_without_samples_stop_with_exit_2_naming_them(data, tmp_path, capsys):
    """A finite stream (data.resampled=false) over tar files that hold no sample. Before:
    RuntimeError traceback (exit 1)."""
    for i in range(2):
        with tarfile.open(tmp_path / f"{i:05d}.tar", "w"):
            pass
    spec = f"{tmp_path}/{{00000..00001}}.tar"
    argv = ("data.resampled=false", "data.samples_per_epoch=64")
    assert _main(data, tmp_path / "run", spec, *argv) == 2
    err = capsys.readouterr().err
    assert "yielded no batch" in err and "data.train_shards" in err
    assert f"{tmp_path}/00000.tar" in err and f"{tmp_path}/00001.tar" in err


@pytest.mark.parametrize(
    ("size", "why"),
    [(36, "36 is not a multiple of the patch size 8x8"), (4, "4 is smaller than one patch (8x8)")],
)
def test_an_image_size_the_patches_do_not_fit_blames_model_image_size(
    data, tmp_path, capsys, size, why
):
    """Before: 36 blamed ema.image_size; 4 raised `k=1 must be in [1, 0]` (exit 1)."""
    shards = f"{data}/train/{{00000..00001}}.tar"
    assert _main(data, tmp_path / "run", shards, f"model.image_size={size}") == 2
    err = capsys.readouterr().err
    assert f"config key 'model.image_size': {why}" in err and "ema.image_size" not in err
    assert not (tmp_path / "run").exists()  # refused before any model is built


def test_an_ema_image_size_the_patches_do_not_fit_blames_ema_image_size(data, tmp_path, capsys):
    shards = f"{data}/train/{{00000..00001}}.tar"
    assert _main(data, tmp_path / "run", shards, "ema.image_size=20") == 2
    err = capsys.readouterr().err
    assert "config key 'ema.image_size'" in err and "model.image_size" not in err


def test_a_block_size_that_does_not_divide_the_grid_is_refused(data, tmp_path, capsys):
    """Before: `ValueError: grid (4, 4) is not divisible by block_size=3` traceback (exit 1)
    at the first step."""
    shards = f"{data}/train/{{00000..00001}}.tar"
    assert _main(data, tmp_path / "run", shards, "mask.block_size=3") == 2
    err = capsys.readouterr().err
    assert "config key 'mask.block_size': the 4x4 patch grid" in err, err
    assert not (tmp_path / "run").exists()
    assert _main(data, tmp_path / "ok", shards, "mask.block_size=2") == 0


def test_a_non_positive_image_size_is_refused():
    with pytest.raises(ConfigError, match=r"model\.image_size"):
        load_config(None, ["model.image_size=0"])


def test_weights_whose_patches_do_not_tile_the_model_are_the_wrong_architecture(tmp_path):
    """interop.check_architecture builds the weights' tower at the model's image size: a patch
    that does not tile it is a different architecture (WeightsError), not a bad model.image_size."""
    from dataclasses import replace

    from helpers import tiny_config

    from aclip.interop import WeightsError, check_architecture
    from aclip.model import build_clip

    model_cfg = tiny_config(str(tmp_path)).model  # 32 px, patch 8
    clip = build_clip(model_cfg)
    weights_cfg = replace(model_cfg, vision_kwargs={**model_cfg.vision_kwargs, "patch_size": 12})
    with pytest.raises(WeightsError, match=r"not the weights' architecture .*patch_size': 12"):
        check_architecture(clip, weights_cfg)


# ----------------------------------------------------------------------------- wrong-way messages
def test_a_directory_of_shards_gets_the_brace_form(data, tmp_path, capsys):
    """Before: 'none of its 1 files exists'."""
    assert _main(data, tmp_path / "run", f"{data}/train") == 2
    err = capsys.readouterr().err
    assert f"use '{data}/train/{{00000..00001}}.tar'" in err and "is a directory" in err
    assert "none of its 1 files" not in err


def test_a_wildcard_of_shards_gets_the_brace_form(data, tmp_path, capsys):
    assert _main(data, tmp_path / "run", f"{data}/train/*.tar") == 2
    err = capsys.readouterr().err
    assert f"use '{data}/train/{{00000..00001}}.tar'" in err and "wildcard" in err
    assert "none of its 1 files" not in err


def test_shards_not_in_one_series_get_the_general_advice(data, tmp_path, capsys):
    for name in ("00000.tar", "00002.tar"):
        shutil.copy(data / "train" / "00000.tar", tmp_path / name)
    assert _main(data, tmp_path / "run", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "2 .tar file(s) (00000.tar, 00002.tar) are not one numbered series" in err
    assert "'DIR/{00000..00011}.tar'" in err


def test_brace_spec_of_found_files(tmp_path):
    from aclip.train.preflight import _brace_spec

    def spec(*names: str) -> str | None:
        return _brace_spec([tmp_path / n for n in names])

    assert spec("00009.tar", "00010.tar", "00011.tar") == f"{tmp_path}/{{00009..00011}}.tar"
    assert spec("s8.tar", "s9.tar", "s10.tar") == f"{tmp_path}/s{{8..10}}.tar"
    assert spec("shard-07.tar") == f"{tmp_path}/shard-07.tar"
    assert spec("00000.tar", "00002.tar") is None  # a gap
    assert spec("8.tar", "09.tar", "10.tar") is None  # mixed padding
    assert spec("a0.tar", "b1.tar") is None  # two stems
    assert spec("0.tar", "1.tar.gz") is None  # two extensions


# ----------------------------------------------------------------------------- install name
def test_no_file_tells_users_to_install_the_unrelated_aclip_distribution():
    """PyPI's `aclip` is another project: the extras are `aclip-pretrain[...]`."""
    wrong = re.compile(r"(?<![\w-])aclip\[")  # aclip[dense], not aclip-pretrain[dense]
    files = [REPO / "README.md", *(REPO / "docs").rglob("*.md")]
    files += [*(REPO / "aclip").rglob("*.py"), *(REPO / "evals").rglob("*.py")]
    offenders = [
        f"{path.relative_to(REPO)}:{n}"
        for path in files
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if wrong.search(line) or "pip install aclip " in line or line.endswith("pip install aclip")
    ]
    assert not offenders, f"install the distribution aclip-pretrain, not aclip: {offenders}"
