"""The keep-ratio study driver: its grid, its summary and the files it writes."""

from __future__ import annotations

import csv

import pytest
from PIL import Image

from evals.keep_ratio import REPO, GridPoint, grid, point_cost, summarise, write_outputs


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
        "| attentive | 0.5 | 2 | model | – | 1 | 50.0 ± 0.0 |"
        in (tmp_path / "results.md").read_text()
    )
    assert Image.open(tmp_path / "results.png").size[0] > 100


def test_metric_comes_from_the_named_eval_set():
    from evals.keep_ratio import _top1

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
