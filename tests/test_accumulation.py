"""Gradient accumulation with the contrastive batch kept whole (open_clip's feature cache): K
micro-batches give the loss and gradients of one batch K times larger (CLIP, FLIP); for A-CLIP
exactly what a micro-batch changes (the student's BatchNorm heads normalise per micro-batch)."""

from __future__ import annotations

import pytest
import torch
from helpers import fake_batch, tiny_config

from aclip.train.accumulation import merge_rows, micro_losses, split_rows
from aclip.train.trainer import Trainer


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _accumulated(trainer: Trainer, batch: dict, parts: int) -> tuple[float, dict]:
    """Back-propagate each micro-batch's loss through the student itself (no optimizer step)."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    losses = [loss.total for loss in micro_losses(trainer.method, model, batch, 0, parts)]
    for loss in losses:
        loss.backward()
    assert len(losses) == parts
    assert all(torch.equal(loss, losses[0]) for loss in losses)  # every pass: the whole loss
    return losses[0].item(), _grads(model)


@pytest.mark.parametrize("method", ["clip", "flip"])
@pytest.mark.parametrize("parts", [2, 4])
def test_micro_batches_give_the_whole_batchs_loss_and_gradients(tmp_path, dist_info, method, parts):
    cfg = tiny_config(str(tmp_path), **{"method": method, "mask.num_views": 1,
                                        "train.global_batch_size": 16})  # fmt: skip
    trainer = Trainer(cfg, dist_info)
    batch = fake_batch(cfg, 16, seed=3)
    whole_loss, whole = _accumulated(trainer, batch, 1)
    loss, grads = _accumulated(trainer, batch, parts)
    assert loss == pytest.approx(whole_loss, abs=1e-5)
    assert set(grads) == set(whole) and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grad, whole[name], atol=1e-5, rtol=1e-4, msg=name)


def test_aclip_micro_batches_equal_a_whole_batch_with_per_micro_batch_head_statistics(
    tmp_path, dist_info
):
    """A-CLIP's InfoNCE and NT-Xent see the whole batch, the teacher runs once on it; what a
    micro-batch changes is the SimCLR/BYOL heads' BatchNorm, which normalises each micro-batch
    alone. The reference: the whole batch's loss with each micro-batch's outputs computed on
    their own (one backward); accumulation gives its loss and gradients."""
    cfg = tiny_config(str(tmp_path), **{"train.global_batch_size": 16})
    trainer = Trainer(cfg, dist_info)
    method, model = trainer.method, trainer.model
    batch = fake_batch(cfg, 16, seed=4)
    loss, grads = _accumulated(trainer, batch, 2)

    model.zero_grad(set_to_none=True)
    prepared = method.prepare(batch, 0)
    outs = [method.forward(model, part) for part in split_rows(prepared, 2)]
    reference = method.loss_from(merge_rows(outs, outs[0], method.whole_outputs), prepared)
    reference.total.backward()
    assert loss == pytest.approx(reference.total.item(), abs=1e-5)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)

    whole_loss, _ = _accumulated(trainer, batch, 1)
    assert abs(whole_loss - loss) > 1e-4  # the heads' statistics do differ from one batch's


def _record_step_grads(trainer: Trainer) -> list[dict[str, torch.Tensor]]:
    """The gradients the optimizer steps with, recorded at each of its steps."""
    seen: list[dict[str, torch.Tensor]] = []
    optimizer = trainer.engine.optimizer
    step = optimizer.step

    def recording_step(*args, **kwargs):
        seen.append(_grads(trainer.model))
        return step(*args, **kwargs)

    optimizer.step = recording_step
    return seen


@pytest.mark.parametrize("stage", [0, 1])
def test_the_trainer_steps_once_per_accumulated_batch(tmp_path, dist_info, stage):
    """train.accum_freq=2 through the engine: two micro-batches, one optimizer step per batch,
    stepping with the gradients of one whole batch (fp32, plain CLIP; the gradients compared on
    ZeRO 0, where they sit on the parameters)."""
    over = {"method": "clip", "mask.num_views": 1, "train.global_batch_size": 16,
            "train.zero_stage": stage}  # fmt: skip
    whole = Trainer(tiny_config(str(tmp_path / "a"), **over), dist_info)
    split = Trainer(tiny_config(str(tmp_path / "b"), **over, **{"train.accum_freq": 2}),
                    dist_info)  # fmt: skip
    whole_grads, split_grads = _record_step_grads(whole), _record_step_grads(split)
    for i in range(3):
        batch = fake_batch(whole.cfg, 16, seed=20 + i)
        a, b = whole.train_step(batch), split.train_step(batch)
        assert b["loss"].item() == pytest.approx(a["loss"].item(), abs=1e-4)
    assert split.step == whole.step == 3
    assert split.engine.global_steps == whole.engine.global_steps == 3
    assert len(split_grads) == len(whole_grads) == 3  # one optimizer step per batch
    if stage == 0:  # the same weights going in: the same gradients
        assert len(split_grads[0]) > 10
        for name, grad in split_grads[0].items():
            torch.testing.assert_close(grad, whole_grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def _rank_losses(rank: int, world: int, port: int, out: str, overrides: dict) -> None:
    import json
    from pathlib import Path

    from helpers import rank_slice, set_rank_env

    from aclip.distributed import all_reduce_mean, init_distributed

    set_rank_env(rank, world, port)
    trainer = Trainer(tiny_config(out, **overrides), init_distributed())
    losses = []
    for step in range(3):
        batch = rank_slice(fake_batch(trainer.cfg, 16, seed=60 + step), rank, world)
        losses.append(all_reduce_mean(trainer.train_step(batch)["loss"]).item())
    if rank == 0:
        Path(out, "losses.json").write_text(json.dumps(losses))


@pytest.mark.slow
def test_two_ranks_with_two_micro_batches_each_match_one_rank(tmp_path):
    """Global batch 16: 2 gloo ranks x 2 micro-batches of 4 vs 1 rank x 16: the gathered InfoNCE
    spans all 16 samples either way (CLIP, ZeRO 1, 3 steps)."""
    import json

    import torch.multiprocessing as mp
    from helpers import free_port

    over = {"method": "clip", "mask.num_views": 1, "train.global_batch_size": 16,
            "train.zero_stage": 1, "optim.lr": 5e-4}  # fmt: skip
    runs = {}
    for name, world, accum in (("one", 1, 1), ("two", 2, 2)):
        out = tmp_path / name
        out.mkdir()
        args = (world, free_port(), str(out), over | {"train.accum_freq": accum})
        mp.spawn(_rank_losses, args=args, nprocs=world)
        runs[name] = json.loads((out / "losses.json").read_text())
    assert runs["two"] == pytest.approx(runs["one"], abs=1e-5)
