"""Benchmarks: the analytic FLOP count against FlopCounterMode, and both benches end to end
(a couple of steps / batches, valid JSON; no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import fake_batch, tiny_config
from open_clip.loss import ClipLoss
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from aclip.bench import common
from aclip.bench.__main__ import main
from aclip.bench.step import StepOptions, bench_config, mode_flops, open_clip_model
from aclip.methods.flops import step_flops
from aclip.methods.losses import aclip_loss, multi_view_infonce
from aclip.methods.tokens import TokenSelector
from aclip.model import build_model

ATEN = torch.ops.aten


def _sdpa(q, k, v, *_args, out_shape=None, **_kw) -> int:
    return sdpa_flop_count(q, k, v)


def _sdpa_backward(grad_out, q, k, v, *_args, out_shape=None, **_kw) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


# FlopCounterMode has no formula for the CPU flash-attention kernel SDPA runs on here
CPU_SDPA = {
    ATEN._scaled_dot_product_flash_attention_for_cpu: _sdpa,
    ATEN._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward,
}


def counted(fn, attention: bool = True) -> int:
    """FLOPs FlopCounterMode counts in ``fn()``; ``attention=False`` leaves CPU SDPA out."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA if attention else {}) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = tiny_config(str(tmp_path_factory.mktemp("flops")), **{"mask.strategy": "random"})
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss)
    batch = fake_batch(cfg, 8, seed=0)
    selector = TokenSelector("random", cfg.mask.keep_ratio, model.clip.visual.grid_hw)
    keep = selector.select(None, 16, torch.Generator().manual_seed(0))
    return cfg, model, batch, keep


def _student_loss(cfg, model, batch, keep) -> torch.Tensor:
    out = model(batch["views"].flatten(0, 1), batch["tokens"], keep)

    def per_view(x):
        return list(x.view(8, 2, -1).unbind(1))

    target = torch.randn(8, cfg.loss.byol_out)
    return aclip_loss(
        per_view(out["image_emb"]), out["text_emb"], out["logit_scale_exp"],
        per_view(out["simclr_z"]), per_view(out["byol_pred"]), target, 1.0, 2.0,
    ).total  # fmt: skip


def test_analytic_forward_and_teacher_flops_equal_flop_counter(setup):
    cfg, model, batch, keep = setup
    flops = step_flops(model, cfg, 8)
    assert counted(lambda: _student_loss(cfg, model, batch, keep)) == flops.student_forward

    def teacher():
        with torch.no_grad():
            pooled, _ = model.clip.visual.forward_with_relevance(batch["ema"])
            model.byol_projector(pooled)

    assert counted(teacher) == flops.teacher
    assert flops.total == 3 * flops.student_forward + flops.teacher


@pytest.mark.parametrize("method", ["aclip", "flip"])
def test_gaussian_masking_flops_equal_flop_counter_and_randoms(tmp_path, method):
    """mask.strategy=gaussian keeps as many tokens as random: the analytic count (Method.cost)
    equals FlopCounterMode on a step with Gaussian-selected tokens, for A-CLIP and FLIP."""
    extra = {"mask.num_views": 1, "loss.w_simclr": 0} if method == "flip" else {}
    cfg = tiny_config(str(tmp_path), **{"method": method, "mask.strategy": "gaussian", **extra})
    random_cfg = tiny_config(
        str(tmp_path), **{"method": method, "mask.strategy": "random", **extra}
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss)
    batch = fake_batch(cfg, 8, seed=0)
    selector = TokenSelector("gaussian", cfg.mask.keep_ratio, model.clip.visual.grid_hw)
    keep = selector.select(None, 8 * cfg.mask.num_views, torch.Generator().manual_seed(0))
    assert keep.shape[1] == 8  # half of the 16 patches

    def step():
        if method == "aclip":  # both views, SimCLR and BYOL heads, as the setup's A-CLIP step
            return _student_loss(cfg, model, batch, keep)
        out = model(batch["views"].flatten(0, 1), batch["tokens"], keep)
        return multi_view_infonce([out["image_emb"]], out["text_emb"], out["logit_scale_exp"])

    flops = step_flops(model, cfg, 8)
    assert counted(step) == flops.student_forward
    assert flops.total == step_flops(model, random_cfg, 8).total


def test_backward_flops_are_twice_the_forward_up_to_known_terms(setup):
    """Measured fwd+bwd = 3x forward, less the patch embedding's input gradient (images need
    none), plus SDPA backward's recomputation of the scores (FlopCounterMode counts 2.5x the
    attention forward for its backward): the analytic model-FLOPs convention is the 3x."""
    cfg, model, batch, keep = setup
    flops = step_flops(model, cfg, 8)
    measured = counted(lambda: _student_loss(cfg, model, batch, keep).backward())
    vit = model.clip.visual
    patch_grad_input = 16 * 2 * vit.num_patches * (3 * 8 * 8) * vit.width  # 16 images
    forward = lambda: _student_loss(cfg, model, batch, keep)  # noqa: E731
    attention = counted(forward) - counted(forward, attention=False)
    assert attention > 0
    assert measured == 3 * flops.student_forward - patch_grad_input + attention // 2


def test_open_clip_equivalent_model_has_our_plain_clip_flops(tmp_path):
    opts = StepOptions(preset="tiny", batch=4)
    cfg = bench_config(opts, "openclip", str(tmp_path))
    theirs = open_clip_model(cfg, "tiny")
    images = torch.randn(4, 3, cfg.model.image_size, cfg.model.image_size)
    tokens = fake_batch(cfg, 4, seed=1)["tokens"]

    def step():
        image, text, scale = theirs(images, tokens)
        ClipLoss()(image, text, scale)

    assert counted(step) == mode_flops(cfg, 4).student_forward
    ours = sum(p.numel() for p in build_model(cfg.model, cfg.loss).clip.parameters())
    assert abs(sum(p.numel() for p in theirs.parameters()) - ours) / ours < 0.01


def test_step_bench_runs_every_mode_and_writes_json(tmp_path, capsys):
    out = tmp_path / "step.json"
    small = ["model.vocab_size=500", "model.context_length=16", "model.text_layers=1"]
    main(["--preset", "tiny", "--batch", "4", "--warmup", "2", "--steps", "2",
          "--json", str(out), "--set", *small])  # fmt: skip
    payload = json.loads(out.read_text())
    assert set(payload["modes"]) == {
        "openclip",
        "clip_torch",
        "clip",
        "flip",
        "aclip",
        "aclip_cheap",
    }
    for result in payload["modes"].values():
        assert len(result["step_s_all"]) == 2 and result["step_s_median"] > 0
        assert result["flops"]["total"] > 0 and result["samples_per_s"] > 0
        assert result["mfu"] is None  # CPU, no --peak-tflops
    modes = payload["modes"]
    assert modes["aclip"]["teacher"] and not modes["clip"]["teacher"]
    assert modes["flip"]["flops"]["vision"] < modes["clip"]["flops"]["vision"]
    assert set(payload["ratios"]) == {
        "aclip_time_vs_clip", "aclip_memory_vs_clip", "clip_time_vs_openclip",
        "aclip_cheap_time_vs_clip",
    }  # fmt: skip
    cheap, full = modes["aclip_cheap"]["flops"], modes["aclip"]["flops"]
    assert cheap["teacher"] < full["teacher"] and cheap["vision"] == full["vision"]
    assert "aclip_time_vs_clip" in capsys.readouterr().out


def test_loader_bench_writes_json(tmp_path):
    out = tmp_path / "loader.json"
    main(["loader", "--samples", "48", "--src-size", "40", "--image-size", "32", "--batch", "8",
          "--workers", "0", "--batches", "2", "--uint8", "false", "--json", str(out)])  # fmt: skip
    payload = json.loads(out.read_text())
    (run,) = payload["runs"]
    assert run["workers"] == 0 and run["views_shape"] == [8, 2, 3, 32, 32]
    assert run["samples_per_cpu_s"] > 0 and payload["target_per_core"]["value"] > 0
    assert payload["stages_ms_per_sample_one_core"]["views_ms"] > 0


def test_peak_table_and_override():
    cpu = torch.device("cpu")
    assert common.peak_tflops(cpu, None) is None
    assert common.peak_tflops(cpu, 123.0) == 123.0
    table = dict(common.PEAK_BF16_TFLOPS)
    assert table["H100"] == 989.0 and table["A100"] == 312.0


def test_bench_gpu_refuses_without_a_gpu_and_runs_its_cpu_smoke_preset(tmp_path, capsys):
    from aclip.bench.gpu import main as bench_gpu

    if not torch.cuda.is_available():
        assert bench_gpu(["--out", str(tmp_path / "refused")]) == 2
        assert "error: no GPU" in capsys.readouterr().err
    small = ["model.vocab_size=500", "model.context_length=16", "model.text_layers=1"]
    args = ["--cpu", "--preset", "tiny", "--batch", "4", "--warmup", "2", "--steps", "1",
            "--no-compile", "--loader-samples", "32", "--loader-batches", "1",
            "--loader-batch", "8", "--modes", "clip", "aclip_cheap",
            "--out", str(tmp_path), "--set", *small]  # fmt: skip
    assert bench_gpu(args) == 0
    payload = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert set(payload["phases"]) == {"eager", "loader"} and not payload["skipped"]
    modes = payload["phases"]["eager"]["modes"]
    assert set(modes) == {"clip", "aclip_cheap"}
    assert modes["aclip_cheap"]["flops"]["teacher"] > 0 and modes["clip"]["flops"]["teacher"] == 0
    runs = {r["augment_on"]: r for r in payload["phases"]["loader"]["runs"]}
    assert runs["gpu"]["device_ms_per_batch"] > 0 and runs["cpu"]["samples_per_cpu_s"] > 0
    table = (tmp_path / "bench_gpu.md").read_text()
    assert "Training step, eager" in table and "aclip_cheap" in table and "gpu" in table
