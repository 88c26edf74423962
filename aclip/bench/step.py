"""Training-step benchmark: our Trainer (CLIP, FLIP, A-CLIP) against open_clip's CLIP step.

Every mode runs in this one process on the same synthetic batch (already on the device). Each
is built in turn and runs its warm-up steps (peak memory is measured over that, above what the
modes built before hold); then all are timed together, one step of each per round, the device
synchronised around every step, so that load from other processes falls on all alike. Our
modes go through the real ``aclip.train.trainer.Trainer.train_step`` (DeepSpeed engine, EMA teacher,
losses); open_clip's step is its model, ``ClipLoss`` and ``torch.optim.AdamW`` in its training
loop (bf16 autocast on GPU, fp32 on the CPU); ``clip_torch`` puts our plain CLIP model in that
same loop, which separates the model's cost from the engine's.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aclip.bench import common
from aclip.config import Config, ModelConfig, load_config
from aclip.distributed import DistInfo, init_distributed
from aclip.methods.flops import StepFlops, TextDims, ViTDims, config_step_flops
from aclip.model import ACLIPModel, build_model

PRESETS: dict[str, dict[str, Any]] = {
    # the paper's model: timm vit_base_patch16_224 + CLIP text transformer 512/12/8, heads 4096
    "vit_b16": {"overrides": [], "batch": 64, "warmup": 5, "steps": 20},
    # a small ViT (64 px, 8-px patches, width 192, depth 4) for a quick CPU run; same code paths
    "tiny": {
        "overrides": [
            "model.vision_model=vit_tiny_patch16_224",
            "model.image_size=64",
            "model.vision_kwargs={patch_size: 8, depth: 4, embed_dim: 192, num_heads: 3}",
            "model.embed_dim=128",
            "model.context_length=32",
            "model.text_width=128",
            "model.text_layers=2",
            "model.text_heads=2",
            "loss.simclr_hidden=512",
            "loss.simclr_out=64",
            "loss.byol_hidden=512",
            "loss.byol_out=64",
        ],
        "batch": 32,
        "warmup": 3,
        "steps": 10,
    },
}

_NO_SSL = ["loss.w_simclr=0", "loss.w_byol=0"]
MODES: dict[str, list[str]] = {
    "clip": ["method=clip", "mask.strategy=none", "mask.num_views=1", *_NO_SSL],
    "flip": ["method=flip", "mask.keep_ratio=0.5", "mask.num_views=1", *_NO_SSL],
    "aclip": [
        "mask.strategy=attentive",
        "mask.keep_ratio=0.5",
        "mask.num_views=2",
        "loss.w_simclr=1",
        "loss.w_byol=2",
    ],
    # A-CLIP with the cheaper teacher: ema.image_size = half the model's (set in bench_config)
    "aclip_cheap": [
        "mask.strategy=attentive",
        "mask.keep_ratio=0.5",
        "mask.num_views=2",
        "loss.w_simclr=1",
        "loss.w_byol=2",
    ],
    "openclip": ["method=clip", "mask.num_views=1", *_NO_SSL],  # FLOPs: same as clip
    "clip_torch": ["method=clip", "mask.num_views=1", *_NO_SSL],
}
MODE_TITLES = {
    "openclip": "open_clip CLIP step (its model, ClipLoss, AdamW)",
    "clip": "ours: plain CLIP (1 view, all tokens)",
    "flip": "ours: random masking 50% (FLIP, 1 view)",
    "aclip": "ours: A-CLIP (2 views x 50%, EMA, SimCLR, BYOL)",
    "aclip_cheap": "ours: A-CLIP, teacher at half the resolution (ema.image_size)",
    "clip_torch": "ours: plain CLIP model + loss in open_clip's plain PyTorch loop",
}
DEFAULT_MODES = ("openclip", "clip_torch", "clip", "flip", "aclip", "aclip_cheap")
TARGETS = {  # (numerator mode, denominator mode, metric, limit)
    "aclip_time_vs_clip": ("aclip", "clip", "step_s_median", 1.10),
    "aclip_memory_vs_clip": ("aclip", "clip", "peak_memory_bytes", 1.05),
    "aclip_cheap_time_vs_clip": ("aclip_cheap", "clip", "step_s_median", 1.10),
    "clip_time_vs_openclip": ("clip", "openclip", "step_s_median", 1.00),
}


@dataclass
class StepOptions:
    """What to run: preset, batch, precision, modes and step counts; extra config overrides."""

    preset: str = "tiny"
    batch: int | None = None
    precision: str = "bf16"
    modes: list[str] = field(default_factory=lambda: list(DEFAULT_MODES))
    warmup: int | None = None
    steps: int | None = None
    overrides: list[str] = field(default_factory=list)
    peak_tflops: float | None = None
    profile_dir: str | None = None


def bench_config(opts: StepOptions, mode: str, out_dir: str) -> Config:
    """The run config of ``mode``: preset < mode < user overrides, plus bench plumbing."""
    preset = PRESETS[opts.preset]
    batch = opts.batch or preset["batch"]
    precision = opts.precision if torch.cuda.is_available() else "fp32"  # the CPU bench: fp32
    plumbing = [
        f"train.global_batch_size={batch}",
        f"train.precision={precision}",
        f"train.output_dir={out_dir}",
        "data.samples_per_epoch=1000000000",
        "train.progress=false",
        "train.image_log_every=0",
        "train.ckpt_every=0",
    ]
    layers = [*preset["overrides"], *MODES[mode], *plumbing]
    if mode == "aclip_cheap":
        size = load_config(None, layers + opts.overrides).model.image_size
        layers.append(f"ema.image_size={size // 2}")
    return load_config(None, [*layers, *opts.overrides])


def synthetic_batch(cfg: Config, batch: int, device: torch.device, seed: int = 0) -> dict:
    """A batch in the loader's layout (views, EMA view, boxes, tokens), on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    size, views = cfg.model.image_size, 2  # two views: A-CLIP's; one-view modes take the first
    xy0 = torch.rand(batch, views, 2, generator=gen) * 0.3
    wh = 0.55 + torch.rand(batch, views, 2, generator=gen) * 0.45
    boxes = torch.cat([xy0, (xy0 + wh).clamp(max=1.0)], dim=-1)
    tokens = torch.zeros(batch, cfg.model.context_length, dtype=torch.long)
    length, vocab = min(14, cfg.model.context_length - 2), cfg.model.vocab_size
    tokens[:, 0], tokens[:, length + 1] = vocab - 2, vocab - 1  # SOT, EOT (the largest id)
    tokens[:, 1 : length + 1] = torch.randint(1, vocab - 2, (batch, length), generator=gen)
    out = {
        "views": torch.randn(batch, views, 3, size, size, generator=gen),
        "ema": torch.randn(batch, 3, size, size, generator=gen),
        "boxes": boxes,
        "tokens": tokens,
    }
    return {k: v.to(device) for k, v in out.items()}


def mode_batch(batch: dict, cfg: Config) -> dict:
    """``batch`` with the number of online views the mode's config asks for, and the EMA view
    at ``ema.image_size`` (the loader makes it at that size: no resize inside the step)."""
    views = cfg.mask.num_views
    out = batch | {"views": batch["views"][:, :views], "boxes": batch["boxes"][:, :views]}
    size = cfg.ema.image_size
    if size and size != batch["ema"].shape[-1]:
        ema = torch.nn.functional.interpolate(batch["ema"], size=(size, size), mode="bilinear",
                                              antialias=True)  # fmt: skip
        out["ema"] = ema
    return out


@dataclass
class Runner:
    """One built mode: its step function and a description."""

    step: Callable[[], Any]
    info: dict[str, Any]


def meta_model(cfg: Config) -> ACLIPModel:
    """Our model under ``cfg`` on the meta device: sizes without memory or init time."""
    with torch.device("meta"):
        return build_model(cfg.model, cfg.loss)


def mode_flops(cfg: Config, batch: int, world_size: int = 1) -> StepFlops:
    """Analytic FLOPs of one step of the mode ``cfg`` describes (open_clip's: as ``clip``)."""
    return config_step_flops(cfg, batch, world_size)


def trainer_runner(cfg: Config, dist_info: DistInfo, batch: dict) -> Runner:
    """Our ``Trainer.train_step`` on ``batch`` under ``cfg``."""
    from aclip.train.trainer import Trainer

    trainer = Trainer(cfg, dist_info)
    data = mode_batch(batch, cfg)
    params = sum(p.numel() for p in trainer.model.parameters())
    info = {
        "params_trained": params,
        "teacher": getattr(trainer.method, "teacher", None) is not None,
        "kept_tokens": trainer.method.selector.k if not trainer.method.selector.keeps_all else None,
        "num_views": trainer.method.cost(cfg, trainer.model.clip.visual.num_patches).num_views,
        "precision": trainer._precision(),
        "zero_stage": cfg.train.zero_stage,
    }
    return Runner(lambda: trainer.train_step(data), info)


def open_clip_model(cfg: Config, preset: str) -> torch.nn.Module:
    """open_clip's ``ViT-B-16`` for that preset; otherwise an open_clip CLIP with the same
    sizes as our model under ``cfg`` (vision width/depth/heads/patch, text tower, embed dim)."""
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    if preset == "vit_b16" and is_vit_b16(cfg):
        return open_clip.create_model("ViT-B-16", pretrained=None)
    ours = meta_model(cfg).clip
    vit, text = ViTDims.of(ours.visual), TextDims.of(ours.text)
    heads = ours.visual.vit.blocks[0].attn.num_heads
    vision_cfg = CLIPVisionCfg(
        layers=vit.depth, width=vit.width, head_width=vit.width // heads,
        mlp_ratio=vit.mlp_hidden / vit.width, patch_size=ours.visual.vit.patch_embed.patch_size[0],
        image_size=cfg.model.image_size,
    )  # fmt: skip
    text_cfg = CLIPTextCfg(
        context_length=text.context, vocab_size=cfg.model.vocab_size, width=text.width,
        heads=cfg.model.text_heads, layers=text.layers, mlp_ratio=text.mlp_hidden / text.width,
    )  # fmt: skip
    return CLIP(cfg.model.embed_dim, vision_cfg, text_cfg)


def is_vit_b16(cfg: Config) -> bool:
    """Whether ``cfg.model`` is the default ViT-B/16 CLIP (speed-only switches aside), the model
    open_clip names ``ViT-B-16``."""
    default, speed_only = ModelConfig(), ("grad_checkpointing", "compile")
    return all(getattr(default, k) == v for k, v in vars(cfg.model).items() if k not in speed_only)


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """open_clip's training script exempts these from weight decay."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def _adamw(named: list[tuple[str, torch.nn.Parameter]], cfg: Config) -> torch.optim.AdamW:
    """torch AdamW with open_clip's two groups (no decay on gains, biases, logit scale)."""
    decay = [p for n, p in named if not _no_decay(n, p)]
    no_decay = [p for n, p in named if _no_decay(n, p)]
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    betas = (float(cfg.optim.betas[0]), float(cfg.optim.betas[1]))
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=betas, eps=cfg.optim.eps)


def _eager_step(
    model: torch.nn.Module, cfg: Config, device: torch.device, loss_of: Callable[[], torch.Tensor]
) -> Runner:
    """A plain PyTorch step (open_clip's training loop): zero grads, forward and loss under
    bf16 autocast on GPU (fp32 weights), backward, AdamW step, logit-scale clamp."""
    import math

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = _adamw(named, cfg)
    bf16 = device.type == "cuda" and cfg.train.precision == "bf16"
    logit_scale = next(p for n, p in named if n.endswith("logit_scale"))

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            logit_scale.clamp_(0, math.log(100))
        return loss.detach()

    params = sum(p.numel() for _, p in named)
    return Runner(
        step, {"params_trained": params, "precision": "bf16 autocast" if bf16 else "fp32"}
    )


def openclip_runner(cfg: Config, preset: str, device: torch.device, batch: dict) -> Runner:
    """open_clip's CLIP training step: its model and ``ClipLoss`` in the plain PyTorch loop
    of ``open_clip_train.train.train_one_epoch`` (one accumulation step)."""
    from open_clip.loss import ClipLoss

    model = open_clip_model(cfg, preset).to(device).train()
    if cfg.model.compile:  # model.compile=true: open_clip's model compiled as ours is
        model.compile()
    loss_fn = ClipLoss()
    images, texts = batch["views"][:, 0], batch["tokens"]
    return _eager_step(model, cfg, device, lambda: loss_fn(*model(images, texts)))


def clip_torch_runner(cfg: Config, device: torch.device, batch: dict) -> Runner:
    """Our plain CLIP model and InfoNCE in that same plain PyTorch loop (no Trainer, no
    DeepSpeed): tells the model's cost from the engine's."""
    from aclip.methods.losses import clip_infonce

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.loss).to(device).train()
    images, texts = batch["views"][:, 0], batch["tokens"]

    def loss_of() -> torch.Tensor:
        out = model(images, texts)
        return clip_infonce(out["image_emb"], out["text_emb"], out["logit_scale_exp"])

    return _eager_step(model, cfg, device, loss_of)


def profile_mode(runner: Runner, mode: str, device: torch.device, out_dir: str) -> None:
    """torch.profiler over 3 steps of one mode: op table and chrome trace into ``out_dir``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with profile(activities=activities) as prof:
        for _ in range(3):
            runner.step()
        common.synchronize(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40)
    (out / f"profile_{mode}.txt").write_text(table + "\n")
    prof.export_chrome_trace(str(out / f"trace_{mode}.json"))


@dataclass
class Built:
    """A mode ready to time: its runner, FLOPs, memory figures and host-sync count."""

    runner: Runner
    result: dict[str, Any]


def prime(opts: StepOptions, dist_info: DistInfo, batch: dict, out_dir: str) -> None:
    """Build and step one trainer, then free it, so that one-time work (imports, DeepSpeed and
    autograd set-up) is charged to no mode's memory or time."""
    runner = trainer_runner(bench_config(opts, "clip", out_dir), dist_info, batch)
    runner.step()
    del runner
    common.release_memory(dist_info.device)


def build_mode(
    opts: StepOptions, mode: str, dist_info: DistInfo, batch: dict, out_dir: str
) -> Built:
    """Build one mode and run its warm-up steps, measuring peak memory over both (above what
    was held before: the other modes already built and the shared batch are excluded)."""
    device = dist_info.device
    cfg = bench_config(opts, mode, out_dir)
    flops = mode_flops(cfg, cfg.train.global_batch_size, dist_info.world_size)
    warmup = max(2, PRESETS[opts.preset]["warmup"] if opts.warmup is None else opts.warmup)
    common.release_memory(device)
    memory = common.PeakMemory(device)
    memory.start()
    if mode == "openclip":
        runner = openclip_runner(cfg, opts.preset, device, batch)
    elif mode == "clip_torch":
        runner = clip_torch_runner(cfg, device, batch)
    else:
        runner = trainer_runner(cfg, dist_info, batch)
    for _ in range(warmup):
        runner.step()
    peak = memory.stop()
    result = {"mode": mode, "title": MODE_TITLES[mode], **runner.info, "warmup_steps": warmup}
    result |= {"peak_memory_bytes": peak, "memory_before_bytes": memory.base}
    result |= {"host_syncs_per_step": common.count_host_syncs(runner.step, device)}
    result["flops"] = flops.as_dict()
    return Built(runner, result)


def time_interleaved(built: dict[str, Built], device: torch.device, steps: int) -> None:
    """Time ``steps`` steps of every mode, round-robin (one step of each mode per round), so
    that load from other processes falls on all modes alike; medians go into the results."""
    times: dict[str, list[float]] = {mode: [] for mode in built}
    for _ in range(steps):
        for mode, b in built.items():
            times[mode] += common.time_steps(b.runner.step, device, warmup=0, steps=1)
    for mode, b in built.items():
        b.result |= common.summarize(times[mode]) | {"step_s_all": times[mode]}


def add_rates(result: dict[str, Any], batch: int, peak: float | None) -> None:
    """Samples/s, achieved TFLOP/s and MFU (when a peak is known) from the median step."""
    step_s = result["step_s_median"]
    result["samples_per_s"] = batch / step_s
    result["achieved_tflops"] = result["flops"]["total"] / step_s / 1e12
    result["mfu"] = result["achieved_tflops"] / peak if peak else None


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each target ratio that both of its modes were run for, with its limit and verdict."""
    out = {}
    for name, (num, den, metric, limit) in TARGETS.items():
        if num in results and den in results:
            value = results[num][metric] / results[den][metric]
            out[name] = {"value": value, "target_max": limit, "met": value <= limit}
    return out


def run_step_bench(opts: StepOptions) -> dict[str, Any]:
    """Build every requested mode, then time them interleaved; returns the JSON payload
    (environment, per-mode figures, target ratios)."""
    unknown = [m for m in opts.modes if m not in MODES]
    if unknown or opts.preset not in PRESETS:
        raise ValueError(f"unknown preset {opts.preset!r} or modes {unknown}")
    dist_info = init_distributed()
    device = dist_info.device
    first = bench_config(opts, opts.modes[0], tempfile.gettempdir())
    batch_size = first.train.global_batch_size
    batch = synthetic_batch(first, batch_size, device)
    peak = common.peak_tflops(device, opts.peak_tflops)
    env = common.environment(device)
    steps = PRESETS[opts.preset]["steps"] if opts.steps is None else opts.steps
    with tempfile.TemporaryDirectory(prefix="aclip_bench_") as out_dir:
        prime(opts, dist_info, batch, out_dir)
        built = {}
        for mode in opts.modes:
            print(f"[bench] building {mode}: {MODE_TITLES[mode]}", flush=True)
            built[mode] = build_mode(opts, mode, dist_info, batch, out_dir)
        print(f"[bench] timing {steps} interleaved rounds", flush=True)
        time_interleaved(built, device, steps)
        if opts.profile_dir:
            for mode, b in built.items():
                profile_mode(b.runner, mode, device, opts.profile_dir)
    results = {mode: b.result for mode, b in built.items()}
    for result in results.values():
        add_rates(result, batch_size, peak)
    env["load_average_1m_end"] = os.getloadavg()[0]
    return {
        "kind": "step",
        "environment": env,
        "preset": opts.preset,
        "batch": batch_size,
        "image_size": first.model.image_size,
        "vision_model": first.model.vision_model,
        "precision": opts.precision if device.type == "cuda" else "fp32",
        "peak_tflops": peak,
        "memory_kind": common.PeakMemory(device).kind,
        "timing": f"median of {steps} steps per mode, modes interleaved round-robin",
        "overrides": opts.overrides,
        "modes": results,
        "ratios": ratios(results),
    }


def step_table(payload: dict[str, Any]) -> str:
    """The per-mode table with ratios against our plain CLIP, and the target lines."""
    modes = payload["modes"]
    base = modes.get("clip")
    header = ["mode", "step ms", "samples/s", "peak MB", "GFLOP/sample", "TFLOP/s", "MFU",
              "time/clip", "mem/clip"]  # fmt: skip
    rows = []
    for name, r in modes.items():
        rel_t = r["step_s_median"] / base["step_s_median"] if base else None
        rel_m = r["peak_memory_bytes"] / base["peak_memory_bytes"] if base else None
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else None
        rows.append([
            name, 1e3 * r["step_s_median"], r["samples_per_s"], r["peak_memory_bytes"] / 2**20,
            r["flops"]["per_sample"] / 1e9, r["achieved_tflops"], mfu, rel_t, rel_m,
        ])  # fmt: skip
    lines = [common.format_table(header, rows), ""]
    for name, t in payload["ratios"].items():
        verdict = (
            "met" if t["met"] else f"MISSED by {100 * (t['value'] / t['target_max'] - 1):.1f}%"
        )
        lines.append(f"{name}: {t['value']:.3f} (target <= {t['target_max']:.2f}) {verdict}")
    env = payload["environment"]
    lines.append(f"{env['device']}, {payload['preset']} batch {payload['batch']}, "
                 f"{payload['precision']}, memory: {payload['memory_kind']}")  # fmt: skip
    return "\n".join(lines)
