"""Small configs and batches shared by the trainer tests."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import torch

from aclip.config import Config, load_config

# The tiny model every test trains: a ViT with a 4x4 patch grid, a one-layer text tower.
TINY_MODEL = {
    "model.vision_model": "vit_tiny_patch16_224",
    "model.image_size": 32,
    "model.vision_kwargs": "{patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}",
    "model.embed_dim": 32,
    "model.context_length": 16,
    "model.text_width": 32,
    "model.text_layers": 1,
    "model.text_heads": 2,
    "loss.simclr_hidden": 64,
    "loss.simclr_out": 16,
    "loss.byol_hidden": 64,
    "loss.byol_out": 16,
}
# the same tiny model as command-line overrides (train.py tests)
TINY_MODEL_ARGS = [f"{key}={value}" for key, value in TINY_MODEL.items()]
# a tiny fp32 run through train.py: the tiny model, batch 8, no ZeRO, no loader workers, no
# progress bar (later overrides win: a test adds its own steps, checkpoints, precision)
TINY_RUN_ARGS = [
    *TINY_MODEL_ARGS,
    "train.global_batch_size=8",
    "train.precision=fp32",
    "train.zero_stage=0",
    "train.progress=false",
    "data.workers=0",
    "data.shuffle_buffer=16",
    "eval.batch_size=16",
]
# the tiny model with a CLIP-architecture (open_clip-expressible) image tower
CLIP_TINY_ARGS = [a for a in TINY_MODEL_ARGS if not a.startswith("model.vision_")] + [
    "model.vision_model=vit_base_patch16_clip_224",
    "model.vision_kwargs={patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}",
    "model.patch_stem=linear",  # CLIP's one patch convolution (configs/demo.yaml has a conv stem)
]
# OpenAI's variant of it: QuickGELU in both towers, two text layers
CLIP_QUICKGELU_TINY_ARGS = [
    "model.vision_model=vit_base_patch16_clip_quickgelu_224",
    "model.image_size=32",
    "model.vision_kwargs={patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}",
    "model.embed_dim=32",
    "model.context_length=16",
    "model.text_width=32",
    "model.text_layers=2",
    "model.text_heads=2",
    "model.text_act=quick_gelu",
]


def write_cli_data(root: Path) -> Path:
    """The synthetic shards and eval sets the tiny train.py runs read (64 training samples in
    2 shards of 32, 48-px images, 20 classification and 8 retrieval samples); ``root``."""
    from aclip.data.synthetic import write_synthetic

    write_synthetic(
        root, n_train=64, n_eval_cls=20, n_eval_ret=8, image_size=48, samples_per_shard=32, seed=0
    )
    return root


def tiny_config(out_dir: str, **overrides: object) -> Config:
    """The tiny model, fp32, ZeRO 0, batch 8, one epoch of 800 samples: steps take milliseconds."""
    base = TINY_MODEL | {
        "data.samples_per_epoch": 800,
        "optim.lr": 2e-3,
        "optim.weight_decay": 0.05,
        "optim.warmup_epochs": 0,
        "optim.epochs": 1,
        "train.global_batch_size": 8,
        "train.precision": "fp32",
        "train.zero_stage": 0,
        "train.output_dir": out_dir,
        "train.log_every": 1,
        "train.image_log_every": 0,
        "train.ckpt_every": 0,
        "train.progress": False,
    }
    base.update({k: v for k, v in overrides.items()})
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def fake_batch(cfg: Config, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """A deterministic batch in the loader's layout: views, EMA view, boxes, tokens."""
    gen = torch.Generator().manual_seed(seed)
    size, views = cfg.model.image_size, cfg.mask.num_views
    xy0 = torch.rand(batch, views, 2, generator=gen) * 0.4
    wh = 0.5 + torch.rand(batch, views, 2, generator=gen) * 0.5
    boxes = torch.cat([xy0, (xy0 + wh).clamp(max=1.0)], dim=-1)
    tokens = torch.zeros(batch, cfg.model.context_length, dtype=torch.long)
    body = torch.randint(1, 400, (batch, 6), generator=gen)
    tokens[:, 0], tokens[:, 1:7], tokens[:, 7] = 49406, body, 49407
    return {
        "views": torch.randn(batch, views, 3, size, size, generator=gen),
        "ema": torch.randn(batch, 3, size, size, generator=gen),
        "boxes": boxes,
        "tokens": tokens,
    }


def rank_slice(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's contiguous part of a global batch."""
    n = next(iter(batch.values())).shape[0] // world
    return {k: v[rank * n : (rank + 1) * n] for k, v in batch.items()}


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def set_rank_env(rank: int, world: int, port: int) -> None:
    """The torchrun-style variables a spawned test rank needs."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Root logging at ERROR for the block (open_clip warns about a model built without
    pretrained weights, which every peer-library test does; nothing to see)."""
    level = logging.root.level
    logging.root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.root.setLevel(level)


def save_untrained_run(run: Path) -> tuple[torch.nn.Module, Config]:
    """The tiny model, untrained (seed 0), saved in ``run`` as the trainer saves a checkpoint
    (``checkpoints/global_step0/mp_rank_00_model_states.pt``, ``latest``); returns it (eval
    mode) and its config."""
    from aclip.config import to_yaml
    from aclip.model import build_model

    cfg = tiny_config(str(run))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss).eval()
    tag = run / "checkpoints" / "global_step0"
    tag.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("global_step0")
    states = {"module": model.state_dict(), "config": to_yaml(cfg), "ema": None}
    torch.save(states, tag / "mp_rank_00_model_states.pt")
    return model, cfg
