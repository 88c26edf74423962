"""``python -m aclip.interop RUN`` prints the run's whole model section: read back as a config, it
is the run's ModelConfig (the run-time keys aside)."""

from __future__ import annotations

import sys
from dataclasses import fields, replace
from pathlib import Path

import yaml
from helpers import TINY_MODEL_ARGS

from aclip import interop
from aclip.config import ModelConfig, load_config
from aclip.data.synthetic import write_synthetic
from aclip.methods.base import RUNTIME_MODEL_KEYS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

# every model field that has a default worth changing, off its default (the run-time keys too)
NON_DEFAULT = [
    "model.patch_stem=conv", "model.alpha_channel=true", "model.freeze_patch_embed=true",
    "model.text_act=quick_gelu", "model.init_temperature=0.05", "model.text_token_drop=0.1",
    "model.vocab_size=49409", "model.grad_checkpointing=true",
]  # fmt: skip


def test_describe_a_run_prints_a_model_section_equal_to_the_runs(tmp_path, capsys) -> None:
    data = tmp_path / "data"
    write_synthetic(data, n_train=16, n_eval_cls=0, n_eval_ret=0, image_size=32,
                    samples_per_shard=16)  # fmt: skip
    run = tmp_path / "run"
    argv = [
        *TINY_MODEL_ARGS, *NON_DEFAULT, "method=clip", f"data.train_shards={data}/train/00000.tar",
        "data.workers=0", "data.shuffle_buffer=8", "data.samples_per_epoch=16",
        "train.global_batch_size=8", "train.precision=fp32", "train.zero_stage=0",
        "train.progress=false", "train.stop_at_step=1", "train.ckpt_every=1",
        "train.image_log_every=0", "eval.zeroshot_sets=[]", "eval.retrieval_sets=[]",
        f"train.output_dir={run}",
    ]  # fmt: skip
    assert train.main(argv) == 0
    capsys.readouterr()
    run_model = interop.read_weights(run).model_cfg
    assert interop.main([str(run)]) == 0
    printed = capsys.readouterr().out
    section = yaml.safe_load(printed)["model"]
    wanted = [f.name for f in fields(ModelConfig) if f.name not in RUNTIME_MODEL_KEYS]
    assert list(section) == wanted
    (tmp_path / "described.yaml").write_text(printed)
    described = load_config(tmp_path / "described.yaml").model
    runtime = {k: getattr(run_model, k) for k in RUNTIME_MODEL_KEYS}
    assert replace(described, **runtime) == run_model
    changed = [f.name for f in fields(ModelConfig)
               if getattr(run_model, f.name) != getattr(ModelConfig(), f.name)]  # fmt: skip
    assert {"patch_stem", "alpha_channel", "grad_checkpointing"} <= set(changed)
