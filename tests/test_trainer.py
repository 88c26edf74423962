"""The trainer on the CPU with DeepSpeed: loss goes down, resume is exact, ranks agree."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import fake_batch, free_port, rank_slice, set_rank_env, tiny_config

from aclip.distributed import init_distributed
from aclip.train.trainer import Trainer


def test_a_few_deepspeed_steps_lower_the_loss(tmp_path, dist_info):
    cfg = tiny_config(str(tmp_path))
    trainer = Trainer(cfg, dist_info)
    batch = fake_batch(cfg, 8, seed=1)
    losses = [trainer.train_step(batch)["loss"].item() for _ in range(8)]
    assert trainer.step == 8
    assert losses[-1] < losses[0] - 0.5, losses
    # the EMA teacher moved, but less than the student
    assert trainer.method.teacher is not None


def test_ema_teacher_follows_the_student_after_each_step(tmp_path, dist_info):
    cfg = tiny_config(str(tmp_path), **{"ema.momentum": 0.5, "ema.final_momentum": 0.5})
    trainer = Trainer(cfg, dist_info)
    student = trainer.model.clip.visual.blocks[0].attn.qkv.weight
    teacher = trainer.method.teacher.module["visual"].blocks[0].attn.qkv.weight
    t_before, s_before = teacher.detach().clone(), student.detach().clone()
    assert torch.equal(t_before, s_before)
    trainer.train_step(fake_batch(cfg, 8, seed=2))
    expected = 0.5 * t_before + 0.5 * student.detach()
    assert not torch.equal(student.detach(), s_before)
    torch.testing.assert_close(teacher, expected, rtol=0, atol=1e-7)


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    opt = trainer.engine.optimizer.state_dict()["state"]
    return {
        "ema": torch.cat([p.flatten() for p in trainer.method.teacher.module.parameters()]),
        "weights": torch.cat([p.detach().flatten() for p in trainer.model.parameters()]),
        "exp_avg": torch.cat([s["exp_avg"].flatten() for s in opt.values()]),
        "lr": torch.tensor(trainer.engine.get_lr()),
    }


def test_checkpoint_then_resume_continues_identically(tmp_path, dist_info):
    cfg = tiny_config(str(tmp_path / "run"), **{"mask.strategy": "random"})
    batches = [fake_batch(cfg, 8, seed=10 + i) for i in range(6)]
    first = Trainer(cfg, dist_info)
    for b in batches[:3]:
        first.train_step(b)
    first.save_checkpoint()
    saved = _state(first)
    after = [first.train_step(b)["loss"].item() for b in batches[3:]]

    second = Trainer(cfg, dist_info)
    assert second.resume("latest")
    assert second.step == 3 and second.samples_seen == 24
    for key, value in _state(second).items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)
    resumed = [second.train_step(b)["loss"].item() for b in batches[3:]]
    assert resumed == pytest.approx(after, abs=1e-6)


def test_checkpoints_are_pruned_and_config_written(tmp_path, dist_info):
    cfg = tiny_config(str(tmp_path), **{"train.keep_checkpoints": 2})
    trainer = Trainer(cfg, dist_info)
    trainer._open_run_dir()
    for _ in range(3):
        trainer.train_step(fake_batch(cfg, 8, seed=3))
        trainer.save_checkpoint()
    tags = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert tags == ["step_00000002", "step_00000003"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert "keep_ratio: 0.5" in (tmp_path / "config.yaml").read_text()


def _rank_worker(rank: int, world: int, port: int, out: str, steps: int, overrides: dict) -> None:
    set_rank_env(rank, world, port)
    info = init_distributed()
    cfg = tiny_config(out, **overrides)
    trainer = Trainer(cfg, info)
    losses = []
    for step in range(steps):
        global_batch = fake_batch(cfg, cfg.train.global_batch_size, seed=100 + step)
        batch = rank_slice(global_batch, rank, world)
        terms = trainer.train_step(batch)
        from aclip.distributed import all_reduce_mean

        losses.append(all_reduce_mean(torch.stack(list(terms.values()))).tolist())
    ema = torch.cat([p.flatten() for p in trainer.method.teacher.module.parameters()])
    if rank == 0:
        Path(out, "losses.json").write_text(json.dumps(losses))
    torch.save(ema, Path(out, f"ema_rank{rank}.pt"))


def _spawn(world: int, out: Path, steps: int, **overrides: object) -> list[list[float]]:
    out.mkdir(parents=True)
    mp.spawn(_rank_worker, args=(world, free_port(), str(out), steps, overrides), nprocs=world)
    return json.loads((out / "losses.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_two_ranks_match_one_rank(tmp_path, stage):
    """Same global batch of 16: 2 gloo ranks x 8 vs 1 rank x 16, full A-CLIP loss, 5 steps.

    Gathered InfoNCE and NT-Xent, cross-rank BN in the heads, gradient averaging. Run at the
    paper's LR: Adam's normalised step turns float32 rounding in near-zero gradients (the
    attention key bias, which the softmax makes gradient-free) into LR-sized steps, so the
    runs drift apart a little faster at larger LRs while staying the same computation.
    """
    overrides = {"train.zero_stage": stage, "train.global_batch_size": 16, "optim.lr": 5e-4}
    one = _spawn(1, tmp_path / "one", 5, **overrides)
    two = _spawn(2, tmp_path / "two", 5, **overrides)
    assert len(one) == len(two) == 5
    for step, (a, b) in enumerate(zip(one, two, strict=True)):
        assert a == pytest.approx(b, abs=1e-5), f"step {step}: {a} vs {b}"
    ema0 = torch.load(tmp_path / "two" / "ema_rank0.pt")
    ema1 = torch.load(tmp_path / "two" / "ema_rank1.pt")
    assert torch.equal(ema0, ema1)


def test_a_loader_that_yields_nothing_stops_the_run_at_once(tmp_path, dist_info):
    trainer = Trainer(tiny_config(str(tmp_path)), dist_info)
    with pytest.raises(RuntimeError, match="yielded no batch"):
        trainer.fit(loader=[])


def test_a_finite_loader_is_rebuilt_when_it_runs_out(tmp_path, dist_info, monkeypatch):
    cfg = tiny_config(str(tmp_path), **{"train.stop_at_step": 5})
    trainer = Trainer(cfg, dist_info)
    built = []

    def rebuild():
        built.append(trainer.samples_seen)
        return [fake_batch(cfg, 8, seed=len(built))] * 2

    monkeypatch.setattr(trainer.stream, "build_loader", rebuild)
    trainer.fit(loader=[fake_batch(cfg, 8, seed=0)])
    assert trainer.step == 5
    assert built == [8, 24]  # rebuilt at each exhaustion (1 + 2 + 2 steps), at its position


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, dist_info):
    from aclip.config import ConfigError

    first = Trainer(tiny_config(str(tmp_path)), dist_info)
    first.train_step(fake_batch(first.cfg, 8, seed=0))
    first.save_checkpoint()
    other = Trainer(tiny_config(str(tmp_path), **{"model.text_layers": 2, "loss.byol_out": 8}),
                    dist_info)  # fmt: skip
    with pytest.raises(ConfigError, match=r"model\.text_layers: checkpoint 1, config 2"):
        other.resume("latest")
    assert other.step == 0
    same = Trainer(tiny_config(str(tmp_path), **{"optim.lr": 1e-4}), dist_info)
    assert same.resume("latest") and same.step == 1  # optimiser settings may change
    # how the model runs (activation checkpointing) may change too: same weights
    recompute = Trainer(tiny_config(str(tmp_path), **{"model.grad_checkpointing": True}), dist_info)
    assert recompute.resume("latest") and recompute.step == 1


def _lr_and_momentum_per_step(trainer: Trainer, steps: int) -> list[tuple[float, float]]:
    out = []
    for i in range(steps):
        trainer.train_step(fake_batch(trainer.cfg, 8, seed=30 + i))
        out.append((trainer.engine.get_lr()[0], trainer.method.momentum(trainer.step)))
    return out


def test_stopping_early_leaves_the_lr_and_ema_schedules_alone(tmp_path, dist_info):
    """train.stop_at_step=k stops after step k; the LR and EMA momentum at steps 1..k are the
    full run's (the schedules keep their length); optim.total_steps=k fits them to k steps."""
    over = {"optim.warmup_epochs": 0.02, "optim.epochs": 1, "ema.final_momentum": 1.0}
    full = Trainer(tiny_config(str(tmp_path / "full"), **over), dist_info)
    stop = Trainer(tiny_config(str(tmp_path / "stop"), **over, **{"train.stop_at_step": 3}),
                   dist_info)  # fmt: skip
    short = Trainer(tiny_config(str(tmp_path / "short"), **over, **{"optim.total_steps": 3}),
                    dist_info)  # fmt: skip
    assert full.total_steps == stop.total_steps == 100 and full.end_step == 100
    assert stop.end_step == 3 and short.total_steps == short.end_step == 3
    stop.fit(loader=[fake_batch(stop.cfg, 8, seed=30 + i) for i in range(3)])
    assert stop.step == 3
    reference = _lr_and_momentum_per_step(full, 3)
    assert (stop.engine.get_lr()[0], stop.method.momentum(stop.step)) == reference[-1]
    assert reference[-1][0] > 0.9 * full.cfg.optim.lr  # mid-schedule: near the peak LR
    shortened = _lr_and_momentum_per_step(short, 3)
    assert shortened[-1] == (pytest.approx(short.cfg.optim.min_lr), 1.0)  # its schedule's end


def test_the_removed_max_steps_key_is_refused_naming_its_replacements(tmp_path):
    from aclip.config import ConfigError, config_from_yaml, to_yaml

    with pytest.raises(ConfigError, match=r"train\.max_steps.*stop_at_step.*optim\.total_steps"):
        tiny_config(str(tmp_path), **{"train.max_steps": 3})
    old_run = to_yaml(tiny_config(str(tmp_path))).replace("stop_at_step: 0", "max_steps: 5")
    assert config_from_yaml(old_run).train.stop_at_step == 0  # an old run's config still reads


@pytest.mark.parametrize("stage", [0, 1])
def test_a_logit_scale_above_the_cap_comes_back_down(tmp_path, dist_info, stage):
    """The raw logit scale is clamped to ln 100 in place after each step, so its gradient stays
    alive: when the loss asks for a smaller scale it comes down (before: a forward clamp gave it
    zero gradient above ln 100 and it stayed where Adam had left it). ZeRO 1 keeps an fp32 master
    copy, clamped too."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    cfg = tiny_config(str(tmp_path), **{"train.zero_stage": stage, "mask.strategy": "none"})
    trainer = Trainer(cfg, dist_info)
    scale = trainer.model.clip.logit_scale
    with torch.no_grad():
        scale.fill_(5.0)
    safe_set_full_fp32_param(scale, torch.full((1,), 5.0))
    cap = math.log(100.0)
    seen = []
    for i in range(12):  # random captions: a confident scale only costs loss
        trainer.train_step(fake_batch(cfg, 8, seed=70 + i))
        master = safe_get_full_fp32_param(scale)
        seen.append(float(scale.detach()) if master is None else float(master))
    assert max(seen) <= cap + 1e-6, seen
    assert seen[-1] < cap - 5e-3, seen


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_runs_are_evaluated_and_saved_for_eval_from_the_fp32_master_weights(
    tmp_path, dist_info, stage
):
    """With bf16 weights the module holds rounded copies; evaluation (during and after training)
    and load_eval_model (evals, export) use the optimizer's fp32 master weights."""
    from deepspeed.utils import safe_get_full_fp32_param

    from aclip.interop.run import load_eval_model

    cfg = tiny_config(str(tmp_path), **{"train.zero_stage": stage, "train.precision": "bf16"})
    trainer = Trainer(cfg, dist_info)
    for i in range(3):
        trainer.train_step(fake_batch(cfg, 8, seed=80 + i))
    clip = trainer.model.clip
    masters = {n: safe_get_full_fp32_param(p) for n, p in clip.named_parameters()}
    assert all(m is not None and m.dtype == torch.float32 for m in masters.values())
    assert all(p.dtype == torch.bfloat16 for p in clip.parameters())
    rounded = {n: p.detach().float() for n, p in clip.named_parameters()}
    assert any(not torch.equal(masters[n], rounded[n]) for n in masters)  # rounding is real

    evaluated = dict(trainer.eval_clip().named_parameters())
    saved_clip, _ = load_eval_model(trainer.save_checkpoint())
    loaded = dict(saved_clip.named_parameters())
    for name, master in masters.items():
        assert torch.equal(evaluated[name], master), name
        assert torch.equal(loaded[name], master), name


def test_one_rank_zero0_skips_the_gradient_all_reduce_and_changes_no_number(tmp_path, dist_info):
    """On one rank with ZeRO 0 there is nobody to reduce with: the engine skips DeepSpeed's
    bucketed gradient all-reduce (flatten, reduce, copy back); the steps are bit-identical to
    the all-reducing engine's."""
    runs = []
    for allreduce in (False, True):
        trainer = Trainer(tiny_config(str(tmp_path / str(allreduce))), dist_info)
        assert trainer.engine.enable_backward_allreduce is False
        trainer.engine.enable_backward_allreduce = allreduce
        losses = [trainer.train_step(fake_batch(trainer.cfg, 8, seed=90 + i))["loss"].item()
                  for i in range(3)]  # fmt: skip
        runs.append((losses, torch.cat([p.detach().flatten() for p in trainer.model.parameters()])))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_amp_bf16_keeps_fp32_weights_and_computes_the_forward_in_bf16(tmp_path, dist_info):
    """train.precision=amp_bf16 (open_clip's): fp32 weights and optimizer on any ZeRO stage (0
    included), the student's forward under bf16 autocast; the loss stays close to fp32's."""
    fp32 = Trainer(tiny_config(str(tmp_path / "fp32")), dist_info)
    amp = Trainer(tiny_config(str(tmp_path / "amp"), **{"train.precision": "amp_bf16"}), dist_info)
    assert all(p.dtype == torch.float32 for p in amp.model.parameters())
    batch = fake_batch(amp.cfg, 8, seed=7)
    out = amp._student_forward(batch["views"].flatten(0, 1), batch["tokens"], None)
    assert out["image_emb"].dtype == torch.bfloat16
    a, b = amp.train_step(batch)["loss"].item(), fp32.train_step(batch)["loss"].item()
    assert a == pytest.approx(b, rel=2e-2) and a != b
