"""Rank discovery and the cross-rank BatchNorm (2 gloo ranks vs 1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from aclip.distributed import GlobalBatchNorm1d, convert_global_bn, discover_ranks


def test_slurm_variables_become_torch_ones():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "MASTER_PORT": "1234"}
    out = discover_ranks(env)
    assert (out["RANK"], out["WORLD_SIZE"], out["LOCAL_RANK"]) == ("5", "8", "1")


def test_torchrun_variables_win_over_slurm():
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "SLURM_PROCID": "0",
        "MASTER_PORT": "1",
    }
    assert discover_ranks(env)["RANK"] == "1"


def test_single_process_gets_a_port_and_multi_rank_needs_one():
    assert int(discover_ranks({})["MASTER_PORT"]) > 0
    with pytest.raises(RuntimeError, match="MASTER_PORT"):
        discover_ranks({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def _data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(8, 5, generator=gen) * 3 + 1, torch.randn(8, 5, generator=gen)


def _bn_worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    x, grad_out = _data()
    n = 8 // world
    bn = convert_global_bn(torch.nn.Sequential(torch.nn.BatchNorm1d(5)))[0]
    x_local = x[rank * n : (rank + 1) * n].clone().requires_grad_(True)
    y = bn(x_local)
    y.backward(grad_out[rank * n : (rank + 1) * n])
    torch.save(
        {
            "y": y.detach(),
            "gx": x_local.grad,
            "gw": bn.weight.grad,
            "rm": bn.running_mean,
            "rv": bn.running_var,
        },
        Path(out, f"r{rank}.pt"),
    )
    dist.barrier()  # no rank tears gloo down while the other still uses it (SIGABRT under load)
    dist.destroy_process_group()


@pytest.mark.slow
def test_global_batchnorm_two_ranks_equal_plain_batchnorm_on_the_whole_batch(tmp_path):
    mp.spawn(_bn_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    parts = [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]
    x, grad_out = _data()
    x = x.clone().requires_grad_(True)
    ref = torch.nn.BatchNorm1d(5)
    y = ref(x)
    y.backward(grad_out)
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([p["gx"] for p in parts]), x.grad, atol=1e-5, rtol=0)
    # DDP averages parameter grads over ranks: the mean of the local ones is the global one / world
    torch.testing.assert_close(parts[0]["gw"] + parts[1]["gw"], ref.weight.grad, atol=1e-5, rtol=0)
    for p in parts:
        torch.testing.assert_close(p["rm"], ref.running_mean, atol=1e-6, rtol=0)
        torch.testing.assert_close(p["rv"], ref.running_var, atol=1e-5, rtol=0)


def test_global_batchnorm_single_process_equals_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(16, 7)
    plain = torch.nn.BatchNorm1d(7)
    ours = GlobalBatchNorm1d(7)
    torch.testing.assert_close(ours(x), plain(x), atol=1e-5, rtol=0)
    ours.eval(), plain.eval()
    torch.testing.assert_close(ours(x), plain(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_global_batchnorm_running_statistics_in_half_precision(dtype):
    """DeepSpeed's bf16/fp16 modes cast whole modules, BatchNorm buffers included: the running
    statistics still update (in fp32, stored in the buffers' dtype) as nn.BatchNorm1d's do."""
    torch.manual_seed(0)
    x = torch.randn(32, 6) * 3 + 1
    ours = GlobalBatchNorm1d(6, momentum=0.1).to(dtype)
    reference = torch.nn.BatchNorm1d(6, momentum=0.1)
    for _ in range(3):
        ours(x.to(dtype))
        reference(x)
    assert ours.running_mean.dtype == dtype
    tol = {torch.bfloat16: 3e-2, torch.float16: 3e-3, torch.float32: 1e-6}[dtype]
    close = {"atol": tol, "rtol": tol}
    torch.testing.assert_close(ours.running_mean.float(), reference.running_mean, **close)
    torch.testing.assert_close(ours.running_var.float(), reference.running_var, **close)
    assert int(ours.num_batches_tracked) == 3


def test_single_process_env_drops_what_rank_discovery_reads():
    from aclip.distributed import RANK_VARIABLES, discover_ranks, single_process_env

    parent = {"RANK": "3", "WORLD_SIZE": "8", "MASTER_PORT": "1234", "SLURM_PROCID": "3",
              "SLURM_NTASKS": "8", "PATH": "/bin", "OMP_NUM_THREADS": "1"}  # fmt: skip
    child = single_process_env(parent)
    assert child == {"PATH": "/bin", "OMP_NUM_THREADS": "1"}
    assert not set(child) & set(RANK_VARIABLES)
    ranks = discover_ranks(dict(child))
    assert (ranks["RANK"], ranks["WORLD_SIZE"]) == ("0", "1") and ranks["MASTER_PORT"] != "1234"
