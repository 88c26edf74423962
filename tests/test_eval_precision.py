"""One evaluation precision rule: the trainer's final evaluation (``eval.precision``) and the eval
CLIs (``--precision``) compute the same numbers on the same checkpoint, and every results JSON
records the precision it was computed at."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODEL_ARGS, TINY_RUN_ARGS

from aclip.config import ConfigError, load_config
from aclip.data.synthetic import write_synthetic
from evals import retrieval as ret_cli
from evals import zeroshot as zs_cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

# a short run in bf16 autocast (fp32 weights): before issue 23 its final evaluation ran under
# that autocast while the CLIs ran fp32, and results.json disagreed with aclip-zeroshot
TINY_AMP = [*TINY_RUN_ARGS, "train.precision=amp_bf16", "train.stop_at_step=3",
            "train.ckpt_every=3", "train.image_log_every=0"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(
        root, n_train=48, n_eval_cls=60, n_eval_ret=30, image_size=48, samples_per_shard=24, seed=0
    )
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """``trained(precision)``: the same training run, its final evaluation at ``precision``
    (fp32: the default, no eval.precision given); each trained once."""
    runs: dict[str, Path] = {}

    def get(precision: str) -> Path:
        if precision not in runs:
            run = tmp_path_factory.mktemp(f"run_{precision}")
            extra = [] if precision == "fp32" else [f"eval.precision={precision}"]
            argv = ["--config", str(ROOT / "configs" / "demo.yaml"), *TINY_AMP,
                    f"data.train_shards={data}/train/{{00000..00001}}.tar",
                    f"eval.zeroshot_sets=[{data}/eval_cls]",
                    f"eval.retrieval_sets=[{data}/eval_ret]", f"train.output_dir={run}",
                    *extra]  # fmt: skip
            assert train.main(argv) == 0
            runs[precision] = run
        return runs[precision]

    return get


def _cli(main, run: Path, data: Path, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "cli.json"
    argv = ["--checkpoint", str(run), "--data", str(data), "--batch-size", "16", "--no-progress"]
    assert main([*argv, *extra, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _metrics(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "precision"}


@pytest.mark.parametrize("precision", ["fp32", "amp_bf16"])
def test_final_results_equal_the_clis_at_the_same_precision(trained, data, tmp_path, precision):
    run = trained(precision)
    results = json.loads((run / "results.json").read_text())
    flag = [] if precision == "fp32" else ["--precision", precision]  # fp32: both defaults
    zeroshot = _cli(zs_cli.main, run, data / "eval_cls", tmp_path, *flag)
    retrieval = _cli(ret_cli.main, run, data / "eval_ret", tmp_path, *flag)
    assert _metrics(results["zeroshot/eval_cls"]) == _metrics(zeroshot)  # every metric, exactly
    assert _metrics(results["retrieval/eval_ret"]) == _metrics(retrieval)
    # ... and every JSON says at which precision
    assert zeroshot["precision"] == retrieval["precision"] == precision
    assert results["zeroshot/eval_cls"] == zeroshot and results["retrieval/eval_ret"] == retrieval


def test_the_precision_changes_the_numbers(trained, data, tmp_path):
    """The CLI's two precisions on one checkpoint differ: the autocast is really applied (bf16
    scores rank this tiny model's near-ties differently; image R@1 0.013 vs 0.060 here)."""
    run = trained("fp32")
    fp32 = _cli(ret_cli.main, run, data / "eval_ret", tmp_path, "--precision", "fp32")
    bf16 = _cli(ret_cli.main, run, data / "eval_ret", tmp_path, "--precision", "amp_bf16")
    assert _metrics(fp32) != _metrics(bf16)


def test_precision_names_and_autocast():
    from aclip.eval.evaluate import eval_autocast, resolve_eval_precision

    assert resolve_eval_precision("amp", "cpu") == "amp_bf16"  # torch.autocast's CPU dtype
    assert resolve_eval_precision("amp", "cuda") == "amp_fp16"  # CLIP_benchmark's --amp on GPUs
    with pytest.raises(ValueError, match="'fp16'"):
        resolve_eval_precision("fp16", "cpu")
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    for precision, dtype in (("amp_bf16", torch.bfloat16), ("amp_fp16", torch.float16),
                             ("fp32", torch.float32)):  # fmt: skip
        # inside a caller's bf16 autocast: fp32 turns it off, the others set their dtype
        with torch.autocast("cpu", dtype=torch.bfloat16), eval_autocast(precision, "cpu"):
            assert (a @ b).dtype == dtype, precision


def test_bad_precision_is_refused_naming_the_key_or_flag(data, tmp_path, capsys):
    with pytest.raises(ConfigError, match="eval.precision"):
        load_config(None, ["eval.precision=bf16"])
    assert load_config(None, []).eval.precision == "fp32"
    with pytest.raises(SystemExit) as exit_info:
        zs_cli.main(["--checkpoint", str(tmp_path), "--data", str(data), "--precision", "bf16"])
    assert exit_info.value.code == 2 and "--precision" in capsys.readouterr().err


def test_every_eval_cli_takes_precision_and_records_it(trained, data, tmp_path, capsys):
    from aclip.data.synthetic import write_region_sets, write_segmentation_set
    from aclip.dense.heads import HEADS
    from evals import keep_ratio, probe, region, segmentation

    run, out = str(trained("fp32")), tmp_path / "out.json"
    amp = ["--precision", "amp_bf16", "--json", str(out)]
    assert probe.main(["--checkpoint", run, "--data", str(data / "eval_cls"), "--no-progress",
                       *amp]) == 0  # fmt: skip
    assert json.loads(out.read_text())["precision"] == "amp_bf16"
    write_region_sets(tmp_path / "regions", n_eval=6, image_size=48, samples_per_shard=6)
    regions = str(tmp_path / "regions" / "eval_region")
    assert region.main(["--checkpoint", run, "--data", regions, "--no-progress", *amp]) == 0
    assert json.loads(out.read_text())["precision"] == "amp_bf16"
    seg = write_segmentation_set(tmp_path / "seg", 2, image_size=48)
    fast = ["--set", "short_side=48", "--set", "slide_crop=32", "--set", "slide_stride=16"]
    assert segmentation.main(["--checkpoint", run, "--dataset", "generic", "--root", str(seg),
                              "--settings", str(ROOT / "configs/dense/synthetic.yaml"),
                              "--head", "all", "--no-progress", *fast, *amp]) == 0  # fmt: skip
    per_head = json.loads(out.read_text())
    assert list(per_head) == list(HEADS)  # every head runs under bf16 autocast
    assert {m["precision"] for m in per_head.values()} == {"amp_bf16"}
    sweep = tmp_path / "sweep"
    assert keep_ratio.main(["checkpoint", "--checkpoint", run, "--data", str(data / "eval_cls"),
                            "--out", str(sweep), "--keep-ratios", "1.0", "0.5", "--workers", "0",
                            "--precision", "amp_bf16"]) == 0  # fmt: skip
    rows = json.loads((sweep / "results.json").read_text())
    assert {r["precision"] for r in rows} == {"amp_bf16"}
    capsys.readouterr()


def test_keep_ratio_study_table_records_its_runs_precision(tmp_path, monkeypatch, capsys):
    import subprocess

    from aclip.studies import keep_ratio_runs
    from evals import keep_ratio

    def fake_train(cmd, **kwargs):  # a finished run whose results say how it was evaluated
        out = Path(next(a.split("=", 1)[1] for a in cmd if a.startswith("train.output_dir=")))
        out.mkdir(parents=True)
        metrics = {"top1": 0.5, "precision": "amp_bf16"}
        (out / "results.json").write_text(json.dumps({"step": 7, "zeroshot/x": metrics}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(keep_ratio_runs.subprocess, "run", fake_train)
    argv = ["study", "--out", str(tmp_path / "s"), "--strategies", "random", "--keep-ratios",
            "0.5", "--title", "t", *TINY_MODEL_ARGS]  # fmt: skip
    assert keep_ratio.main(argv) == 0
    rows = json.loads((tmp_path / "s" / "results.json").read_text())
    assert [r["eval_precision"] for r in rows] == ["amp_bf16"]
    capsys.readouterr()
