"""Token-keep-ratio studies: train a grid of masking configs and compare their zero-shot accuracy.

    python -m evals.keep_ratio study --config configs/demo.yaml --out runs/study \
        --strategies random attentive --keep-ratios 0.25 0.5 --seeds 0 1 [override ...]

Each grid point is one ``train.py`` run (its own process, same base config and overrides, same
number of steps) evaluated on the config's ``eval.zeroshot_sets``. The study writes
``results.md`` (a markdown table), ``results.csv`` and ``results.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class GridPoint:
    """One training run of the study."""

    strategy: str
    keep_ratio: float
    views: int
    seed: int

    @property
    def name(self) -> str:
        """Directory name of the run."""
        return f"{self.strategy}_k{self.keep_ratio:g}_v{self.views}_s{self.seed}"

    def overrides(self) -> list[str]:
        """The dotted overrides that select this point."""
        ratio = 1.0 if self.strategy == "none" else self.keep_ratio
        return [
            f"mask.strategy={self.strategy}",
            f"mask.keep_ratio={ratio}",
            f"mask.num_views={self.views}",
            f"train.seed={self.seed}",
        ] + (["loss.w_simclr=0"] if self.views < 2 else [])


def grid(
    strategies: list[str], ratios: list[float], views: list[int], seeds: list[int]
) -> list[GridPoint]:
    """The study's runs; ``none`` keeps every token, so it is run once per views × seed."""
    points = []
    for strategy, ratio, n_views, seed in itertools.product(strategies, ratios, views, seeds):
        point = GridPoint(strategy, 1.0 if strategy == "none" else ratio, n_views, seed)
        if point not in points:
            points.append(point)
    return points


def run_point(point: GridPoint, config: str, out: Path, extra: list[str]) -> dict:
    """Train one grid point (or reuse its finished results) and return its results.json."""
    run_dir = out / point.name
    results = run_dir / "results.json"
    if not results.is_file():
        cmd = [
            sys.executable,
            str(REPO / "train.py"),
            "--config",
            config,
            *extra,
            *point.overrides(),
            f"train.output_dir={run_dir}",
            "train.progress=false",
        ]
        log = out / f"{point.name}.log"
        with log.open("w") as fh:
            done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
        if done.returncode != 0:
            raise RuntimeError(f"run {point.name} failed (exit {done.returncode}); see {log}")
    return json.loads(results.read_text())


def _top1(results: dict, eval_set: str | None = None) -> float:
    """Top-1 (%) on ``eval_set`` (its folder name), or on the first zero-shot set."""
    sets = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith("zeroshot/")}
    if not sets:
        raise ValueError("the study needs eval.zeroshot_sets in the config")
    if eval_set is not None and eval_set not in sets:
        raise ValueError(f"no zero-shot results for {eval_set!r}; have {sorted(sets)}")
    return 100.0 * sets[eval_set or next(iter(sets))]["top1"]


def summarise(rows: list[tuple[GridPoint, float]]) -> list[dict]:
    """Mean and spread of top-1 over seeds for each (strategy, keep ratio, views)."""
    groups: dict[tuple, list[float]] = {}
    for point, top1 in rows:
        groups.setdefault((point.strategy, point.keep_ratio, point.views), []).append(top1)
    table = []
    for (strategy, ratio, views), values in sorted(groups.items()):
        table.append(
            {
                "strategy": strategy,
                "keep_ratio": ratio,
                "views": views,
                "runs": len(values),
                "top1_mean": statistics.fmean(values),
                "top1_std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "top1_runs": " ".join(f"{v:.1f}" for v in values),
            }
        )
    return table


def write_outputs(table: list[dict], out: Path, title: str) -> None:
    """results.md, results.csv and results.png in ``out``."""
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    lines = [
        f"## {title}",
        "",
        "| strategy | keep ratio | views | runs | top-1 (mean ± sd) | per run |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['strategy']} | {r['keep_ratio']:g} | {r['views']} | {r['runs']} | "
        f"{r['top1_mean']:.1f} ± {r['top1_std']:.1f} | {r['top1_runs']} |"
        for r in table
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(table, out / "results.png", title)


def _plot(table: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (strategy, views), rows in itertools.groupby(
        sorted(table, key=lambda r: (r["strategy"], r["views"], r["keep_ratio"])),
        key=lambda r: (r["strategy"], r["views"]),
    ):
        rows = list(rows)
        ax.errorbar(
            [r["keep_ratio"] for r in rows],
            [r["top1_mean"] for r in rows],
            yerr=[r["top1_std"] for r in rows],
            marker="o",
            capsize=3,
            label=f"{strategy} ({views} view{'s' if views > 1 else ''})",
        )
    ax.set_xlabel("kept fraction of patch tokens")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def study(args: argparse.Namespace) -> int:
    """Run the grid and write the table, CSV and plot."""
    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points = grid(args.strategies, args.keep_ratios, args.views, args.seeds)
    rows = []
    for point in tqdm(points, desc="study"):
        results = run_point(point, args.config, out, args.overrides)
        rows.append((point, _top1(results, args.eval_set)))
    table = summarise(rows)
    write_outputs(table, out, args.title)
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.png'}")
    return 0


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
    p.add_argument("--eval-set", help="zero-shot set (folder name) to compare; default: first")
    p.add_argument("--title", default="Zero-shot top-1 by token selection")
    p.add_argument("overrides", nargs="*", help="section.key=value for every run")
    args = parser.parse_args(argv)
    return study(args)


if __name__ == "__main__":
    sys.exit(main())
