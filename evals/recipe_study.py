"""Recipe study: which training settings make a model learn a hard attribute (shape) and not
only the easy one (colour), within a CPU budget.

    python -m evals.recipe_study run --variants configs/recipe_study.yaml --out runs/recipe \
        [--config configs/demo.yaml] [--only NAME ...] [--threads 1] [--eval-every 50] \
        [--probe-set demo_out/data/eval_cls] [section.key=value ...]
    python -m evals.recipe_study report --variants configs/recipe_study.yaml --out runs/recipe \
        [--docs docs/recipe_study] [--plot NAME ...]

The variants file maps a name to ``{overrides: [section.key=value ...], seeds: [0, 1], note:
"..."}``; ``base: OTHER`` starts a variant from OTHER's overrides (see
configs/recipe_study.yaml). ``run`` trains every variant × seed with ``train.py`` (one process
per run, in turn, ``OMP_NUM_THREADS=--threads``), evaluating the config's zero-shot sets every
``--eval-every`` steps (tensorboard ``eval/zeroshot/<set>/top1``); it times each run (wall and
CPU seconds of the process and its loader workers) and, with ``--probe-set``, runs the linear
probe of ``evals.probe`` on its final checkpoint. Finished runs are skipped when the study is
run again (an unfinished one is started afresh).

``report`` reads every finished run and writes ``results.md`` (one row per run: steps, samples,
times, final shape and colour top-1, probe), ``results.csv``, ``curves.csv`` and the learning
curves (zero-shot top-1 of each set against samples seen and against training-loop time)
as ``curves.png`` into ``--out`` (and ``--docs``, if given, as ``<docs>.md`` / ``<docs>_*.png``).
The training-loop time of a curve point is summed from the run's logged samples/s, so it leaves
out the periodic evaluations; it is the time of the ``--threads`` the run had.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aclip.studies.recipe import load_variants, run_variants, select
from aclip.studies.recipe_report import write_report


def run_command(args: argparse.Namespace) -> int:
    """Train every selected variant × seed (finished runs are kept)."""
    variants = select(load_variants(args.variants), args.only)
    run_variants(
        args.config, variants, Path(args.out), args.overrides, args.threads, args.eval_every,
        args.probe_set,
    )  # fmt: skip
    return report_command(args)


def report_command(args: argparse.Namespace) -> int:
    """Table, CSVs and curves of the finished runs."""
    variants = select(load_variants(args.variants), args.only)
    out = Path(args.out)
    text = write_report(variants, out, args.label, args.sets, args.title, args.plot, args.docs)
    print(text)
    print(f"wrote {out / 'results.md'}, results.csv, curves.csv, curves.png")
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variants", required=True, help="YAML file of named override sets")
    p.add_argument("--out", required=True, help="study directory (one sub-directory per run)")
    p.add_argument("--only", nargs="+", help="these variants only")
    p.add_argument("--sets", nargs="+", help="zero-shot sets (folder names) to report")
    p.add_argument("--label", nargs="+", default=[], help="SET=LABEL, e.g. eval_cls=shape")
    p.add_argument("--plot", nargs="+", help="variants to draw (default: all reported)")
    p.add_argument("--docs", help="also copy curves.png / results.csv to DOCS_curves.png / .csv")
    p.add_argument("--title", default="Recipe study: zero-shot top-1")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (exit 2 with ``error: …`` on a bad file, name or failed run)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the variants, then report")
    _add_common(run)
    run.add_argument("--config", default="configs/demo.yaml")
    run.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    run.add_argument("--eval-every", type=int, default=50, help="eval.every_steps of each run")
    run.add_argument("--probe-set", help="wds set for the linear probe of each final checkpoint")
    run.add_argument("overrides", nargs="*", help="section.key=value for every run")
    rep = sub.add_parser("report", help="table and curves of the finished runs")
    _add_common(rep)
    args = parser.parse_args(argv)
    try:
        return run_command(args) if args.command == "run" else report_command(args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
