"""The feature-suppression probe: logistic regression against an independent Newton solver and
sets whose answer is known, prompt similarity by hand, and the `evals.probe` command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import save_untrained_run

import evals.probe as probe_cli
from aclip.data.synthetic import write_synthetic
from aclip.eval.probe import (
    fit_logistic_regression,
    linear_probe,
    prompt_similarity,
    stratified_split,
)
from evals.zeroshot import zeroshot


def _newton_reference(x: np.ndarray, y: np.ndarray, k: int, C: float) -> np.ndarray:
    """Minimise C * sum CE + ||W||^2 / 2 (intercept unpenalised) by Newton's method on the
    full Hessian; returns the class probabilities at the optimum (unique even though the
    intercept is only defined up to a constant)."""
    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))])  # last column: intercept
    theta = np.zeros((d + 1) * k)
    onehot = np.eye(k)[y]
    reg = np.kron(np.eye(k), np.diag([1.0] * d + [0.0]))  # class-major blocks, no intercept

    def probs(t):
        z = xb @ t.reshape(k, d + 1).T
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(1, keepdims=True)

    for _ in range(50):
        p = probs(theta)
        grad = C * ((p - onehot).T @ xb).reshape(-1) + reg @ theta
        hess = reg.copy()
        for i in range(n):
            s = np.diag(p[i]) - np.outer(p[i], p[i])
            hess += C * np.kron(s, np.outer(xb[i], xb[i]))
        step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        theta -= step
        if np.abs(step).max() < 1e-12:
            break
    return probs(theta)


def test_logistic_regression_matches_newton_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=gen, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(60, generator=gen, dtype=torch.float64) > 0).long()
    y[x[:, 1] > 0.8] = 2  # a third class, overlapping the others
    for C in (0.1, 1.0):
        w, b = fit_logistic_regression(x, y, 3, C=C)
        ours = torch.softmax(x @ w + b, dim=1).numpy()
        ref = _newton_reference(x.numpy(), y.numpy(), 3, C)
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_probe_separable_set_is_perfect():
    gen = torch.Generator().manual_seed(1)
    centres = torch.tensor([[6.0, 0, 0, 0], [0, 6.0, 0, 0], [0, 0, 6.0, 0]])
    y = torch.arange(3).repeat_interleave(40)
    x = centres[y] + torch.randn(120, 4, generator=gen)
    out = linear_probe(x, y, 3, test_fraction=0.5, seed=0)
    assert out["top1"] == 1.0 and out["train_top1"] == 1.0
    assert out["n_train"] == out["n_test"] == 60


def test_probe_overlapping_classes_reach_the_bayes_rate():
    # two unit Gaussians at -mu, +mu on one axis, plus noise dimensions: Bayes accuracy Phi(mu)
    mu, n = 0.5, 4000
    gen = torch.Generator().manual_seed(2)
    y = torch.arange(2).repeat(n // 2)
    x = torch.randn(n, 5, generator=gen)
    x[:, 0] += mu * (2 * y - 1)
    bayes = 0.5 * (1 + math.erf(mu / math.sqrt(2)))  # 0.691
    out = linear_probe(x, y, 2, test_fraction=0.5, seed=0)
    assert out["top1"] == pytest.approx(bayes, abs=0.025)
    # labels independent of the features: chance
    shuffled = y[torch.randperm(n, generator=gen)]
    assert linear_probe(x, shuffled, 2)["top1"] == pytest.approx(0.5, abs=0.035)


def test_stratified_split_is_seeded_disjoint_and_per_class():
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 3)
    train, test = stratified_split(labels, 0.5, seed=3)
    assert set(train.tolist()).isdisjoint(test.tolist())
    assert sorted(train.tolist() + test.tolist()) == list(range(17))
    assert [int((labels[test] == c).sum()) for c in range(3)] == [5, 2, 2]
    again = stratified_split(labels, 0.5, seed=3)
    assert torch.equal(train, again[0]) and torch.equal(test, again[1])
    assert not torch.equal(test, stratified_split(labels, 0.5, seed=4)[1])
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(labels, 1.0)


def test_prompt_similarity_by_hand():
    # class names x templates -> known unit vectors; the tokenizer passes the prompt's index
    names, templates = ["a", "b", "c"], ["x {c}", "y {c}"]
    vecs = {
        "x a": [1.0, 0.0], "y a": [1.0, 0.0],
        "x b": [0.0, 1.0], "y b": [1.0, 0.0],
        "x c": [-1.0, 0.0], "y c": [0.0, 1.0],
    }  # fmt: skip
    prompts = list(vecs)
    table = torch.tensor([vecs[p] for p in prompts])

    def tokenizer(texts):
        return torch.tensor([prompts.index(t) for t in texts])

    out = prompt_similarity(lambda idx: table[idx], tokenizer, names, templates)
    # template x: pairs (a,b) 0, (a,c) -1, (b,c) 0 -> -1/3; template y: 1, 0, 0 -> 1/3
    assert out["prompt_cosine_mean"] == pytest.approx(0.0, abs=1e-6)
    # class vectors: a (1,0); b (1,1)/sqrt2; c (-1,1)/sqrt2 -> cos ab .707, ac -.707, bc 0
    assert out["classifier_cosine_mean"] == pytest.approx(0.0, abs=1e-6)
    assert out["classifier_cosine_max"] == pytest.approx(math.sqrt(0.5), abs=1e-6)


@pytest.fixture(scope="module")
def run_and_set(tmp_path_factory):
    """A tiny untrained checkpoint as the trainer saves it, and a 40-image wds shape set."""
    run = tmp_path_factory.mktemp("run")
    save_untrained_run(run)
    data = tmp_path_factory.mktemp("data")
    write_synthetic(data, n_train=0, n_eval_cls=40, n_eval_ret=0, image_size=32)
    return run, data / "eval_cls"


def test_cli_end_to_end(run_and_set, tmp_path, capsys):
    run, data = run_and_set
    out = tmp_path / "probe.json"
    argv = ["--checkpoint", str(run), "--data", str(data), "--no-progress", "--json", str(out)]
    assert probe_cli.main([*argv, "--batch-size", "16"]) == 0
    report = json.loads(out.read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert report["n"] == 40 and report["num_classes"] == 10 and report["chance"] == 0.1
    assert report["linear_probe"]["n_train"] + report["linear_probe"]["n_test"] == 40
    assert 0.0 <= report["linear_probe"]["top1"] <= 1.0
    assert -1.0 <= report["text"]["prompt_cosine_mean"] <= 1.0
    reference = zeroshot(str(run), str(data), progress=False)
    assert report["zeroshot_top1"] == pytest.approx(reference["top1"], abs=1e-6)


@pytest.mark.parametrize("case", ["no_checkpoint", "no_data", "no_ema", "bad_fraction"])
def test_cli_bad_input_exits_2(run_and_set, tmp_path, case, capsys):
    run, data = run_and_set
    argv = {
        "no_checkpoint": ["--checkpoint", str(tmp_path / "nowhere"), "--data", str(data)],
        "no_data": ["--checkpoint", str(run), "--data", str(tmp_path / "no_set")],
        "no_ema": ["--checkpoint", str(run), "--data", str(data), "--ema"],
        "bad_fraction": ["--checkpoint", str(run), "--data", str(data), "--test-fraction", "1"],
    }[case]
    assert probe_cli.main([*argv, "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
