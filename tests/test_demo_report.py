"""The demo's closing table: a run without an EMA teacher (method clip) gets the online rows
only; a run with one gets both (it crashed on the EMA row before)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import save_untrained_run

from aclip.data.synthetic import write_synthetic
from aclip.interop.run import has_ema_teacher
from evals import demo_report


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, n_train=8, n_eval_cls=12, n_eval_ret=6, image_size=32)
    return out


def _with_ema(run) -> None:
    """Give a saved untrained run an EMA teacher state (a copy of its image side)."""
    file = run / "checkpoints" / "global_step0" / "mp_rank_00_model_states.pt"
    states = torch.load(file, weights_only=False)
    module = states["module"]
    states["ema"] = {
        "visual." + k[len("clip.visual.") :]: v
        for k, v in module.items()
        if k.startswith("clip.visual.")
    } | {"image_proj.weight": module["clip.image_proj.weight"]}
    torch.save(states, file)


@pytest.mark.parametrize("ema", [False, True])
def test_report_rows_follow_the_teacher(tmp_path, data, capsys, ema):
    run = tmp_path / "run"
    save_untrained_run(run)
    if ema:
        _with_ema(run)
    assert has_ema_teacher(run) is ema
    assert demo_report.main(["--run", str(run), "--data", str(data)]) == 0
    results = json.loads((run / "demo_results.json").read_text())
    expected = {"shape/online", "colour/online", "retrieval"}
    if ema:
        expected |= {"shape/EMA image tower", "colour/EMA image tower"}
    assert set(results) == expected
    assert capsys.readouterr().out.count("EMA image tower") == (2 if ema else 0)
