"""NaN/Inf losses or gradients skip the step on every rank alike; K in a row save and stop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from helpers import fake_batch, free_port, rank_slice, set_rank_env, tiny_config

from aclip.distributed import init_distributed
from aclip.methods.base import StepLoss
from aclip.train.numerics import NonFiniteLoss, StepGuard, nonfinite_anywhere
from aclip.train.trainer import Trainer


def _tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested dict/list (an optimizer state dict), by path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj.detach().clone()}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(
        obj, (list, tuple)) else ()  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    for key, val in items:
        out |= _tensors(val, f"{prefix}/{key}")
    return out


def _state(trainer: Trainer) -> dict[str, Any]:
    """Everything a skipped step must leave alone, bit for bit."""
    engine = trainer.engine
    return {
        "weights": _tensors([p.detach() for p in trainer.model.parameters()]),
        "buffers": _tensors(list(trainer.model.buffers())),
        "ema": _tensors(trainer.method.teacher.state_dict()),
        "optimizer": _tensors(engine.optimizer.state_dict()),
        "lr": engine.get_lr(),
        "scheduler": engine.lr_scheduler.state_dict(),
        "steps": (trainer.step, engine.global_steps, engine.global_samples, engine.micro_steps),
    }


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict) and all(isinstance(v, torch.Tensor) for v in a[key].values()):
            assert a[key].keys() == b[key].keys(), key
            for name, val in a[key].items():
                assert torch.equal(val, b[key][name]), f"{key}{name} changed"
        else:
            assert a[key] == b[key], key


def _nan_images(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch | {"views": torch.full_like(batch["views"], float("nan"))}


def _inf_grad_hook(trainer: Trainer) -> Any:
    """A hook that makes one weight's gradient Inf (the loss stays finite)."""
    weight = trainer.model.clip.visual.blocks[0].attn.qkv.weight
    return weight.register_hook(lambda g: torch.full_like(g, float("inf")))


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_nan_loss_or_inf_gradient_skips_the_step_and_changes_nothing(tmp_path, dist_info, stage):
    cfg = tiny_config(str(tmp_path), **{"train.zero_stage": stage})
    b0, b1 = fake_batch(cfg, 8, seed=0), fake_batch(cfg, 8, seed=1)
    trainer = Trainer(cfg, dist_info)
    trainer.train_step(b0)
    before = _state(trainer)

    losses = trainer.train_step(_nan_images(b1))  # NaN loss
    assert not torch.isfinite(losses["loss"])
    assert trainer.numerics.last_skipped and trainer.numerics.skipped == 1
    _assert_same(_state(trainer), before)

    hook = _inf_grad_hook(trainer)
    losses = trainer.train_step(b1)  # finite loss, Inf gradient
    hook.remove()
    assert torch.isfinite(losses["loss"])
    assert trainer.numerics.skipped == 2 and trainer.numerics.in_a_row == 2
    _assert_same(_state(trainer), before)
    assert trainer.samples_seen == 24  # the data position moves on: the next batch is used

    trainer.train_step(b1)  # training goes on as if the bad batches had never been seen
    assert trainer.step == 2 and not trainer.numerics.last_skipped
    assert trainer.numerics.in_a_row == 0
    reference = Trainer(cfg, dist_info)
    reference.train_step(b0)
    reference.train_step(b1)
    _assert_same(_state(trainer), _state(reference))  # bit for bit


def test_max_bad_steps_in_a_row_save_the_last_good_state_and_stop(tmp_path, dist_info):
    cfg = tiny_config(str(tmp_path), **{"train.max_bad_steps": 3})
    good = [fake_batch(cfg, 8, seed=i) for i in range(3)]
    nan = _nan_images(good[0])
    trainer = Trainer(cfg, dist_info)
    for batch in (good[0], nan, nan, good[1]):  # two in a row, then a good step: no stop
        trainer.train_step(batch)
    assert trainer.step == 2 and trainer.numerics.skipped == 2
    last_good = _state(trainer)
    trainer.train_step(nan)
    trainer.train_step(nan)
    with pytest.raises(NonFiniteLoss, match=r"3 steps in a row .*non-finite.*step 2") as err:
        trainer.train_step(nan)
    assert "step_00000002" in str(err.value) and "train.max_bad_steps=3" in str(err.value)
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000002"

    resumed = Trainer(cfg, dist_info)
    assert resumed.resume("latest") and resumed.step == 2
    state = _state(resumed)
    for key in ("weights", "buffers", "ema", "optimizer"):
        for name, val in last_good[key].items():
            assert torch.equal(state[key][name], val), key + name
    assert state["lr"] == last_good["lr"]


def test_skipped_steps_reach_tensorboard_and_fit_goes_on(tmp_path, dist_info):
    cfg = tiny_config(str(tmp_path), **{"train.stop_at_step": 3})
    batches = [fake_batch(cfg, 8, seed=i) for i in range(3)]
    trainer = Trainer(cfg, dist_info)
    logged: dict[str, list[float]] = {}

    class Writer:
        def add_scalar(self, key: str, value: float, step: int) -> None:
            logged.setdefault(key, []).append(value)

        def close(self) -> None:
            pass

    trainer.writer = Writer()
    trainer.fit(loader=[batches[0], _nan_images(batches[1]), batches[1], batches[2]])
    assert trainer.step == 3 and trainer.numerics.skipped == 1
    assert logged["train/skipped_steps"][0] == 0 and logged["train/skipped_steps"][-1] == 1


def test_step_guard_restores_buffers_and_counts_runs():
    module = torch.nn.BatchNorm1d(3)
    guard = StepGuard(module, max_bad_steps=2)
    guard.snapshot()
    saved = [b.clone() for b in module.buffers()]
    module(torch.full((4, 3), float("nan")))
    guard.restore()
    assert all(torch.equal(a, b) for a, b in zip(module.buffers(), saved, strict=True))
    assert not guard.bad() and guard.bad()  # the second in a row reaches the limit
    guard.good()
    assert guard.in_a_row == 0 and guard.skipped == 2
    assert nonfinite_anywhere(torch.tensor([1.0, float("inf"), float("nan")])) == [
        False, True, True]  # fmt: skip


def _nan_loss_once(trainer: Trainer) -> None:
    """Make the method's next loss NaN on this rank only (a NaN input would not stay local: the
    global BatchNorm and the all-gathered features carry it to every rank's loss)."""
    method, loss = trainer.method, trainer.method.loss

    def nan_loss(*args: Any, **kwargs: Any) -> StepLoss:
        del method.loss  # the instance attribute: back to the class's method
        out = loss(*args, **kwargs)
        return StepLoss(out.total * float("nan"), out.terms)

    method.loss = nan_loss


def _rank_worker(rank: int, world: int, port: int, out: str, stage: int) -> None:
    """Step 1 good; step 2 NaN loss on rank 1 only; step 3 Inf gradient on rank 0 only; step 4
    good."""
    set_rank_env(rank, world, port)
    trainer = Trainer(tiny_config(out, **{"train.zero_stage": stage}), init_distributed())
    cfg, finite = trainer.cfg, []
    for i in range(4):
        batch = rank_slice(fake_batch(cfg, cfg.train.global_batch_size, seed=i), rank, world)
        if i == 1 and rank == 1:
            _nan_loss_once(trainer)
        hook = _inf_grad_hook(trainer) if i == 2 and rank == 0 else None
        finite.append(bool(torch.isfinite(trainer.train_step(batch)["loss"])))
        if hook is not None:
            hook.remove()
    weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    ema = torch.cat([p.flatten() for p in trainer.method.teacher.module.parameters()])
    torch.save({"weights": weights, "ema": ema}, Path(out, f"rank{rank}.pt"))
    result = {"step": trainer.step, "skipped": trainer.numerics.skipped, "finite": finite}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1])  # plain optimizer; DeepSpeed's ZeRO optimizer
def test_nan_on_one_rank_only_every_rank_skips_alike(tmp_path, stage):
    mp.spawn(_rank_worker, args=(2, free_port(), str(tmp_path), stage), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["finite"] == [True, True, True, True]  # rank 0 never saw a NaN loss
    assert results[1]["finite"] == [True, False, True, True]
    for res in results:
        assert res["step"] == 2 and res["skipped"] == 2
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(states[0]["weights"], states[1]["weights"])
    assert torch.equal(states[0]["ema"], states[1]["ema"])


def test_train_cli_stops_with_exit_code_2_after_max_bad_steps(tmp_path, capsys):
    """An absurd learning rate blows the weights up after one step; every later loss is
    NaN, so train.py saves the last good state and exits 2 with a message."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from test_train_cli import TINY

    import train
    from aclip.data.synthetic import write_synthetic

    write_synthetic(tmp_path / "data", n_train=64, n_eval_cls=0, n_eval_ret=0, image_size=48,
                    samples_per_shard=32, seed=0)  # fmt: skip
    out = tmp_path / "run"
    argv = [*TINY, f"data.train_shards={tmp_path}/data/train/{{00000..00001}}.tar",
            f"train.output_dir={out}", "train.ckpt_every=0", "optim.lr=1e30",
            "optim.warmup_epochs=0", "train.max_bad_steps=3", "train.stop_at_step=20",
            "train.image_log_every=0"]  # fmt: skip
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "error: 3 steps in a row had a non-finite" in err and "step_00000001" in err, err
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000001"


class _HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts host syncs outside DeepSpeed's own ``engine.step``: scalar reads
    (``aten::_local_scalar_dense``: ``.item()``, ``bool()``, ``float()``) and ``Tensor.tolist``
    (which reads without dispatching)."""

    def __init__(self, engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        self.ours, self.deepspeed, self.inside = 0, 0, False
        step, tolist = engine.step, torch.Tensor.tolist

        def counted_step(*args: Any, **kwargs: Any) -> Any:
            self.inside = True
            try:
                return step(*args, **kwargs)
            finally:
                self.inside = False

        def counted_tolist(tensor: torch.Tensor) -> Any:
            self._count()
            return tolist(tensor)

        monkeypatch.setattr(engine, "step", counted_step)
        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)

    def _count(self) -> None:
        if self.inside:
            self.deepspeed += 1
        else:
            self.ours += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        if func is torch.ops.aten._local_scalar_dense.default:
            self._count()
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("stage", [1, 2])
def test_a_step_that_does_not_log_makes_no_host_sync_of_ours(tmp_path, dist_info, monkeypatch,
                                                            stage):  # fmt: skip
    """Where DeepSpeed's optimizer checks the gradients itself (ZeRO 1/2; bf16 and fp16 too) the
    step adds no host sync of its own: a NaN/Inf loss makes NaN gradients, which DeepSpeed's
    all-reduced overflow check skips on every rank; the loss is looked at only then."""
    trainer = Trainer(tiny_config(str(tmp_path), **{"train.zero_stage": stage}), dist_info)
    trainer.train_step(fake_batch(trainer.cfg, 8, seed=0))
    syncs = _HostSyncs(trainer.engine, monkeypatch)
    with syncs:
        trainer.train_step(fake_batch(trainer.cfg, 8, seed=1))
    assert trainer.step == 2
    assert syncs.ours == 0, syncs.ours
    assert syncs.deepspeed > 0  # DeepSpeed's own overflow and norm checks (counted apart)
