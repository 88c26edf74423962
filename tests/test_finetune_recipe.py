"""configs/finetune_aclip_vit_b16.yaml: A-CLIP continued from OpenAI's ViT-B/16.

The recipe's model section is what ``python -m aclip.interop`` prints for OpenAI's ViT-B/16, it
builds (on the meta device: no weights are allocated), OpenAI's weights fit it, its placeholder
path is refused before anything is built, and with tiny sizes it trains from an OpenAI file
through train.py, the model section taken from ``python -m aclip.interop``'s output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from helpers import quiet_logs
from open_clip.model import CLIP as OpenClipCLIP

from aclip import interop
from aclip.config import load_config
from aclip.data.synthetic import write_synthetic
from aclip.interop.run import load_eval_model
from aclip.model import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "finetune_aclip_vit_b16.yaml"


def openai_vit_b16_shapes() -> dict[str, torch.Tensor]:
    """The state dict of OpenAI's ViT-B/16 (open_clip's ViT-B-16 config with QuickGELU, whose
    keys are OpenAI's), on the meta device: shapes only."""
    with torch.device("meta"):
        model = OpenClipCLIP(**open_clip.get_model_config("ViT-B-16"), quick_gelu=True)
    return model.state_dict()


def test_recipe_model_section_is_openai_vit_b16() -> None:
    cfg = load_config(RECIPE)
    weights_cfg = interop.openai_model_config(openai_vit_b16_shapes())
    printed = yaml.safe_load(interop.model_yaml(weights_cfg))["model"]
    assert {k: getattr(cfg.model, k) for k in printed} == printed
    assert cfg.model.vision_model == "vit_base_patch16_clip_quickgelu_224"
    assert cfg.model.text_act == "quick_gelu" and cfg.method == "aclip"
    assert cfg.mask.strategy == "attentive" and cfg.train.global_batch_size == 4096
    # the literature's fine-tuning values (README, "Pretrained weights in and out")
    optim = cfg.optim
    assert (optim.lr, optim.min_lr, optim.weight_decay) == (1e-5, 0.0, 0.2)
    assert optim.warmup_epochs / optim.epochs == pytest.approx(0.2)


def test_recipe_builds_and_openai_weights_fit_it() -> None:
    """The student (CLIP + SimCLR / BYOL heads) of the recipe, built on the meta device; the
    weights of OpenAI's ViT-B/16 have its CLIP's architecture, keys and shapes."""
    cfg = load_config(RECIPE)
    with torch.device("meta"):
        student = build_model(cfg.model, cfg.loss)
    clip = student.clip
    sd = openai_vit_b16_shapes()
    weights_cfg = interop.openai_model_config(sd)
    interop.check_architecture(clip, weights_cfg)
    ours = {k: tuple(v.shape) for k, v in clip.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in interop.to_aclip_state_dict(sd).items()}
    assert ours == theirs
    params = sum(p.numel() for p in clip.parameters())
    assert params == sum(v.numel() for k, v in sd.items() if k != "attn_mask")  # 149.6M


def test_recipe_refuses_its_placeholder_before_building(capsys) -> None:
    assert train.main(["--config", str(RECIPE)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.init_from: no such file or folder: /path/to/openai/")
    assert "an OpenAI release file" in err and "nothing is downloaded" in err


def test_recipe_trains_from_an_openai_file_with_the_printed_model_section(tmp_path, capsys):
    """The README's two steps on a small OpenAI-layout model: ``python -m aclip.interop FILE``
    prints the model section, train.py runs the recipe with it and model.init_from=FILE."""
    cfg = {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 2,
                     "layers": 1},
    }  # fmt: skip
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.manual_seed(0)
    with quiet_logs():
        peer = open_clip.create_model(f"local-dir:{tmp_path}")
    weights = tmp_path / "openai_small.pt"
    torch.save(peer.state_dict(), weights)  # open_clip's native keys are OpenAI's
    assert interop.main([str(weights)]) == 0
    section = yaml.safe_load(capsys.readouterr().out)["model"]
    overrides = [f"model.{k}={json.dumps(v) if isinstance(v, dict) else v}"
                 for k, v in section.items()]  # fmt: skip
    data = tmp_path / "data"
    write_synthetic(data, n_train=32, n_eval_cls=0, n_eval_ret=0, image_size=40,
                    samples_per_shard=32)  # fmt: skip
    run = tmp_path / "run"
    argv = [
        "--config", str(RECIPE), *overrides, f"model.init_from={weights}",
        f"data.train_shards={data}/train/00000.tar", "data.workers=0", "data.shuffle_buffer=16",
        "loss.simclr_hidden=64", "loss.simclr_out=16", "loss.byol_hidden=64", "loss.byol_out=16",
        "train.global_batch_size=8", "train.precision=fp32", "train.zero_stage=0",
        "train.progress=false", "train.stop_at_step=2", "train.image_log_every=0",
        f"train.output_dir={run}",
    ]  # fmt: skip
    assert train.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"initialised from {weights}: read as OpenAI weights (state dict, quick_gelu)" in printed
    assert "schedule: 20 steps (5 epochs)" in printed  # 32 samples / 8 = 4 steps an epoch
    trained, run_cfg = load_eval_model(run)
    assert run_cfg.model.init_from == str(weights)
    start = interop.load_clip(weights)[0].state_dict()
    now = trained.state_dict()
    diff = max((v - now[k]).abs().max().item() for k, v in start.items())
    # two AdamW steps from the imported weights in the warm-up (lr 1e-5 x 1/4, then x 2/4): each
    # weight moves by about the step's lr (Adam's normalised step): ~7.5e-6 in all (8.0e-6 measured)
    print(f"max weight change after 2 steps: {diff:.2e}")
    assert 0 < diff < 2e-5


@pytest.mark.slow
def test_recipe_model_takes_a_full_size_openai_vit_b16_with_open_clips_features(tmp_path):
    """A random-init OpenAI-layout ViT-B/16 (open_clip's build, QuickGELU; 150M parameters)
    saved as a state dict, loaded by init_from into the recipe's CLIP: open_clip's features."""
    from aclip.model import build_clip
    from aclip.tokenizer import Tokenizer

    torch.manual_seed(0)
    peer = OpenClipCLIP(**open_clip.get_model_config("ViT-B-16"), quick_gelu=True).eval()
    path = tmp_path / "ViT-B-16.pt"
    torch.save(peer.state_dict(), path)
    clip = build_clip(load_config(RECIPE).model).eval()
    assert interop.init_from(clip, path) == ["read as OpenAI weights (state dict, quick_gelu)"]
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    tokens = Tokenizer(77)(["a photo of a cat", "a red square on a white background"])
    with torch.no_grad():
        image_diff = (clip.encode_image(images) - peer.encode_image(images)).abs().max().item()
        text_diff = (clip.encode_text(tokens) - peer.encode_text(tokens)).abs().max().item()
    print(f"ViT-B/16 image / text feature max |diff|: {image_diff:.1e} / {text_diff:.1e}")
    assert image_diff < 1e-5 and text_diff < 1e-5
