"""Eval-time keep ratio of one checkpoint, and periodic evaluation during training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import fake_batch, tiny_config
from PIL import Image
from torch import nn

from aclip.config import to_yaml
from aclip.data.sets.wds import load_wds_classification
from aclip.data.synthetic import write_synthetic
from aclip.data.views import eval_transform
from aclip.eval.evaluate import zero_shot_on_wds
from aclip.interop.run import MODEL_STATES, load_eval_model
from aclip.methods.tokens import num_keep
from aclip.model import build_model
from aclip.studies.keep_ratio import checkpoint_sweep, keep_fn
from aclip.studies.keep_ratio_report import write_checkpoint_outputs
from aclip.tokenizer import Tokenizer
from evals.keep_ratio import main

RATIOS = [1.0, 0.5, 0.25]


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(
        root, n_train=0, n_eval_cls=12, n_eval_ret=0, image_size=48, samples_per_shard=8
    )
    return root / "eval_cls"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random-init run dir: online weights, a differently seeded EMA image side, `latest`."""
    run = tmp_path_factory.mktemp("run")
    cfg = tiny_config(str(run))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss)
    torch.manual_seed(1)
    other = build_model(cfg.model, cfg.loss)
    teacher = nn.ModuleDict({"visual": other.clip.visual, "image_proj": other.clip.image_proj})
    tag = run / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    states = {"module": model.state_dict(), "config": to_yaml(cfg), "ema": teacher.state_dict()}
    torch.save(states, tag / MODEL_STATES)
    (run / "checkpoints" / "latest").write_text(tag.name)
    return run


@pytest.fixture(scope="module")
def sweep(checkpoint, eval_set, tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("keep_eval")
    table = checkpoint_sweep(checkpoint, eval_set, RATIOS, ["attentive", "random"], batch_size=4)
    write_checkpoint_outputs(table, out, "test")
    return table, out


def test_sweep_writes_one_row_per_strategy_and_ratio(sweep):
    table, out = sweep
    points = [(r["strategy"], r["keep_ratio"]) for r in table]
    assert points == [
        ("none", 1.0),
        ("attentive", 0.5),
        ("attentive", 0.25),
        ("random", 0.5),
        ("random", 0.25),
    ]
    assert [r["kept_tokens"] for r in table] == [16, 8, 4, 8, 4]
    assert all(r["images_per_s"] > 0 and r["n"] == 12 for r in table)
    with (out / "results.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == len(table)
    assert "| attentive | 0.25 | 4 |" in (out / "results.md").read_text()
    assert Image.open(out / "results.png").size[0] > 100


def test_all_tokens_row_is_the_plain_zero_shot_result(sweep, checkpoint, eval_set):
    clip, cfg = load_eval_model(checkpoint)
    tokenizer = Tokenizer(cfg.model.context_length)
    plain = zero_shot_on_wds(clip, tokenizer, str(eval_set), cfg.model.image_size, batch_size=4)
    full = sweep[0][0]
    assert full["top1"] == pytest.approx(100.0 * plain["top1"])
    assert full["top5"] == pytest.approx(100.0 * plain["top5"])


def test_attentive_keeps_the_top_k_relevance_patches_of_the_ema_tower(checkpoint, eval_set):
    teacher = load_eval_model(checkpoint, use_ema=True)[0].visual
    dataset, _, _ = load_wds_classification(eval_set, eval_transform(32))
    images = torch.stack([img for img, _ in list(dataset)[:6]])
    k = num_keep(teacher.num_patches, 0.25)
    keep_BK = keep_fn("attentive", 0.25, teacher.grid_hw, teacher)(images)
    with torch.no_grad():
        relevance_BN = teacher.forward_with_relevance(images)[1]
    assert keep_BK.shape == (6, k)
    for relevance_N, keep_K in zip(relevance_BN, keep_BK, strict=True):
        expected = sorted(torch.argsort(relevance_N, descending=True)[:k].tolist())
        assert keep_K.tolist() == expected
        dropped = torch.ones_like(relevance_N, dtype=torch.bool)
        dropped[keep_K] = False
        assert relevance_N[keep_K].min() >= relevance_N[dropped].max()


def test_random_selection_is_seeded_and_none_keeps_everything():
    images = torch.zeros(3, 3, 32, 32)
    first = keep_fn("random", 0.5, (4, 4), seed=7)(images)
    assert torch.equal(first, keep_fn("random", 0.5, (4, 4), seed=7)(images))
    assert first.shape == (3, 8)
    assert keep_fn("none", 1.0, (4, 4)) is None and keep_fn("random", 1.0, (4, 4)) is None
    with pytest.raises(ValueError, match="teacher"):
        keep_fn("attentive", 0.5, (4, 4))


def test_command_line_writes_the_files(checkpoint, eval_set, tmp_path, capsys):
    args = ["checkpoint", "--checkpoint", str(checkpoint), "--data", str(eval_set)]
    args += ["--out", str(tmp_path), "--keep-ratios", "1.0", "0.5", "--strategies", "random"]
    assert main(args + ["--batch-size", "6", "--device", "cpu", "--workers", "0"]) == 0
    assert "| random | 0.5 | 8 |" in capsys.readouterr().out
    assert all((tmp_path / f"results.{ext}").is_file() for ext in ("md", "csv", "png"))
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["strategy"], r["keep_ratio"]) for r in rows] == [("none", 1.0), ("random", 0.5)]


def test_command_line_refuses_missing_paths(checkpoint, eval_set, tmp_path, capsys):
    base = ["checkpoint", "--out", str(tmp_path / "out"), "--workers", "0"]
    assert main(base + ["--checkpoint", str(checkpoint), "--data", str(tmp_path / "no")]) == 2
    assert f"evaluation set directory not found: {tmp_path / 'no'}" in capsys.readouterr().err
    assert main(base + ["--checkpoint", str(tmp_path / "none"), "--data", str(eval_set)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_periodic_eval_logs_zero_shot_metrics_to_tensorboard(tmp_path, eval_set):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from aclip.distributed import init_distributed
    from aclip.train.trainer import Trainer

    overrides = {
        "train.stop_at_step": 4,
        "train.log_every": 4,
        "eval.every_steps": 2,
        "eval.batch_size": 8,
        "eval.zeroshot_sets": f"[{eval_set}]",
    }
    cfg = tiny_config(str(tmp_path / "run"), **overrides)
    trainer = Trainer(cfg, init_distributed())
    trainer.fit(loader=[fake_batch(cfg, 8, seed=i) for i in range(4)])
    trainer.close()
    assert trainer.model.training
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    scalars = events.Scalars("eval/zeroshot/eval_cls/top1")
    assert [s.step for s in scalars] == [2, 4]
    assert all(0.0 <= s.value <= 1.0 for s in scalars)
