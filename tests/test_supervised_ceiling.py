"""evals.supervised_ceiling: a config's vision tower trained on a set's labels."""

import json
from pathlib import Path

import pytest

from aclip.data.synthetic import write_synthetic

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
TINY = ["model.image_size=32", "model.vision_kwargs.depth=2",
        "model.vision_kwargs.embed_dim=64", "model.vision_kwargs.num_heads=2"]  # fmt: skip


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ceiling")
    write_synthetic(root / "train", n_train=0, n_eval_cls=240, n_eval_ret=0, image_size=32, seed=1)
    write_synthetic(root / "test", n_train=0, n_eval_cls=60, n_eval_ret=0, image_size=32, seed=2)
    return root


def test_learns_colour_labels_above_chance(sets, tmp_path):
    """Colour (6 classes, chance 16.7 %) is learnable by a tiny tower in 60 steps; the report
    holds the curve and the sizes."""
    from evals.supervised_ceiling import main

    out = tmp_path / "r.json"
    args = ["--config", CONFIG, *TINY, "--train", str(sets / "train" / "eval_colour"),
            "--test", str(sets / "test" / "eval_colour"), "--steps", "60", "--eval-every", "30",
            "--lr", "3e-3", "--json", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    r = json.loads(out.read_text())
    assert (r["n_train"], r["n_test"], r["steps"]) == (240, 60, 60)
    assert r["chance"] == pytest.approx(1 / 6)
    assert [s for s, _ in r["curve"]] == [30, 60] and r["top1"] == r["curve"][-1][1]
    assert r["top1"] > 0.5, r


def test_refuses_sets_with_other_classes(sets, capsys):
    from evals.supervised_ceiling import main

    args = ["--config", CONFIG, *TINY, "--train", str(sets / "train" / "eval_colour"),
            "--test", str(sets / "test" / "eval_cls"), "--steps", "1", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    assert "different class names" in capsys.readouterr().err
    missing = ["--config", CONFIG, "--train", str(sets / "nothing"),
               "--test", str(sets / "test" / "eval_cls"), "--steps", "1"]  # fmt: skip
    assert main(missing) == 2
    assert "error:" in capsys.readouterr().err
