"""Losses (aclip/methods/losses.py): against open_clip, direct formulas, a 2-process gloo run."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from aclip.methods.losses import (
    LossOutput,
    aclip_loss,
    byol_loss,
    clip_infonce,
    gather_with_grad,
    nt_xent,
)


def _features(n, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype)


def _nt_xent_reference(z1, z2, tau=0.1):
    """Standard SimCLR NT-Xent written out: 2N x 2N cosine similarities, diagonal masked."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n2 = z.shape[0]
    n = n2 // 2
    sim = z @ z.t() / tau
    losses = []
    for i in range(n2):
        pos = (i + n) % n2
        others = [j for j in range(n2) if j != i]
        denom = torch.logsumexp(sim[i, others], dim=0)
        losses.append(denom - sim[i, pos])
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------- single process


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 4)
    out, offset = gather_with_grad(x)
    assert out is x and offset == 0


def test_clip_infonce_matches_open_clip_value_and_grad():
    img_raw = _features(16, 32, 0).requires_grad_()
    txt_raw = _features(16, 32, 1).requires_grad_()
    scale = torch.tensor([1 / 0.07])
    loss = clip_infonce(F.normalize(img_raw, dim=1), F.normalize(txt_raw, dim=1), scale)
    g_img, g_txt = torch.autograd.grad(loss, [img_raw, txt_raw])

    img_ref = img_raw.detach().clone().requires_grad_()
    txt_ref = txt_raw.detach().clone().requires_grad_()
    ref = ClipLoss()(F.normalize(img_ref, dim=1), F.normalize(txt_ref, dim=1), scale)
    r_img, r_txt = torch.autograd.grad(ref, [img_ref, txt_ref])

    assert loss.item() > 0.5  # not a degenerate value
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_img, r_img, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_txt, r_txt, atol=1e-6, rtol=0)


def test_clip_infonce_logit_scale_gets_gradient():
    scale = torch.tensor([14.0], requires_grad=True)
    img = F.normalize(_features(8, 16, 2), dim=1)
    txt = F.normalize(_features(8, 16, 3), dim=1)
    clip_infonce(img, txt, scale).backward()
    ref_scale = scale.detach().clone().requires_grad_()
    ClipLoss()(img, txt, ref_scale).backward()
    torch.testing.assert_close(scale.grad, ref_scale.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_matches_reference_formula(tau):
    z1 = _features(12, 24, 4).requires_grad_()
    z2 = _features(12, 24, 5).requires_grad_()
    loss = nt_xent(z1, z2, temperature=tau)
    ref = _nt_xent_reference(z1, z2, tau)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=0)
    g = torch.autograd.grad(loss, [z1, z2])
    r = torch.autograd.grad(ref, [z1, z2])
    for a, b in zip(g, r, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_nt_xent_identical_views_is_low_and_not_zero_grad():
    # Sanity of the positive pairing: aligned views give a much lower loss than unrelated ones.
    z = _features(16, 64, 6)
    aligned = nt_xent(z, z + 0.01 * _features(16, 64, 7))
    unrelated = nt_xent(z, _features(16, 64, 8))
    assert aligned < 0.1 * unrelated


def test_byol_loss_formula_and_stop_gradient():
    pred = _features(10, 8, 9).requires_grad_()
    target = _features(10, 8, 10).requires_grad_()
    loss = byol_loss(pred, target)
    cos = (pred / pred.norm(dim=1, keepdim=True) * (target / target.norm(dim=1, keepdim=True))).sum(
        1
    )
    ref = (2 - 2 * cos).mean()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=0)
    loss.backward()
    assert target.grad is None
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert byol_loss(pred, 3.0 * pred).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(pred, -pred).item() == pytest.approx(4.0, abs=1e-6)


def test_aclip_loss_weighting():
    scale = torch.tensor([10.0])
    v1, v2, txt = (F.normalize(_features(8, 16, s), dim=1) for s in (11, 12, 13))
    z1, z2 = _features(8, 32, 14), _features(8, 32, 15)
    p1, p2, tgt = _features(8, 32, 16), _features(8, 32, 17), _features(8, 32, 18)
    out = aclip_loss([v1, v2], txt, scale, [z1, z2], [p1, p2], tgt, w_simclr=1.5, w_byol=2.0)
    assert isinstance(out, LossOutput)
    clip = (clip_infonce(v1, txt, scale) + clip_infonce(v2, txt, scale)) / 2
    simclr = nt_xent(z1, z2, 0.1)
    byol = (byol_loss(p1, tgt) + byol_loss(p2, tgt)) / 2
    torch.testing.assert_close(out.clip, clip, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.simclr, simclr, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.byol, byol, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.total, clip + 1.5 * simclr + 2.0 * byol, atol=1e-6, rtol=0)
    assert out.simclr > 0 and out.byol > 0


def test_aclip_loss_disabled_terms_and_single_view():
    scale = torch.tensor([10.0])
    v1, txt = F.normalize(_features(8, 16, 19), dim=1), F.normalize(_features(8, 16, 20), dim=1)
    out = aclip_loss([v1], txt, scale, [_features(8, 4, 21)], None, None, 1.0, 2.0)
    torch.testing.assert_close(out.total, clip_infonce(v1, txt, scale), atol=1e-6, rtol=0)
    assert out.simclr.item() == 0.0 and out.byol.item() == 0.0
    with pytest.raises(ValueError):
        aclip_loss([v1], txt, scale, None, [v1], None, 1.0, 2.0)


# ----------------------------------------------------------------------------- two processes

WORLD = 2
N_GLOBAL, DIM = 8, 16


def _global_inputs():
    """Fixed global batch (float64 so that 1e-6 tests the algebra, not rounding)."""
    names = ("img", "txt", "z1", "z2", "u")
    data = {k: _features(N_GLOBAL, DIM, 100 + i, torch.float64) for i, k in enumerate(names)}
    data["theta"] = _features(DIM, DIM, 200, torch.float64)
    return data


def _losses(img_raw, txt_raw, z1, z2, u, theta):
    """clip_infonce, nt_xent and a loss through a shared 'parameter' theta (as a model would)."""
    scale = torch.tensor([1 / 0.07], dtype=torch.float64)
    clip = clip_infonce(F.normalize(img_raw, dim=1), F.normalize(txt_raw, dim=1), scale)
    simclr = nt_xent(z1, z2, 0.1)
    param = clip_infonce(F.normalize(u @ theta, dim=1), F.normalize(txt_raw, dim=1), scale)
    return clip, simclr, param


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        data = _global_inputs()
        n = N_GLOBAL // WORLD
        rows = slice(rank * n, (rank + 1) * n)
        local = {k: v[rows].clone().requires_grad_() for k, v in data.items() if k != "theta"}
        theta = data["theta"].clone().requires_grad_()
        gathered, offset = gather_with_grad(local["img"])
        clip, simclr, param = _losses(
            local["img"], local["txt"], local["z1"], local["z2"], local["u"], theta
        )
        (clip + simclr + param).backward()
        theta_grad = theta.grad.clone()
        dist.all_reduce(theta_grad)  # DDP: average parameter gradients over ranks
        theta_grad /= WORLD
        result = {
            "offset": offset,
            "gathered": gathered.detach(),
            "clip": clip.detach(),
            "simclr": simclr.detach(),
            "param": param.detach(),
            "theta_grad": theta_grad,
            **{f"grad_{k}": v.grad for k, v in local.items() if k != "u"},
        }
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still uses it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(tmp_path):
    init_file = tmp_path / "pg_init"
    mp.spawn(_worker, args=(str(init_file), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    data = _global_inputs()
    ref = {k: v.clone().requires_grad_() for k, v in data.items()}
    clip, simclr, param = _losses(
        ref["img"], ref["txt"], ref["z1"], ref["z2"], ref["u"], ref["theta"]
    )
    (clip + simclr + param).backward()

    n = N_GLOBAL // WORLD
    for r in range(WORLD):
        assert res[r]["offset"] == r * n
        torch.testing.assert_close(res[r]["gathered"], data["img"], atol=0, rtol=0)
    for name, value in (("clip", clip), ("simclr", simclr), ("param", param)):
        mean = sum(res[r][name] for r in range(WORLD)) / WORLD
        torch.testing.assert_close(mean, value.detach(), atol=1e-6, rtol=0)
        # Each rank's local loss differs from the global one: the test would catch a missing mean.
        assert not math.isclose(res[0][name].item(), res[1][name].item(), abs_tol=1e-6)
    # Feature gradients: the all_gather backward sums every rank's contribution, so rank r holds
    # d(sum_s L_s)/dx_r = WORLD * dL/dx_r for its own rows.
    for r in range(WORLD):
        rows = slice(r * n, (r + 1) * n)
        for k in ("img", "txt", "z1", "z2"):
            torch.testing.assert_close(
                res[r][f"grad_{k}"], WORLD * ref[k].grad[rows], atol=1e-6, rtol=0
            )
    # Parameter gradient averaged over ranks (as DDP does) is the exact global gradient.
    for r in range(WORLD):
        torch.testing.assert_close(res[r]["theta_grad"], ref["theta"].grad, atol=1e-6, rtol=0)
