"""The recipe study driver: its variants file, its run commands, the curves it reads back from
tensorboard, the files it writes, and (slow) one real run end to end."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

import aclip.studies.recipe as rs
import aclip.studies.recipe_report as rr
import evals.recipe_study as recipe_cli
from tests.helpers import TINY_MODEL_ARGS

REPO = Path(__file__).resolve().parents[1]

VARIANTS = """
base:
  note: the config as it is
wide:
  overrides: [model.text_width=64, "optim.lr=1e-3"]
  seeds: [0, 1]
  group: model
"""


def _variants(tmp_path, text=VARIANTS):
    path = tmp_path / "variants.yaml"
    path.write_text(text)
    return path


INHERITING = """
root:
  overrides: [model.text_width=64, "optim.lr=1e-3"]
  seeds: [0, 1]
  group: g
  note: the root
child:
  base: grandchild
  overrides: [optim.lr=5e-3]
grandchild:
  base: root
  overrides: [model.text_width=96, "mask.keep_ratio=0.75", model.text_width=80]
"""


def test_variant_inherits_its_bases_overrides_later_winning_in_place(tmp_path):
    """A base chain (child -> grandchild -> root, the base named below its user): the root's
    overrides first, each descendant replacing a key where it stands and appending new keys;
    seeds, note and group stay the variant's own."""
    root, child, grand = rs.load_variants(_variants(tmp_path, INHERITING))
    assert root.overrides == ("model.text_width=64", "optim.lr=1e-3")
    assert grand.overrides == ("model.text_width=80", "optim.lr=1e-3", "mask.keep_ratio=0.75")
    assert child.overrides == ("model.text_width=80", "optim.lr=5e-3", "mask.keep_ratio=0.75")
    assert (child.seeds, child.note, child.group) == ((0,), "", "")
    assert rs.merge_overrides(["a.b=1", "c.d=2"], ["a.b = 3", "e.f=4"]) == (
        "a.b = 3", "c.d=2", "e.f=4")  # fmt: skip


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a: {base: b}\n", r"variants.yaml: variant 'a': base 'b' is not a variant of this file"),
        ("a: {base: a}\n", r"variants.yaml: variant 'a': its bases form a cycle \(a -> a\)"),
        (
            "a: {base: c}\nb: {base: a}\nc: {base: b}\nd: {base: a}\n",
            r"variants.yaml: variant 'a': its bases form a cycle \(a -> c -> b -> a\)",
        ),
        ("x: {}\na: {base: b}\nb: {base: c}\n", r"variant 'b': base 'c' is not a variant"),
    ],
)
def test_unknown_base_or_cycle_is_an_error_naming_file_and_variant(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        rs.load_variants(_variants(tmp_path, text))


def test_study_variants_file_expands_and_resolves():
    """configs/recipe_study.yaml: every variant resolves on its base config; the inherited
    ones carry their bases' overrides (clip_drop3: clip_arch's tower; img10: its image term
    replaces the base's 5 in place)."""
    from aclip.config import load_config

    variants = {v.name: v for v in rs.load_variants(REPO / "configs" / "recipe_study.yaml")}
    for v in variants.values():
        load_config(REPO / "configs" / "recipe_study_base.yaml", list(v.overrides))
    drop3 = variants["clip_drop3"].overrides
    assert drop3 == ("model.vision_model=vit_base_patch16_clip_224", "model.text_token_drop=0.3")
    img10 = variants["words_k75_fused_bf16_img10"].overrides
    assert img10[6:8] == ("loss.w_caption_bow=10", "loss.w_text_bow=3") and len(img10) == 14
    assert variants["words_k75_fused_bf16"].seeds == (0, 1)
    assert variants["words_k75_fused_bf16_img10"].seeds == (0,)


def test_variants_file_parsed_in_order(tmp_path):
    base, wide = rs.load_variants(_variants(tmp_path))
    assert (base.name, base.overrides, base.seeds) == ("base", (), (0,))
    assert base.note == "the config as it is"
    assert wide.overrides == ("model.text_width=64", "optim.lr=1e-3")
    assert wide.seeds == (0, 1) and wide.group == "model"
    assert [v.name for v in rs.select([base, wide], ["wide"])] == ["wide"]
    with pytest.raises(ValueError, match="nope"):
        rs.select([base, wide], ["nope"])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a: {overides: []}\n", "unknown keys"),
        ("a: {overrides: [model.x]}\n", "section.key=value"),
        ("- a\n", "mapping"),
    ],
)
def test_bad_variants_file_named(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        rs.load_variants(_variants(tmp_path, text))
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        rs.load_variants(tmp_path / "missing.yaml")


def test_train_command_puts_the_variant_after_study_overrides(tmp_path):
    wide = rs.load_variants(_variants(tmp_path))[1]
    cmd = rs.train_command("c.yaml", wide, 1, tmp_path / "r", ["optim.lr=5e-3"], 25)
    assert cmd[:4] == [sys.executable, str(rs.REPO / "train.py"), "--config", "c.yaml"]
    assert cmd.index("optim.lr=5e-3") < cmd.index("optim.lr=1e-3")  # the variant wins
    assert cmd[-4:] == ["train.seed=1", f"train.output_dir={tmp_path / 'r'}",
                        "eval.every_steps=25", "train.progress=false"]  # fmt: skip


def _fake_run(run_dir, batch=8, rates=(100.0, 50.0), shape=(0.1, 0.3), colour=(0.5, 0.9)):
    """A run directory as train.py leaves it: tensorboard scalars, config, results, timing."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tb"))
    for i, step in enumerate((10, 20)):
        writer.add_scalar("perf/samples_per_s", rates[i], step)
        writer.add_scalar("eval/zeroshot/eval_cls/top1", shape[i], step)
        writer.add_scalar("eval/zeroshot/eval_colour/top1", colour[i], step)
    writer.close()
    (run_dir / "config.yaml").write_text(f"train:\n  global_batch_size: {batch}\n")
    results = {"step": 20, "zeroshot/eval_cls": {"top1": shape[1]},
               "zeroshot/eval_colour": {"top1": colour[1]}}  # fmt: skip
    (run_dir / "results.json").write_text(json.dumps(results))
    (run_dir / rs.TIMING).write_text(json.dumps({"wall_s": 9.0, "cpu_s": 7.0, "threads": 1}))


def test_curves_sum_training_time_from_samples_per_second(tmp_path):
    _fake_run(tmp_path)
    curves = rr.read_curves(tmp_path, batch_size=8)
    # 10 steps x 8 samples at 100/s = 0.8 s, then 80 samples at 50/s = 1.6 s more
    assert [(s, round(t, 6)) for s, t, _ in curves["eval_cls"]] == [(10, 0.8), (20, 2.4)]
    assert [round(v, 4) for *_, v in curves["eval_colour"]] == [50.0, 90.0]


def test_report_writes_table_csvs_and_plot(tmp_path, capsys):
    variants = _variants(tmp_path)
    out = tmp_path / "study"
    for name, shape in (("base_s0", (0.1, 0.2)), ("wide_s0", (0.2, 0.6)), ("wide_s1", (0.2, 0.5))):
        (out / name).mkdir(parents=True)
        _fake_run(out / name, shape=shape)
    docs = tmp_path / "docs" / "study"
    argv = ["report", "--variants", str(variants), "--out", str(out), "--docs", str(docs),
            "--label", "eval_cls=shape", "eval_colour=colour"]  # fmt: skip
    assert recipe_cli.main(argv) == 0
    table = (out / "results.md").read_text()
    assert "| wide | 1 | 20 × 8 | 2 | 9 | 7 | 50.0 | 90.0 |" in table
    assert "shape top-1" in table and table in capsys.readouterr().out
    with (out / "curves.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 3 * 2 * 2  # runs x sets x points
    assert Image.open(out / "curves.png").size[0] > 500
    assert (docs.parent / "study_curves.png").is_file() and (docs.parent / "study.csv").is_file()


def test_report_without_runs_is_an_error(tmp_path, capsys):
    argv = ["report", "--variants", str(_variants(tmp_path)), "--out", str(tmp_path / "none")]
    assert recipe_cli.main(argv) == 2
    assert capsys.readouterr().err.startswith("error: no finished run")


class _NoTraining:
    """Stands for subprocess.run: records each command and fails it (exit 2), training nothing."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, cmd: list[str], **_: object) -> subprocess.CompletedProcess:
        self.calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 2)


def _victim(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "keep.txt").write_text("not the study's")
    return folder / "keep.txt"


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_variant_names_that_leave_out_are_refused(tmp_path, monkeypatch, capsys, where):
    """A variant named ../victim or /abs/victim (its run folder <name>_s0) touches nothing
    outside --out: exit 2 naming it, the folder there kept, no run started."""
    out = tmp_path / "study" / "out"
    if where == "relative":
        name, keep = "../victim", _victim(tmp_path / "study" / "victim_s0")
    else:
        name = str(tmp_path / "elsewhere" / "victim")
        keep = _victim(tmp_path / "elsewhere" / "victim_s0")
    variants = tmp_path / "variants.yaml"
    variants.write_text(yaml.safe_dump({name: {"seeds": [0]}}))
    fake = _NoTraining()
    monkeypatch.setattr(rs.subprocess, "run", fake)
    argv = ["run", "--variants", str(variants), "--out", str(out),
            "--config", str(REPO / "configs" / "demo.yaml")]  # fmt: skip
    assert recipe_cli.main(argv) == 2
    assert keep.read_text() == "not the study's" and fake.calls == []
    err = capsys.readouterr().err
    assert err.startswith(f"error: {variants}: variant name {name!r} is not letters"), err


def test_run_folder_outside_out_is_neither_removed_nor_written(tmp_path, monkeypatch):
    """The run helper checks the path itself (a Variant not from load_variants)."""
    out = tmp_path / "study" / "out"
    out.mkdir(parents=True)
    keep = _victim(tmp_path / "study" / "victim_s0")
    fake = _NoTraining()
    monkeypatch.setattr(rs.subprocess, "run", fake)
    with pytest.raises(ValueError, match="outside the study directory"):
        rs.run_one("c.yaml", rs.Variant("../victim"), 0, out, [], 1, 50, None)
    assert keep.read_text() == "not the study's" and fake.calls == []
    assert not (tmp_path / "study" / "victim_s0.log").exists()


@pytest.mark.slow
def test_run_trains_times_and_resumes_a_study(tmp_path, dist_info):
    """Two real tiny runs through train.py; a second call trains nothing. ``dist_info``: this
    process holds a process group on MASTER_PORT, as in the full suite, which the runs must not
    inherit (they failed with EADDRINUSE)."""
    from aclip.data.synthetic import write_synthetic

    data = tmp_path / "data"
    write_synthetic(data, n_train=64, n_eval_cls=20, n_eval_ret=0, image_size=32,
                    samples_per_shard=32)  # fmt: skip
    variants = _variants(tmp_path, "a: {}\nb: {overrides: [optim.lr=1e-3]}\n")
    out = tmp_path / "study"
    common = [
        *TINY_MODEL_ARGS, f"data.train_shards={data}/train/{{00000..00001}}.tar",
        "data.workers=0", "data.shuffle_buffer=8", "train.global_batch_size=16",
        "train.precision=fp32", "train.zero_stage=0", "train.stop_at_step=4",
        "optim.total_steps=4", "train.log_every=2",
        "train.ckpt_every=0", "optim.epochs=1", "optim.warmup_epochs=0",
        f"eval.zeroshot_sets=[{data}/eval_cls]", "eval.retrieval_sets=[]", "eval.batch_size=20",
    ]  # fmt: skip
    argv = ["run", "--variants", str(variants), "--out", str(out), "--config",
            str(rs.REPO / "configs" / "demo.yaml"), "--eval-every", "2",
            "--probe-set", str(data / "eval_cls"), *common]  # fmt: skip
    assert recipe_cli.main(argv) == 0
    for name in ("a_s0", "b_s0"):
        timing = json.loads((out / name / rs.TIMING).read_text())
        assert timing["wall_s"] > 0 and timing["cpu_s"] > 0 and timing["threads"] == 1
        assert [s for s, *_ in rr.read_curves(out / name, 16)["eval_cls"]] == [2, 4]
        assert (out / name / rs.PROBE).is_file()
    stamp = (out / "a_s0" / rs.TIMING).stat().st_mtime_ns
    assert recipe_cli.main(argv) == 0
    assert (out / "a_s0" / rs.TIMING).stat().st_mtime_ns == stamp
