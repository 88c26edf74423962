"""Config layering and refusal of bad values, naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from aclip.config import (
    Config,
    ConfigError,
    check_world_size,
    config_from_yaml,
    load_config,
    to_yaml,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("mask:\n  keep_ratio: 0.25\n  strategy: random\ntrain:\n  seed: 3\n")
    cfg = load_config(path, ["mask.keep_ratio=0.75", "model.vision_kwargs={depth: 2}"])
    assert cfg.mask.keep_ratio == 0.75  # CLI beats YAML
    assert cfg.mask.strategy == "random"  # YAML beats default
    assert cfg.train.seed == 3
    assert cfg.loss.w_byol == 2.0  # default
    assert cfg.model.vision_kwargs == {"depth": 2}


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("mask.keep_ratoi=0.5", "mask.keep_ratoi"),
        ("model.image_size=big", "model.image_size"),
        ("mask.keep_ratio=0", "mask.keep_ratio"),
        ("mask.keep_ratio=1.01", "mask.keep_ratio"),
        ("train.zero_stage=3", "train.zero_stage"),
        ("model.init_temperature=0.005", "model.init_temperature"),
        ("model.text_token_drop=1.0", "model.text_token_drop"),
        ("nosection.x=1", "nosection"),
    ],
)
def test_bad_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_missing_file_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="not found"):
        load_config("does/not/exist.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["mask.keep_ratio"])


def test_global_batch_must_divide_over_ranks():
    cfg = load_config(None, ["train.global_batch_size=10"])
    assert check_world_size(cfg, 2) == 5
    with pytest.raises(ConfigError, match="global_batch_size"):
        check_world_size(cfg, 4)


def _run_configs() -> list[str]:
    """configs/*.yaml that are run configs (every top-level key a Config section or ``base``;
    the recipe study's variants file is not one)."""
    import yaml

    sections = {f.name for f in dataclasses.fields(Config)} | {"base"}
    return sorted(
        p.name for p in CONFIGS.glob("*.yaml") if set(yaml.safe_load(p.read_text())) <= sections
    )


def test_every_shipped_run_config_is_found():
    shipped = {"alpha_clip_vit_b16.yaml", "demo.yaml", "demo_alpha.yaml", "yfcc15m_vit_b16.yaml"}
    shipped |= {"finetune_aclip_vit_b16.yaml", "recipe_study_base.yaml"}
    assert shipped <= set(_run_configs())


@pytest.mark.parametrize("name", _run_configs())
def test_shipped_configs_load_and_round_trip(name):
    cfg = load_config(CONFIGS / name)
    assert config_from_yaml(to_yaml(cfg)) == cfg


def test_a_config_file_inherits_its_base_chain(tmp_path):
    (tmp_path / "root.yaml").write_text("mask:\n  keep_ratio: 0.25\ntrain:\n  seed: 3\n")
    (tmp_path / "mid.yaml").write_text("base: root.yaml\ntrain:\n  seed: 4\n  log_every: 7\n")
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("base: ../mid.yaml  # relative to this file\ntrain:\n  log_every: 9\n")
    cfg = load_config(child, ["mask.num_views=3"])
    assert cfg.mask.keep_ratio == 0.25  # from the chain's root
    assert cfg.train.seed == 4  # the middle file overrides the root
    assert cfg.train.log_every == 9  # the file overrides its base
    assert cfg.mask.num_views == 3  # overrides beat every file
    assert cfg.loss.w_byol == 2.0  # defaults under all of them
    saved = to_yaml(cfg)
    assert "base:" not in saved and config_from_yaml(saved) == cfg


def test_a_base_that_is_missing_or_makes_a_cycle_is_refused_naming_both_files(tmp_path):
    a, b, c = (tmp_path / f"{n}.yaml" for n in "abc")
    a.write_text("base: nope.yaml\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: its base .*nope\.yaml is not found"):
        load_config(a)
    a.write_text("base: b.yaml\n")
    b.write_text("base: c.yaml\n")
    c.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: its base .*a\.yaml is already in the chain"):
        load_config(a)
    a.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: its base .*a\.yaml .*cycle"):
        load_config(a)
    a.write_text("base: [b.yaml]\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: 'base' must name a YAML file"):
        load_config(a)


def test_a_removed_key_in_a_base_is_refused_naming_the_base(tmp_path):
    (tmp_path / "old.yaml").write_text("train:\n  max_steps: 5\n")
    (tmp_path / "new.yaml").write_text("base: old.yaml\n")
    with pytest.raises(ConfigError, match=r"train\.max_steps' \(.*old\.yaml\) was removed"):
        load_config(tmp_path / "new.yaml")


def test_data_weights_are_checked_by_the_preflight_with_the_same_message(tmp_path):
    """aclip.config (a foundation) imports no aclip.data: the weights-per-source check is
    preflight's, and train.py runs it before anything else it checks."""
    from aclip.train.preflight import check_paths

    spec = f"{tmp_path}/a/{{0..1}}.tar::{tmp_path}/b/0.tar"
    cfg = load_config(None, [f"data.train_shards={spec}", "data.weights=[1.0]"])
    with pytest.raises(ConfigError, match=r"'data.weights': 1 weights for 2 '::'-joined source"):
        check_paths(cfg)
    cfg = load_config(None, ["data.train_shards='::'", "data.weights=[1.0]"])
    with pytest.raises(ConfigError, match=r"'data.weights': the data spec '::' names no shard"):
        check_paths(cfg)


def test_yfcc_config_holds_the_paper_recipe():
    cfg = load_config(CONFIGS / "yfcc15m_vit_b16.yaml")
    assert cfg.train.global_batch_size == 4096
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay) == (5e-4, 1e-5, 0.5)
    assert cfg.optim.betas == [0.9, 0.98] and cfg.optim.eps == 1e-8
    assert (cfg.optim.epochs, cfg.optim.warmup_epochs) == (25, 1)
    assert cfg.model.vision_model == "vit_base_patch16_224"
    assert (cfg.model.text_width, cfg.model.text_layers, cfg.model.text_heads) == (512, 12, 8)
    assert (cfg.model.context_length, cfg.model.vocab_size) == (77, 49408)
    assert (cfg.loss.w_simclr, cfg.loss.w_byol, cfg.loss.simclr_temperature) == (1.0, 2.0, 0.1)
    assert (cfg.ema.momentum, cfg.ema.final_momentum) == (0.996, 1.0)


def test_the_yfcc_recipe_freezes_the_patch_embedding_as_the_official_code_does():
    import torch

    from aclip.model import build_model

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/yfcc15m_vit_b16.yaml")
    assert cfg.model.freeze_patch_embed
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.loss)
    patch = model.clip.visual.vit.patch_embed
    assert not any(p.requires_grad for p in patch.parameters())
    assert model.clip.visual.vit.blocks[0].attn.qkv.weight.requires_grad
