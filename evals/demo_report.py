"""The demo's closing table: zero-shot on the synthetic eval sets, online and EMA weights."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aclip.interop.run import has_ema_teacher
from aclip.interop.safe_load import add_trust_argument
from evals.retrieval import retrieval
from evals.zeroshot import zeroshot

SETS = (("eval_cls", "shape"), ("eval_colour", "colour"))


def _classes(root: Path) -> int:
    names = (root / "classnames.txt").read_text().splitlines()
    return len([n for n in names if n.strip()])


def _final_results(run: Path) -> dict:
    """The metrics train.py wrote at the end of the run (online weights), if any; a set whose
    evaluation failed there (``{"error": ...}``) is left out, to be evaluated again here."""
    path = run / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    return {k: v for k, v in results.items() if not (isinstance(v, dict) and "error" in v)}


def main(argv: list[str] | None = None) -> int:
    """Evaluate the demo run and print a results table and where its logs are; exit code 2 with
    ``error: ...`` for a run or data path that cannot be read."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True, help="the demo's run directory")
    parser.add_argument("--data", required=True, help="the synthetic data directory")
    add_trust_argument(parser)
    args = parser.parse_args(argv)
    try:
        return _report(Path(args.run), Path(args.data))
    except (FileNotFoundError, ValueError) as err:  # a checkpoint that is none or could run code
        print(f"error: {err}", file=sys.stderr)
        return 2


def _report(run: Path, data: Path) -> int:
    trained = _final_results(run)
    results: dict[str, dict] = {}
    lines = [
        "| task (classes, chance) | weights | top-1 | top-5 | mean per-class recall |",
        "|---|---|---|---|---|",
    ]
    rows = (("online", False), ("EMA image tower", True))
    if not has_ema_teacher(run):  # a method without a teacher (clip, flip): online weights only
        rows = rows[:1]
    for folder, task in SETS:
        n = _classes(data / folder)
        for weights, ema in rows:
            m = None if ema else trained.get(f"zeroshot/{folder}")
            m = m or zeroshot(str(run), str(data / folder), use_ema=ema, progress=False)
            results[f"{task}/{weights}"] = m
            lines.append(
                f"| {task} ({n}, {100 / n:.1f}%) | {weights} | {100 * m['top1']:.1f} | "
                f"{100 * m['top5']:.1f} | {100 * m['mean_per_class_recall']:.1f} |"
            )
    print("\nZero-shot classification on the synthetic eval sets (500 images, one object each)")
    print("\n".join(lines))
    ret = trained.get("retrieval/eval_ret") or retrieval(
        str(run), data=str(data / "eval_ret"), progress=False
    )
    results["retrieval"] = ret
    n_img, n_txt = ret["n_images"], ret["n_texts"]
    print(
        f"\nRetrieval on eval_ret ({n_img} images, {n_txt} captions, online weights; "
        f"chance R@1 {100 / n_img:.1f}% both ways)"
    )
    print("| direction | R@1 | R@5 | R@10 |\n|---|---|---|---|")
    for label, key in (("image→text", "text_retrieval"), ("text→image", "image_retrieval")):
        r = [100 * ret[f"{key}_recall@{k}"] for k in (1, 5, 10)]
        print(f"| {label} | {r[0]:.1f} | {r[1]:.1f} | {r[2]:.1f} |")
    (run / "demo_results.json").write_text(json.dumps(results, indent=2))
    print(f"\nresults: {run / 'demo_results.json'}")
    print(f"tensorboard logs: {run / 'tb'}   (tensorboard --logdir {run / 'tb'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
