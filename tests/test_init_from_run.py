"""A run started from imported weights (model.init_from): its step-0 InfoNCE is open_clip's
ClipLoss on the same batch with open_clip's model, and train.resume=latest of it works.

The weights are an open_clip model built by open_clip itself (random init, jittered), saved as
open_clip's trainer saves a checkpoint and read back with its open_clip_config.json
(model.init_from_name).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from helpers import TINY_MODEL_ARGS, quiet_logs
from open_clip.loss import ClipLoss

from aclip import interop
from aclip.config import load_config
from aclip.data.synthetic import write_synthetic
from aclip.data.views import model_input
from aclip.interop.run import load_eval_model
from aclip.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[torch.nn.Module, Path, Path]:
    """(open_clip's model, its checkpoint file, its open_clip_config.json)."""
    tmp = tmp_path_factory.mktemp("pretrained")
    config = tmp / "open_clip_config.json"
    config.write_text(json.dumps({"model_cfg": OPEN_CLIP_CFG}))
    torch.manual_seed(0)
    with quiet_logs():
        model = open_clip.create_model(f"local-dir:{tmp}")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    ckpt = tmp / "epoch_1.pt"
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 1, "state_dict": sd}, ckpt)
    return model.eval(), ckpt, config


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_synthetic(root, n_train=64, n_eval_cls=0, n_eval_ret=0, image_size=48,
                    samples_per_shard=32, seed=0)  # fmt: skip
    return root


def overrides(pretrained, shards: Path, out: Path) -> list[str]:
    """The tiny run: the model section the weights carry, method=clip, real shards, fp32."""
    _, ckpt, config = pretrained
    model_cfg = interop.read_weights(ckpt, config).model_cfg
    keys = ("vision_model", "image_size", "vision_kwargs", "embed_dim", "context_length",
            "text_width", "text_layers", "text_heads", "text_act")  # fmt: skip
    model = [f"model.{k}={json.dumps(getattr(model_cfg, k))}" for k in keys]
    return [
        *[a for a in TINY_MODEL_ARGS if not a.startswith("model.")], *model,
        "method=clip", f"model.init_from={ckpt}", f"model.init_from_name={config}",
        f"data.train_shards={shards}/train/{{00000..00001}}.tar", "data.workers=0",
        "data.shuffle_buffer=16", "data.samples_per_epoch=64", "optim.epochs=2",
        "optim.warmup_epochs=0", "train.global_batch_size=8", "train.precision=fp32",
        "train.zero_stage=0", "train.progress=false", "train.image_log_every=0",
        "train.log_every=1", "eval.zeroshot_sets=[]", "eval.retrieval_sets=[]",
        f"train.output_dir={out}",
    ]  # fmt: skip


def test_step_0_infonce_is_open_clips_clip_loss(pretrained, shards, tmp_path, dist_info):
    peer, _, _ = pretrained
    cfg = load_config(None, overrides(pretrained, shards, tmp_path / "run"))
    trainer = Trainer(cfg, dist_info)
    for key, value in interop.load_clip(*pretrained[1:])[0].state_dict().items():
        assert torch.equal(trainer.model.clip.state_dict()[key], value), key
    batch = trainer.stream.next(0)  # from the shards through the method's own views
    ours = trainer.train_step(batch)["loss"].item()  # the loss before the first update
    images = model_input(batch["views"]).flatten(0, 1)  # [B, 1 view, 3, H, W] uint8 -> [B, ...]
    with torch.no_grad():
        image_f, text_f, scale = peer(images, batch["tokens"])
        theirs = ClipLoss()(image_f, text_f, scale).item()
    print(f"step-0 InfoNCE: aclip {ours:.7f}, open_clip ClipLoss {theirs:.7f}, "
          f"|diff| {abs(ours - theirs):.1e}")  # fmt: skip
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert trainer.step == 1


def test_resume_of_a_run_started_from_imported_weights(pretrained, shards, tmp_path, capsys):
    """Stopped at step 2 and resumed (train.resume=latest): the run goes on from its checkpoint
    (the imported weights are not read again, and need not exist any more) and ends where an
    uninterrupted run ends."""
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    assert train.main([*overrides(pretrained, shards, straight), "train.stop_at_step=4"]) == 0
    first = overrides(pretrained, shards, parted)
    assert train.main([*first, "train.stop_at_step=2"]) == 0  # saves at the step it stops at
    at_2, _ = load_eval_model(parted)
    capsys.readouterr()
    moved = pretrained[1].with_name(pretrained[1].name + ".moved")
    pretrained[1].rename(moved)  # gone: a resumed run does not read it
    try:
        assert train.main([*first, "train.stop_at_step=4", "train.resume=latest"]) == 0
    finally:
        moved.rename(pretrained[1])
    printed = capsys.readouterr().out
    assert "initialised from" not in printed and "resumed at step 2" in printed
    assert json.loads((parted / "results.json").read_text())["step"] == 4
    ends = [load_eval_model(run)[0].state_dict() for run in (straight, parted)]
    start = interop.load_clip(*pretrained[1:])[0].state_dict()
    diff = max((v - ends[1][k]).abs().max().item() for k, v in ends[0].items())
    print(f"uninterrupted vs stopped + resumed, max weight difference at step 4: {diff:.1e}")
    assert diff == 0.0  # sample-exact resume: the same batches, the same steps
    assert any(not torch.equal(at_2.state_dict()[k], v) for k, v in start.items())
    assert any(not torch.equal(at_2.state_dict()[k], v) for k, v in ends[1].items())
