"""Diagnostics of what a CLIP model learned: linear probe and class-prompt similarity.

Feature suppression (an easy attribute solves most of the contrastive task and a harder one is
never learned) shows in two numbers: a linear probe on the image embeddings that cannot recover
the hard attribute, and text embeddings of prompts that differ only in that attribute lying
close together. :func:`linear_probe` fits a fixed-recipe multinomial logistic regression on a
seeded, stratified train/test split; :func:`prompt_similarity` measures the text side.

The probe's objective is scikit-learn's ``LogisticRegression(C=C)`` (multinomial, L2 on the
weights, none on the intercept) on features standardised with the training split's mean and
standard deviation:  ``C * sum_i CE(W x_i + b, y_i) + ||W||^2 / 2``, minimised with L-BFGS in
float64 (strong-Wolfe line search) until the gradient is below ``tol``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from aclip.eval.evaluate import Template, _format
from aclip.model.clip import CLIP

FEATURES = ("joint", "pooled")  # what the probe fits: joint-space or pooled embeddings


def stratified_split(
    labels_N: torch.Tensor, test_fraction: float = 0.5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, test) with ``test_fraction`` of every class in the test part, drawn with
    a CPU generator seeded by ``seed`` (round half up per class; each part keeps >= 1 sample of
    a class with >= 2 samples)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for cls in torch.unique(labels_N).tolist():
        idx = torch.nonzero(labels_N == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = int(len(idx) * test_fraction + 0.5)
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def fit_logistic_regression(
    x_ND: torch.Tensor,
    y_N: torch.Tensor,
    num_classes: int,
    C: float = 1.0,
    max_iter: int = 500,
    tol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [D, C] and intercept [C] minimising ``C * sum CE + ||W||^2 / 2`` (float64).

    ``x_ND`` is used as given (standardise it first); the intercept is not penalised.
    """
    if C <= 0:
        raise ValueError(f"C must be > 0, got {C}")
    x_ND, y_N = x_ND.double(), y_N.long()
    w_DC = torch.zeros(x_ND.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b_C = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w_DC, b_C],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        ce = F.cross_entropy(x_ND @ w_DC + b_C, y_N, reduction="sum")
        loss = C * ce + 0.5 * (w_DC * w_DC).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w_DC.detach(), b_C.detach()


def linear_probe(
    features_ND: torch.Tensor,
    labels_N: torch.Tensor,
    num_classes: int,
    test_fraction: float = 0.5,
    seed: int = 0,
    C: float = 1.0,
) -> dict[str, float]:
    """Accuracy of a logistic-regression probe trained on a seeded stratified split.

    Features are standardised with the training part's statistics. Returns ``top1`` (test),
    ``train_top1``, ``n_train``, ``n_test``, ``C`` and ``seed``.
    """
    if len(features_ND) != len(labels_N):
        raise ValueError(f"{len(features_ND)} feature rows but {len(labels_N)} labels")
    train, test = stratified_split(labels_N, test_fraction, seed)
    if len(train) == 0 or len(test) == 0:
        raise ValueError("the probe needs samples in both the train and the test part")
    x = features_ND.double()
    mean_D = x[train].mean(0)
    std_D = x[train].std(0, unbiased=False).clamp_min(1e-12)
    z = (x - mean_D) / std_D
    w_DC, b_C = fit_logistic_regression(z[train], labels_N[train], num_classes, C)

    def accuracy(idx: torch.Tensor) -> float:
        pred = (z[idx] @ w_DC + b_C).argmax(1)
        return (pred == labels_N[idx]).double().mean().item()

    return {
        "top1": accuracy(test),
        "train_top1": accuracy(train),
        "n_train": len(train),
        "n_test": len(test),
        "C": C,
        "seed": seed,
    }


def _mean_off_diagonal(sim_CC: torch.Tensor) -> tuple[float, float]:
    """Mean and max of a square similarity matrix off its diagonal."""
    n = sim_CC.shape[0]
    off = sim_CC[~torch.eye(n, dtype=torch.bool, device=sim_CC.device)]
    return off.mean().item(), off.max().item()


@torch.no_grad()
def prompt_similarity(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """How close the text tower puts prompts of different classes (cosine similarity).

    ``prompt_cosine_mean``: over every template, the mean cosine between the prompts of two
    different classes made from that template (prompts that differ only in the class name),
    averaged over templates. ``classifier_cosine_mean`` / ``_max``: between the zero-shot
    classifier's class vectors (per class, normalised template embeddings averaged and
    normalised again, as open_clip builds them).
    """
    if len(classnames) < 2 or not templates:
        raise ValueError("prompt similarity needs at least two class names and one template")
    prompts = [_format(t, name) for name in classnames for t in templates]
    emb = F.normalize(encode_text(tokenizer(prompts).to(device)).float(), dim=-1)
    emb_CTD = emb.reshape(len(classnames), len(templates), -1)
    per_template = [_mean_off_diagonal(e @ e.T)[0] for e in emb_CTD.unbind(1)]
    weights_CD = F.normalize(emb_CTD.mean(1), dim=-1)
    cls_mean, cls_max = _mean_off_diagonal(weights_CD @ weights_CD.T)
    return {
        "prompt_cosine_mean": sum(per_template) / len(per_template),
        "classifier_cosine_mean": cls_mean,
        "classifier_cosine_max": cls_max,
    }


def supervised_ceiling(
    tower: torch.nn.Module,
    width: int,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 0.1,
    seed: int = 0,
    eval_every: int = 0,
    progress: bool = False,
) -> dict:
    """Train ``tower`` (images [B, 3, H, W] -> pooled [B, width]) and a linear head with
    cross-entropy on the labels of ``train`` for ``steps`` steps; top-1 on ``test`` along the way.

    The question it answers: can this vision tower learn the attribute the labels name within
    this budget at all? (If supervised training cannot, no contrastive recipe of the same
    budget will.) AdamW, one-cycle learning rate (10 % warm-up, cosine), batches drawn with
    replacement by a generator seeded with ``seed``, random horizontal flips. Returns
    ``{"top1": final, "curve": [[step, top1], ...]}``.
    """
    from tqdm import tqdm

    x_train, y_train = train
    if len(x_train) != len(y_train) or len(x_train) == 0 or steps < 1:
        raise ValueError("need a non-empty training set with one label per image and steps >= 1")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = torch.nn.Linear(width, num_classes)
    model = torch.nn.Sequential(tower, head).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    curve: list[list[float]] = []
    for step in tqdm(range(1, steps + 1), desc="supervised", disable=not progress):
        idx_B = torch.randint(0, len(x_train), (batch_size,), generator=gen)
        flip_B = torch.rand(batch_size, generator=gen) < 0.5
        x_B3HW = x_train[idx_B]
        x_B3HW = torch.where(flip_B[:, None, None, None], x_B3HW.flip(-1), x_B3HW)
        loss = F.cross_entropy(model(x_B3HW), y_train[idx_B])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step == steps or (eval_every and step % eval_every == 0):
            curve.append([step, _top1(model, *test, batch_size=256)])
    return {"top1": curve[-1][1], "curve": curve}


@torch.no_grad()
def _top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    model.eval()
    pred = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    model.train()
    return (pred == y).float().mean().item()


@torch.no_grad()
def encode_images(
    clip: CLIP, loader: DataLoader, device: torch.device | str, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pooled [N, width], joint L2-normalised [N, embed_dim], labels [N]) on the CPU."""
    pooled, joint, labels = [], [], []
    for images, y in tqdm(loader, desc="images", disable=not progress):
        p = clip.visual(images.to(device))
        pooled.append(p.float().cpu())
        joint.append(clip.project_image(p, normalize=True).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(pooled), torch.cat(joint), torch.cat(labels)
