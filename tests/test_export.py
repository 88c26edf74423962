"""python -m aclip.export: a run to open_clip / OpenAI layout / timm, checked by the peers."""

from __future__ import annotations

import sys
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from helpers import CLIP_TINY_ARGS, TINY_MODEL_ARGS, quiet_logs
from torch import nn

from aclip.config import load_config, to_yaml
from aclip.data.synthetic import write_synthetic
from aclip.interop import export as export_cli
from aclip.interop import load_clip
from aclip.interop.run import MODEL_STATES, load_eval_model
from aclip.model import build_model
from aclip.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

CLIP_TINY = CLIP_TINY_ARGS  # the tiny test model with a CLIP-architecture image tower


def save_run(run: Path, overrides: list[str]) -> Path:
    """A run dir as the trainer leaves it: online weights, an EMA image side (other seed)."""
    cfg = load_config(None, [*overrides, f"train.output_dir={run}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss)
    torch.manual_seed(1)
    other = build_model(cfg.model, cfg.loss)
    teacher = nn.ModuleDict({"visual": other.clip.visual, "image_proj": other.clip.image_proj})
    tag = run / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    states = {"module": model.state_dict(), "config": to_yaml(cfg), "ema": teacher.state_dict()}
    torch.save(states, tag / MODEL_STATES)
    (run / "checkpoints" / "latest").write_text(tag.name)
    return run


def probe(size: int, ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(3, 3, size, size, generator=gen), Tokenizer(ctx)(["a cat", "a red dog"])


@pytest.mark.parametrize("ema", [False, True], ids=["online", "ema"])
def test_export_open_clip_gives_the_runs_features(tmp_path, capsys, ema) -> None:
    run = save_run(tmp_path / "run", CLIP_TINY)
    out = tmp_path / "export"
    argv = ["--checkpoint", str(run), "--out", str(out)] + (["--ema"] if ema else [])
    assert export_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f'open_clip.create_model_and_transforms("local-dir:{out}")' in printed
    assert "checked: max feature difference" in printed
    ours, cfg = load_eval_model(run, use_ema=ema)
    with quiet_logs():
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    images, tokens = probe(cfg.model.image_size, cfg.model.context_length)
    assert torch.equal(tokenizer(["a cat", "a red dog"]), tokens)
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval().encode_image(images), ours.encode_image(images), rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            model.encode_text(tokens), ours.encode_text(tokens), rtol=0, atol=1e-6
        )
    assert preprocess.transforms[0].size == cfg.model.image_size
    online, _ = load_eval_model(run)
    differs = not torch.equal(online.visual.vit.pos_embed, ours.visual.vit.pos_embed)
    assert differs == ema  # --ema takes the teacher's image side


def test_export_openai_and_timm_formats(tmp_path, capsys) -> None:
    run = save_run(tmp_path / "run", CLIP_TINY)
    ours, cfg = load_eval_model(run)
    assert export_cli.main(["--checkpoint", str(run), "--out", str(tmp_path / "oa"),
                            "--format", "openai"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "max weight difference 0.0e+00" in printed and "3 vision heads" in printed
    sd = torch.load(tmp_path / "oa" / export_cli.OPENAI_FILE, weights_only=True)
    assert sd["visual.proj"].shape == (48, 32) and sd["logit_scale"].dim() == 0
    assert export_cli.main(["--checkpoint", str(run), "--out", str(tmp_path / "tm"),
                            "--format", "timm"]) == 0  # fmt: skip
    model = timm.create_model(f"local-dir:{tmp_path / 'tm'}", pretrained=True).eval()
    images, _ = probe(cfg.model.image_size, cfg.model.context_length)
    with torch.no_grad():
        torch.testing.assert_close(model(images), ours.encode_image(images), rtol=0, atol=0)


def test_export_refuses_with_reasons(tmp_path, capsys) -> None:
    demo_like = save_run(tmp_path / "demo", TINY_MODEL_ARGS)  # timm vit_tiny with kwargs
    out = tmp_path / "x"
    assert export_cli.main(["--checkpoint", str(demo_like), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot export: not a CLIP-architecture tower (")
    assert "patch embedding has a bias" in err and "default image size 224 (this model: 32)" in err
    assert not out.exists() and not out.with_name("x.partial").exists()
    assert export_cli.main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    run = save_run(tmp_path / "run", CLIP_TINY)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export_cli.main(["--checkpoint", str(run), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert export_cli.main(["--checkpoint", str(run), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "open_clip_config.json").is_file()


def test_trained_run_exports_and_reimports(tmp_path, monkeypatch) -> None:
    """Two real training steps through train.py (DeepSpeed checkpoint), exported and read back
    by open_clip and by aclip.interop.load_clip (bit-exact)."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    data = tmp_path / "data"
    write_synthetic(data, n_train=32, n_eval_cls=0, n_eval_ret=0, image_size=48,
                    samples_per_shard=32, seed=0)  # fmt: skip
    argv = [
        "--config", "configs/demo.yaml", *CLIP_TINY,
        "train.global_batch_size=8", "train.precision=fp32", "train.zero_stage=0",
        "train.progress=false", "train.stop_at_step=2", "train.ckpt_every=2",
        "train.image_log_every=0", "data.workers=0", "data.shuffle_buffer=16",
        f"data.train_shards={data}/train/00000.tar", "eval.zeroshot_sets=[]",
        "eval.retrieval_sets=[]", f"train.output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    assert train.main(argv) == 0
    out = tmp_path / "export"
    assert export_cli.main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    ours, _ = load_eval_model(tmp_path / "run")
    back, back_cfg, _ = load_clip(f"local-dir:{out}")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())
    assert back_cfg.vision_kwargs == {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
