"""Everything that knows about ranks: discovery, process groups, cross-rank BN, DeepSpeed.

Model code is single-device; the only other distributed code is the loss's feature gather.
Rank discovery accepts srun (SLURM_*), torchrun and the deepspeed launcher (RANK/WORLD_SIZE/
LOCAL_RANK), and a plain ``python train.py`` (one rank on this machine).
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world size, the local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that logs and writes files shared by all."""
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launcher_ranks(env: Mapping[str, str]) -> tuple[int, int, int]:
    """(rank, world size, local rank) as the launcher set them: torchrun and the deepspeed
    launcher set RANK / WORLD_SIZE / LOCAL_RANK; under ``srun`` the SLURM_PROCID / SLURM_NTASKS /
    SLURM_LOCALID variables count (``deepspeed.init_distributed`` reads no SLURM variable); with
    neither, one rank."""
    if "RANK" in env:
        return int(env["RANK"]), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))
    if "SLURM_PROCID" in env:
        return (int(env["SLURM_PROCID"]), int(env.get("SLURM_NTASKS", "1")),
                int(env.get("SLURM_LOCALID", "0")))  # fmt: skip
    return 0, 1, 0


RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                  "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")  # fmt: skip


def single_process_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the variables :func:`discover_ranks` reads, for a child process that is a
    run of its own (a study's training run): it must not join, or collide with, the parent's
    process group (its MASTER_PORT is bound by the parent) or take the parent's SLURM rank."""
    return {key: value for key, value in env.items() if key not in RANK_VARIABLES}


def discover_ranks(env: dict[str, str] | None = None) -> dict[str, str]:
    """Fill RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in ``env`` and return it
    (ranks as :func:`launcher_ranks` reads them; a single rank gets a free local port)."""
    env = os.environ if env is None else env  # type: ignore[assignment]
    if "RANK" not in env:
        rank, world, local = launcher_ranks(env)
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world), str(local)
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        if int(env["WORLD_SIZE"]) > 1:
            raise RuntimeError("MASTER_PORT must be set for a multi-rank run")
        env["MASTER_PORT"] = str(_free_port())
    return env  # type: ignore[return-value]


def _prepare_deepspeed_for_cpu() -> None:
    """Select DeepSpeed's CPU accelerator and skip its JIT-built shm op (minutes to build)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _quiet_collective_deprecations() -> None:
    """torch 2.14 marks the autograd collectives (``torch.distributed.nn.functional``, what the
    loss's gather needs) and DeepSpeed's ``all_gather_into_tensor`` deprecated; the warnings
    would fill every rank's log. They stay the calls to use until their replacements are public."""
    for pattern in (
        r"torch\.distributed\.nn\.functional\.\w+ is deprecated",
        r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
    ):
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)


def init_distributed() -> DistInfo:
    """Discover ranks, pick the device and start the process group (NCCL on GPU, gloo on CPU)."""
    _quiet_collective_deprecations()
    env = discover_ranks()
    local_rank = int(env["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        _prepare_deepspeed_for_cpu()
        device, backend = torch.device("cpu"), "gloo"
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def world_size() -> int:
    """The number of ranks, 1 when no process group is up."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the ranks (a copy; no gradient)."""
    values = values.detach().clone()
    if world_size() > 1:
        dist.all_reduce(values)
        values /= world_size()
    return values


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``values`` over the ranks (a copy)."""
    values = values.detach().clone()
    if world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from ``src`` to every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op on one rank)."""
    if world_size() > 1:
        dist.barrier()


def _sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks with gradients flowing back to every rank's contribution."""
    if world_size() == 1:
        return values
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(values)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the batch of every rank.

    Works on any backend (gloo included, unlike ``nn.SyncBatchNorm``): per-feature sums are
    all-reduced with gradients (two passes: mean, then centred squares, in fp32), so a 2-rank run
    normalises as a 1-rank run over the concatenated batch; one rank takes the same code path.
    Ranks must hold equal batch sizes. Eval mode uses the running statistics.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not self.training:
            return super().forward(x)
        count = x.shape[0] * world_size()
        mean = _sum_over_ranks(x.float().sum(0)) / count
        var = _sum_over_ranks(((x.float() - mean) ** 2).sum(0)) / count
        self._update_running(mean.detach(), var.detach() * count / max(count - 1, 1))
        y = ((x.float() - mean) * torch.rsqrt(var + self.eps)).to(x.dtype)
        return y * self.weight + self.bias if self.affine else y

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var_unbiased: torch.Tensor) -> None:
        if not self.track_running_stats:
            return
        self.num_batches_tracked += 1
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        # in fp32 whatever the buffers' dtype (DeepSpeed's bf16/fp16 modes cast them), then
        # stored back in that dtype: lerp_ refuses mixed dtypes
        for running, batch_stat in ((self.running_mean, mean), (self.running_var, var_unbiased)):
            running.copy_(torch.lerp(running.float(), batch_stat.float(), m))


def convert_global_bn(module: nn.Module) -> nn.Module:
    """Replace each ``nn.BatchNorm1d`` in ``module`` by a :class:`GlobalBatchNorm1d`, same state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            new = GlobalBatchNorm1d(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            )
            new.load_state_dict(child.state_dict())
            setattr(module, name, new.to(next(child.buffers()).device))
        else:
            convert_global_bn(child)
    return module


@torch.no_grad()
def clamp_parameter_(param: nn.Parameter, low: float, high: float) -> None:
    """Clamp ``param`` in place, and its fp32 master copy where DeepSpeed keeps one (ZeRO 1/2,
    the bf16 optimizer: the module's copy is overwritten from the master after each step).

    Each rank clamps the fragment of the master it holds (``_hp_mapping``, the mapping behind
    ``deepspeed.utils.safe_set_full_fp32_param``, read here without its gather): no collective
    and no host sync."""
    param.clamp_(low, high)
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is not None:
        mapping.get_hp_fragment().clamp_(low, high)


def fp32_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of ``module`` in fp32: the optimizer's master copy where DeepSpeed keeps
    one (ZeRO 1/2 with bf16/fp16: the module holds rounded copies; the master is gathered over
    the ranks, so every rank must call this), else the parameter itself (fp32 training, and
    parameters outside the optimizer, e.g. frozen ones)."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = {}
    for name, param in module.named_parameters():
        master = safe_get_full_fp32_param(param) if hasattr(param, "_hp_mapping") else None
        params[name] = (master if master is not None else param.detach()).float()
    return params


def deepspeed_config(
    global_batch: int,
    per_rank_batch: int,
    precision: str,
    zero_stage: int,
    grad_clip: float,
    accum_freq: int = 1,
) -> dict[str, Any]:
    """The DeepSpeed JSON config for one optimizer step per global batch, each rank's part in
    ``accum_freq`` micro-batches (aclip.train.accumulation)."""
    cfg: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": per_rank_batch // accum_freq,
        "gradient_accumulation_steps": accum_freq,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16}
    if grad_clip > 0:
        cfg["gradient_clipping"] = grad_clip
    return cfg


def build_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ds_config: dict[str, Any],
) -> Any:
    """Wrap model, optimizer and per-step LR scheduler in a DeepSpeed engine (on one rank with
    ZeRO 0, without its gradient all-reduce)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if world_size() == 1 and ds_config["zero_optimization"]["stage"] == 0:
        # nobody to reduce with: skip the bucketed all-reduce (flatten, reduce, copy back) that
        # DeepSpeed runs after each backward anyway; the checkpoint layout does not change
        engine.enable_backward_allreduce = False
    return engine
