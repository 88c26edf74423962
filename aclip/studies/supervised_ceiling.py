"""Supervised ceiling: can a config's vision tower learn a set's labels in a training budget?

:func:`run` builds the vision tower of the config's ``model`` section (randomly initialised, as a
training run starts), adds a linear head and trains both with cross-entropy on the labels of a
wds classification set (``aclip.eval.probe.supervised_ceiling``), reporting top-1 on another.
If the tower cannot learn the labels under supervision in the budget, no contrastive recipe of
that budget will (docs/recipe_study.md). ``python -m evals.supervised_ceiling`` is its command
line.
"""

from __future__ import annotations

import torch

from aclip.config import load_config
from aclip.data.sets.wds import load_wds_classification
from aclip.data.views import eval_transform
from aclip.eval.probe import supervised_ceiling
from aclip.model import build_vision


def _load(root: str, image_size: int) -> tuple[tuple[torch.Tensor, torch.Tensor], list[str]]:
    dataset, classnames, _ = load_wds_classification(root, eval_transform(image_size))
    pairs = list(dataset)
    if not pairs:
        raise ValueError(f"{root} holds no samples")
    images, labels = zip(*pairs, strict=True)
    return (torch.stack(images), torch.as_tensor(labels)), classnames


def run(config: str, overrides: list[str], train: str, test: str, steps: int, batch_size: int,
        lr: float, seed: int, eval_every: int, progress: bool) -> dict:  # fmt: skip
    """The ceiling of ``config``'s vision tower on ``train`` / ``test`` (see the module doc)."""
    cfg = load_config(config, overrides)
    m = cfg.model
    train_xy, names = _load(train, m.image_size)
    test_xy, test_names = _load(test, m.image_size)
    if names != test_names:
        raise ValueError(f"{train} and {test} have different class names")
    torch.manual_seed(seed)
    tower = build_vision(m)
    result = supervised_ceiling(tower, tower.width, train_xy, test_xy, len(names), steps,
                                batch_size, lr, seed=seed, eval_every=eval_every,
                                progress=progress)  # fmt: skip
    return result | {"n_train": len(train_xy[1]), "n_test": len(test_xy[1]),
                     "chance": 1.0 / len(names), "steps": steps}  # fmt: skip
