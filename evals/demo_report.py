"""The demo's closing table: zero-shot on the synthetic eval set, online and EMA weights."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from evals.zeroshot import zeroshot


def main(argv: list[str] | None = None) -> int:
    """Evaluate the demo run and print a results table and where its logs are."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True, help="the demo's run directory")
    parser.add_argument("--data", required=True, help="the synthetic data directory")
    args = parser.parse_args(argv)
    run, eval_cls = Path(args.run), str(Path(args.data) / "eval_cls")
    names = (Path(eval_cls) / "classnames.txt").read_text().splitlines()
    classes = len([n for n in names if n.strip()])
    rows = [("online", zeroshot(str(run), eval_cls, progress=False))]
    rows.append(("EMA image tower", zeroshot(str(run), eval_cls, use_ema=True, progress=False)))
    print(
        f"\nZero-shot classification, synthetic eval set ({classes} classes, "
        f"chance {100 / classes:.1f}%)"
    )
    print(
        f"| weights          | top-1 | top-5 | mean per-class recall |\n|{'-' * 18}|"
        f"{'-' * 7}|{'-' * 7}|{'-' * 23}|"
    )
    for name, m in rows:
        print(
            f"| {name:<16} | {100 * m['top1']:5.1f} | {100 * m['top5']:5.1f} | "
            f"{100 * m['mean_per_class_recall']:21.1f} |"
        )
    (run / "demo_results.json").write_text(json.dumps(dict(rows), indent=2))
    print(f"\nresults: {run / 'demo_results.json'}")
    print(f"tensorboard logs: {run / 'tb'}   (tensorboard --logdir {run / 'tb'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
