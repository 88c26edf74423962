"""Supervised ceiling: can a config's vision tower learn a set's labels in a training budget?

    python -m evals.supervised_ceiling --config configs/demo.yaml [override ...]
        --train TRAIN_SET --test TEST_SET [--steps 564] [--batch-size 64] [--lr 2e-3]
        [--seed 0] [--eval-every 94] [--json out.json] [--no-progress]

Builds the vision tower of the config's ``model`` section (randomly initialised, as a training
run starts), adds a linear head and trains both with cross-entropy on the labels of the wds
classification set ``--train`` (CLIP_benchmark layout; e.g. ``aclip.data.synthetic
--n-eval-cls 6000 --seed 1`` for one-object scenes labelled by shape), reporting top-1 on
``--test``. If the tower cannot learn the labels under supervision in the budget, no
contrastive recipe of that budget will (docs/recipe_study.md). Prints JSON: ``top1``, the
``curve`` of [step, top1], the set sizes and the chance rate; exit 2 with ``error: …`` on bad
input.
"""

from __future__ import annotations

import argparse
import sys

from aclip.studies.supervised_ceiling import run
from evals.common import report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (exit 2 with ``error: …`` on bad input)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="a training config (its model section)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.patch_stem=conv")
    p.add_argument("--train", required=True, help="wds classification set to train on")
    p.add_argument("--test", required=True, help="wds classification set to test on")
    p.add_argument("--steps", type=int, default=564)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="test every N steps (0: at the end)")
    p.add_argument("--json", help="also write the report here")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    args = (a.config, a.overrides, a.train, a.test, a.steps, a.batch_size, a.lr, a.seed)
    return report(lambda: run(*args, a.eval_every, not a.no_progress), a.json)


if __name__ == "__main__":
    sys.exit(main())
