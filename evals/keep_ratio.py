"""Token-keep-ratio studies.

``study``: train a grid of masking configs and compare their zero-shot accuracy.

    python -m evals.keep_ratio study --config configs/demo.yaml --out runs/study \
        --strategies random attentive --keep-ratios 0.25 0.5 --seeds 0 1 \
        [--teacher-sizes 0 112] [override ...]

Each grid point is one ``train.py`` run (its own process, same base config and overrides, same
number of steps; with ``--equal-cost`` the same training FLOPs instead, so a run that keeps
fewer tokens takes more steps; with ``--equal-time``, after the equal-steps study in the same
``--out``, the same measured training wall time) evaluated on the config's
``eval.zeroshot_sets``; the table gives each row's steps and measured training wall time.
``--teacher-sizes`` adds the teacher-resolution axis (``ema.image_size``; 0: the model's
size): each row of the table gives the analytic model FLOPs per training sample beside the
accuracy, and the plot shows accuracy against that cost.

``checkpoint``: one model, evaluated while keeping only part of the patch tokens.

    python -m evals.keep_ratio checkpoint --checkpoint runs/demo --data data/eval_cls \
        --keep-ratios 1.0 0.75 0.5 0.25 --strategies attentive random --out runs/keep_eval

Zero-shot top-1/top-5 and images/s (image tower, teacher pass included) per strategy and keep
ratio: ``attentive`` keeps the top-k patches by the EMA tower's relevance on the eval image,
``random`` a seeded random subset; keep ratio 1.0 is the all-tokens row ("none").
``--checkpoint`` is an aclip run or any CLIP ``aclip.interop.load_clip`` reads (an open_clip
folder, an open_clip checkpoint with ``--model-name``, an OpenAI file; see ``evals.common``). Such
a model has no EMA teacher: its ``attentive`` relevance comes from the model's own vision tower
(all tokens, on the same image), which the table and the rows say (``relevance_from``).
``--precision`` (fp32 by default; the rule of the trainer's ``eval.precision``) sets the towers'
arithmetic; every row records it.

Both write ``results.md`` (a markdown table), ``results.csv`` and ``results.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from aclip.interop.safe_load import add_trust_argument
from aclip.studies.keep_ratio import checkpoint_sweep
from aclip.studies.keep_ratio_report import write_checkpoint_outputs, write_outputs
from aclip.studies.keep_ratio_runs import run_study
from evals.common import add_precision_arg


def study(args: argparse.Namespace) -> int:
    """Run the grid and write the table, CSV and plot."""
    out = Path(args.out)
    try:
        table = run_study(
            args.config, out, args.strategies, args.keep_ratios, args.views, args.seeds,
            args.teacher_sizes, args.equal_cost, args.equal_time, args.eval_set, args.overrides,
        )  # fmt: skip
    except (FileNotFoundError, ValueError, RuntimeError) as err:  # no train.py; a failed run
        print(f"error: {err}", file=sys.stderr)
        return 1 if isinstance(err, RuntimeError) else 2
    write_outputs(table, out, args.title)
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.png'}")
    return 0


def checkpoint_command(args: argparse.Namespace) -> int:
    """Sweep one checkpoint's eval-time keep ratios and write the table, CSV and plot."""
    out = Path(args.out)
    try:
        table = checkpoint_sweep(
            args.checkpoint, args.data, args.keep_ratios, args.strategies, args.batch_size,
            args.device, args.seed, args.workers, args.model_name, args.precision,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_checkpoint_outputs(table, out, args.title)
    print((out / "results.md").read_text())
    if any(r["relevance_from"] == "own_tower" for r in table):
        print(f"note: {args.checkpoint} is not an aclip run and has no EMA teacher: the attentive "
              "rows keep the patches its own vision tower finds most relevant (CLS attention, "
              "all tokens, same image)")  # fmt: skip
    print(f"wrote {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.png'}")
    return 0


def _add_checkpoint_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="one checkpoint at several eval-time keep ratios")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="aclip run (run dir, checkpoints dir, tag or file), open_clip folder, open_clip "
        "checkpoint (with --model-name) or OpenAI release file",
    )
    p.add_argument("--model-name", help="open_clip model name or config of a weights file")
    p.add_argument("--data", required=True, help="wds zero-shot classification set (root)")
    p.add_argument("--out", required=True)
    p.add_argument("--keep-ratios", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.25])
    p.add_argument(
        "--strategies", nargs="+", default=["attentive", "random"], choices=["random", "attentive"]
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the random selection")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    add_precision_arg(p)
    p.add_argument("--title", default="Zero-shot by eval-time token keep ratio")
    add_trust_argument(p)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("study", help="train a grid of masking configs and compare them")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--strategies",
        nargs="+",
        default=["random", "attentive"],
        choices=["none", "random", "attentive"],
    )
    p.add_argument("--keep-ratios", nargs="+", type=float, default=[0.25, 0.5])
    p.add_argument("--views", nargs="+", type=int, default=[2])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument(
        "--teacher-sizes",
        nargs="+",
        type=int,
        default=[0],
        help="ema.image_size values (teacher resolution in px; 0: the model's size)",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--equal-cost",
        action="store_true",
        help="equal training compute instead of equal steps: each run's steps scaled so that "
        "its model FLOPs (aclip.methods.flops) equal those of the all-token run of the config's "
        "length",
    )
    budget.add_argument(
        "--equal-time",
        action="store_true",
        help="equal training wall time instead of equal steps: each run's steps scaled by the "
        "wall time the equal-steps study (same --out, run first) measured for it and for the "
        "all-token run",
    )
    p.add_argument("--eval-set", help="zero-shot set (folder name) to compare; default: first")
    p.add_argument("--title", default="Zero-shot top-1 by token selection")
    p.add_argument("overrides", nargs="*", help="section.key=value for every run")
    _add_checkpoint_parser(sub)
    args = parser.parse_args(argv)
    return checkpoint_command(args) if args.command == "checkpoint" else study(args)


if __name__ == "__main__":
    sys.exit(main())
