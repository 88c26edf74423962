"""The keep-ratio study driver: its grid, its summary and the files it writes."""

from __future__ import annotations

import csv

import pytest
from helpers import TINY_MODEL_ARGS
from PIL import Image

from aclip.studies.keep_ratio_report import write_outputs
from aclip.studies.keep_ratio_runs import (
    REPO,
    GridPoint,
    equal_cost_steps,
    equal_time_steps,
    grid,
    point_cost,
    summarise,
)


def test_grid_runs_none_once_per_views_and_seed():
    points = grid(["none", "random", "attentive"], [0.25, 0.5], [2], [0, 1])
    names = [p.name for p in points]
    assert len(points) == 2 * 1 + 2 * 2 * 2  # none: 2 seeds; random/attentive: 2 ratios x 2 seeds
    assert "none_k1_v2_s0" in names and "attentive_k0.25_v2_s1" in names
    assert len(set(names)) == len(names)


def test_single_view_points_switch_simclr_off():
    assert "loss.w_simclr=0" in GridPoint("random", 0.5, 1, 0).overrides()
    assert "loss.w_simclr=0" not in GridPoint("random", 0.5, 2, 0).overrides()
    assert "mask.keep_ratio=1.0" in GridPoint("none", 1.0, 2, 0).overrides()


def test_summary_means_over_seeds_and_files_are_written(tmp_path):
    rows = [
        (GridPoint("random", 0.5, 2, 0), 40.0),
        (GridPoint("random", 0.5, 2, 1), 44.0),
        (GridPoint("attentive", 0.5, 2, 0), 50.0),
    ]
    table = summarise(rows)
    by_key = {(r["strategy"], r["keep_ratio"]): r for r in table}
    assert by_key[("random", 0.5)]["top1_mean"] == pytest.approx(42.0)
    assert by_key[("random", 0.5)]["top1_std"] == pytest.approx(2.8284271)
    assert by_key[("attentive", 0.5)]["runs"] == 1
    write_outputs(table, tmp_path, "test")
    with (tmp_path / "results.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 2
    assert (
        "| attentive | 0.5 | 2 | model | – | config | – | 1 | 50.0 ± 0.0 |"
        in (tmp_path / "results.md").read_text()
    )
    assert Image.open(tmp_path / "results.png").size[0] > 100


def test_metric_comes_from_the_named_eval_set():
    from aclip.studies.keep_ratio_runs import _top1

    results = {"step": 5, "zeroshot/eval_cls": {"top1": 0.1}, "zeroshot/eval_colour": {"top1": 0.9}}
    assert _top1(results) == pytest.approx(10.0)
    assert _top1(results, "eval_colour") == pytest.approx(90.0)
    with pytest.raises(ValueError, match="eval_ret"):
        _top1(results, "eval_ret")


def _cost_table() -> list[dict]:
    points = grid(["attentive"], [0.5], [2], [0, 1], teacher_sizes=[0, 32])
    names = [p.name for p in points]
    assert names == ["attentive_k0.5_v2_s0", "attentive_k0.5_v2_s1",
                     "attentive_k0.5_v2_t32_s0", "attentive_k0.5_v2_t32_s1"]  # fmt: skip
    assert "ema.image_size=32" in points[2].overrides()
    assert not any(o.startswith("ema.") for o in points[0].overrides())
    config = str(REPO / "configs" / "demo.yaml")
    full, cheap = point_cost(points[0], config), point_cost(points[2], config)
    assert (full["teacher_px"], cheap["teacher_px"]) == (64, 32)
    # demo ViT: 8-px patches; the teacher sees 16 patches instead of 64
    assert cheap["gflop_per_sample"] < full["gflop_per_sample"]
    assert 0.2 < cheap["teacher_gflop_per_sample"] / full["teacher_gflop_per_sample"] < 0.3
    costs = {points[0]: full, points[2]: cheap}
    rows = [(points[0], 90.0), (points[2], 88.0)]
    table = summarise(rows, costs.__getitem__)
    assert [(r["teacher_size"], r["teacher_px"]) for r in table] == [(0, 64), (32, 32)]
    return table


def test_teacher_resolution_axis_names_overrides_and_costs():
    assert len(_cost_table()) == 2


def test_study_table_and_plot_show_accuracy_against_cost(tmp_path):
    table = _cost_table()
    write_outputs(table, tmp_path, "cost")
    text = (tmp_path / "results.md").read_text()
    assert "| teacher px | GFLOP/sample |" in text
    assert f"| 32 | {table[1]['gflop_per_sample']:.4g} |" in text
    assert Image.open(tmp_path / "results.png").size[0] > 1000  # two panels


TINY = [
    *TINY_MODEL_ARGS,
    "data.samples_per_epoch=800",
    "train.global_batch_size=8",
    "optim.epochs=1",
]


def test_equal_cost_gives_cheaper_runs_more_steps_for_the_same_flops():
    from aclip.config import load_config
    from aclip.methods.flops import config_step_flops

    points = grid(["none", "random", "attentive"], [0.25, 0.5], [2], [0])
    scaled = equal_cost_steps(points, None, TINY)
    by_name = {(p.strategy, p.keep_ratio): p for p in scaled}
    assert by_name[("none", 1.0)].steps == 0  # the config's own 100 steps: the same run
    flops = {}
    for p in scaled:
        cfg = load_config(None, [*TINY, *p.overrides()])
        flops[p] = config_step_flops(cfg).total
    budget = 100 * flops[by_name[("none", 1.0)]]
    for key in [("random", 0.25), ("attentive", 0.25), ("random", 0.5), ("attentive", 0.5)]:
        p = by_name[key]
        assert p.steps > 100
        assert abs(p.steps * flops[p] - budget) <= flops[p] / 2  # rounded to the nearest step
        assert f"optim.total_steps={p.steps}" in p.overrides()
        assert p.name.endswith(f"_n{p.steps}_s0")
    assert by_name[("attentive", 0.25)].steps > by_name[("attentive", 0.5)].steps


def _write_wall(out, point: GridPoint, seconds: float) -> None:
    import json

    (out / point.name).mkdir(parents=True)
    (out / point.name / "study_time.json").write_text(json.dumps({"train_wall_s": seconds}))


def test_equal_time_scales_steps_by_the_measured_wall_times_over_seeds(tmp_path):
    walls = {("none", 1.0): (100.0, 110.0), ("random", 0.5): (50.0, 55.0),
             ("attentive", 0.5): (80.0, 80.0)}  # fmt: skip
    for (strategy, ratio), per_seed in walls.items():
        for seed, seconds in enumerate(per_seed):
            _write_wall(tmp_path, GridPoint(strategy, ratio, 2, seed), seconds)
    points = grid(["none", "random", "attentive"], [0.5], [2], [0, 1])
    scaled = equal_time_steps(points, None, TINY, tmp_path)  # the config: 100 steps
    steps = {(p.strategy, p.seed): p.steps for p in scaled}
    assert steps[("none", 0)] == steps[("none", 1)] == 0  # the equal-steps run itself
    assert steps[("random", 0)] == steps[("random", 1)] == 200  # 100 x 105 / 52.5
    assert steps[("attentive", 1)] == 131  # round(100 x 105 / 80)
    assert "optim.total_steps=131" in scaled[-1].overrides()
    # one process per seed: the other seed's timed run counts too, so the lengths agree
    one_seed = equal_time_steps(grid(["random"], [0.5], [2], [1]), None, TINY, tmp_path)
    assert one_seed[0].steps == 200


def test_equal_time_refuses_a_grid_whose_equal_steps_runs_are_missing(tmp_path):
    _write_wall(tmp_path, GridPoint("none", 1.0, 2, 0), 100.0)
    points = grid(["none", "random"], [0.25], [2], [0])
    with pytest.raises(ValueError, match="random_k0.25_v2_s0.*without --equal-time"):
        equal_time_steps(points, None, TINY, tmp_path)


def test_summary_gives_steps_and_mean_wall_time(tmp_path):
    a = GridPoint("attentive", 0.5, 2, 0, steps=150)
    b = GridPoint("attentive", 0.5, 2, 1, steps=150)
    table = summarise([(a, 40.0), (b, 44.0)], walls={a: 100.0, b: 120.0})
    assert (table[0]["steps"], table[0]["train_wall_s"]) == (150, pytest.approx(110.0))
    write_outputs(table, tmp_path, "t")
    assert "| 150 | 110 | 2 | 42.0 ± 2.8 |" in (tmp_path / "results.md").read_text()


def test_run_point_times_its_run_and_reuses_the_time(tmp_path, monkeypatch):
    import json
    import subprocess
    from pathlib import Path

    from aclip.studies import keep_ratio_runs as keep_ratio

    calls = []

    def fake_train(cmd, **kwargs):
        out = Path(next(a.split("=", 1)[1] for a in cmd if a.startswith("train.output_dir=")))
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps({"zeroshot/x": {"top1": 0.5}}))
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(keep_ratio.subprocess, "run", fake_train)
    point = GridPoint("random", 0.5, 2, 0, steps=7)
    (tmp_path / "s").mkdir()
    first = keep_ratio.run_point(point, "configs/demo.yaml", tmp_path / "s", [])
    assert "optim.total_steps=7" in calls[0]
    assert first["train_wall_s"] >= 0 and first["zeroshot/x"] == {"top1": 0.5}
    again = keep_ratio.run_point(point, "configs/demo.yaml", tmp_path / "s", [])
    assert len(calls) == 1 and again["train_wall_s"] == first["train_wall_s"]  # reused


def test_study_refuses_equal_cost_with_equal_time(tmp_path, capsys):
    from evals.keep_ratio import main

    args = ["study", "--out", str(tmp_path), "--equal-cost", "--equal-time", *TINY]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "--equal-time: not allowed with argument --equal-cost" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing trained
