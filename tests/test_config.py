"""Config layering and refusal of bad values, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from aclip.config import (
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


@pytest.mark.parametrize("name", ["demo.yaml", "yfcc15m_vit_b16.yaml"])
def test_shipped_configs_load_and_round_trip(name):
    cfg = load_config(CONFIGS / name)
    assert config_from_yaml(to_yaml(cfg)) == cfg


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
