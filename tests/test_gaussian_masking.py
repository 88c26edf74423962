"""GLIP's Gaussian masking (``mask.strategy=gaussian``): the exact kept indices equal an
independent numpy implementation of the official formula (scipy's normalised bivariate density,
covariance 0.2 I, score = U(0,1) + pdf - 1, top-k), the centre is kept more often than the
corners, and FLIP and A-CLIP both train with it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import fake_batch, tiny_config

from aclip.methods import get_method
from aclip.methods.aclip import runs_teacher
from aclip.methods.tokens import TokenSelector, gaussian_keep, gaussian_pdf, num_keep
from aclip.train.trainer import Trainer


def _pdf_np(rows: int, cols: int, variance: float = 0.2) -> np.ndarray:
    """scipy.stats.multivariate_normal(mean=0, cov=variance*I).pdf on meshgrid(linspace(-1, 1)),
    written from the general density: exp(-x^T S^-1 x / 2) / (2 pi sqrt(det S))."""
    xs, ys = np.meshgrid(np.linspace(-1, 1, cols), np.linspace(-1, 1, rows))
    pts = np.stack([xs.ravel(), ys.ravel()], axis=1)
    cov = np.array([[variance, 0.0], [0.0, variance]])
    maha = np.einsum("ni,ij,nj->n", pts, np.linalg.inv(cov), pts)
    return np.exp(-0.5 * maha) / (2 * np.pi * np.sqrt(np.linalg.det(cov)))


def _top_k(score: np.ndarray, k: int) -> np.ndarray:
    return np.sort(np.argsort(-score, axis=1, kind="stable")[:, :k], axis=1)


def _reference(seed: int, batch: int, k: int, grid: tuple[int, int], block: int) -> np.ndarray:
    """GLIP's rule from the formula, its own draws from a generator in the same state."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = grid
    score = torch.rand(batch, rows * cols, generator=gen).numpy().astype(np.float64)
    score = score + _pdf_np(rows, cols) - 1.0
    if block == 1:
        return _top_k(score, k)
    br, bc = rows // block, cols // block
    block_score = torch.rand(batch, br * bc, generator=gen).numpy().astype(np.float64)
    block_score = block_score + _pdf_np(br, bc) - 1.0
    top_blocks = np.argsort(-block_score, axis=1, kind="stable")[:, : math.ceil(k / block**2)]
    out = []
    for b_row, blocks in zip(score, top_blocks, strict=True):
        cand = [(m // bc * block + i) * cols + m % bc * block + j
                for m in blocks for i in range(block) for j in range(block)]  # fmt: skip
        best = sorted(cand, key=lambda p: -b_row[p])[:k]
        out.append(sorted(best))
    return np.array(out)


def test_pdf_is_glips_normalised_density():
    pdf = gaussian_pdf((7, 5)).numpy()
    np.testing.assert_allclose(pdf, _pdf_np(7, 5), rtol=1e-12)
    assert gaussian_pdf((7, 7))[24].item() == pytest.approx(1 / (2 * math.pi * 0.2))


@pytest.mark.parametrize(
    ("grid", "ratio", "block"),
    [((7, 7), 0.5, 1), ((8, 8), 0.25, 1), ((4, 6), 0.5, 1), ((8, 8), 0.5, 2), ((6, 4), 0.3, 2)],
)
@pytest.mark.parametrize("seed", [0, 7])
def test_kept_indices_equal_the_formula(grid, ratio, block, seed):
    k = num_keep(grid[0] * grid[1], ratio)
    expected = _reference(seed, 16, k, grid, block)
    ours = gaussian_keep(16, k, grid, block, torch.Generator().manual_seed(seed))
    assert ours.dtype == torch.long and ours.shape == (16, k)
    np.testing.assert_array_equal(ours.numpy(), expected)
    selector = TokenSelector("gaussian", ratio, grid, block)
    picked = selector.select(None, 16, torch.Generator().manual_seed(seed), "cpu")
    assert torch.equal(picked, ours)


def test_blocks_keep_whole_blocks_when_k_fills_them():
    keep = gaussian_keep(32, 16, (8, 8), 2, torch.Generator().manual_seed(3))
    for row in keep.tolist():
        tops = {(p // 8 // 2, p % 8 // 2) for p in row}
        assert len(tops) == 4  # 16 patches = 4 whole 2x2 blocks


def test_centre_is_kept_more_often_than_the_corners():
    gen = torch.Generator().manual_seed(0)
    kept = torch.zeros(64)
    keep = gaussian_keep(4000, 32, (8, 8), 1, gen)
    kept.index_add_(0, keep.flatten(), torch.ones(keep.numel()))
    freq = (kept / 4000).reshape(8, 8)
    centre, corners = freq[3:5, 3:5], freq[[0, 0, 7, 7], [0, 7, 0, 7]]
    # uniform (FLIP) would keep every patch half of the time (+-0.025 at 3 sigma)
    assert centre.min() > 0.95 and corners.max() < 0.4
    assert freq.sum().item() == pytest.approx(32)


def test_keep_ratio_one_keeps_all_and_bad_grids_are_refused():
    assert TokenSelector("gaussian", 1.0, (4, 4)).select(None, 3) is None
    full = gaussian_keep(2, 16, (4, 4), 1, torch.Generator().manual_seed(0))
    assert full.tolist() == [list(range(16))] * 2
    with pytest.raises(ValueError, match="block_size=3"):
        TokenSelector("gaussian", 0.5, (4, 4), block_size=3)


ABLATION = {"mask.num_views": 1, "loss.w_simclr": 0, "loss.w_byol": 0}


def _steps(cfg, dist_info, steps: int = 2) -> tuple[list[float], Trainer]:
    trainer = Trainer(cfg, dist_info)
    losses = [trainer.train_step(fake_batch(cfg, 8, seed=60 + i))["loss"].item()
              for i in range(steps)]  # fmt: skip
    return losses, trainer


def test_aclip_trains_with_gaussian_and_needs_no_teacher_for_it(tmp_path, dist_info):
    cfg = tiny_config(str(tmp_path / "a"), **{"mask.strategy": "gaussian"})
    losses, trainer = _steps(cfg, dist_info)
    assert all(math.isfinite(x) for x in losses)
    assert trainer.method.selector.strategy == "gaussian"
    assert trainer.method.scalars(0)["train/kept_fraction"] == 0.5
    no_byol = tiny_config(str(tmp_path / "b"), **{"mask.strategy": "gaussian", **ABLATION})
    assert not runs_teacher(no_byol, 16) and runs_teacher(tiny_config(str(tmp_path / "c")), 16)


def test_flip_runs_gaussian_equal_to_the_aclip_ablation(tmp_path, dist_info):
    gaussian = {"mask.strategy": "gaussian", **ABLATION}  # fake_batch: one view per sample
    flip = tiny_config(str(tmp_path / "f"), **{"method": "flip", **gaussian})
    ablation = tiny_config(str(tmp_path / "a"), **gaussian)
    losses, trainer = _steps(flip, dist_info)
    ref_losses, ref = _steps(ablation, dist_info)
    assert trainer.method.selector.strategy == "gaussian" and losses == ref_losses
    assert ref.method.teacher is None


@pytest.mark.parametrize(
    ("strategy", "runs"),
    [("attentive", "random"), ("none", "random"), ("random", "random"), ("gaussian", "gaussian")],
)
def test_flip_uses_mask_strategy_only_when_it_can(strategy, runs, tmp_path):
    cfg = tiny_config(str(tmp_path), **{"method": "flip", "mask.strategy": strategy})
    flip, clip = get_method("flip"), get_method("clip")
    assert flip.token_strategy(cfg) == runs and clip.token_strategy(cfg) == "none"
    assert flip.cost(cfg, 16).kept == num_keep(16, cfg.mask.keep_ratio) == 8
    assert clip.cost(cfg, 16).kept is None
