"""The keep-ratio studies' result files: results.md (a markdown table), results.csv,
results.json and results.png, for the training study and for one checkpoint's sweep."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

from aclip.studies.keep_ratio_plots import plot_checkpoint, plot_study, teacher_cell

Column = tuple[str, Callable[[dict], str]]
Plotter = Callable[[list[dict], Path, str], None]


def _gflop_cell(row: dict) -> str:
    return f"{row['gflop_per_sample']:.4g}" if "gflop_per_sample" in row else "–"


STUDY_COLUMNS: list[Column] = [
    ("strategy", lambda r: r["strategy"]),
    ("keep ratio", lambda r: f"{r['keep_ratio']:g}"),
    ("views", lambda r: str(r["views"])),
    ("teacher px", teacher_cell),
    ("GFLOP/sample", _gflop_cell),
    ("steps", lambda r: str(r["steps"]) if r.get("steps") else "config"),
    ("train s", lambda r: f"{r['train_wall_s']:.0f}" if "train_wall_s" in r else "–"),
    ("runs", lambda r: str(r["runs"])),
    ("top-1 (mean ± sd)", lambda r: f"{r['top1_mean']:.1f} ± {r['top1_std']:.1f}"),
    ("per run", lambda r: r["top1_runs"]),
]


def markdown_table(table: list[dict], columns: list[Column], title: str) -> str:
    """A titled markdown table, one row per dict, cells made by each column's formatter."""
    lines = [f"## {title}", "", "| " + " | ".join(h for h, _ in columns) + " |"]
    lines.append("|" + "---|" * len(columns))
    lines += ["| " + " | ".join(fmt(row) for _, fmt in columns) + " |" for row in table]
    return "\n".join(lines) + "\n"


def write_results(
    table: list[dict], out: Path, title: str, columns: list[Column], plot: Plotter
) -> None:
    """results.csv and results.json (every key), results.md (``columns``) and results.png
    (``plot``) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(table, indent=2))
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    (out / "results.md").write_text(markdown_table(table, columns, title))
    plot(table, out / "results.png", title)


def write_outputs(table: list[dict], out: Path, title: str) -> None:
    """The study's results.md, results.csv and results.png in ``out``."""
    write_results(table, out, title, STUDY_COLUMNS, plot_study)


CHECKPOINT_COLUMNS: list[Column] = [
    ("strategy", lambda r: r["strategy"]),
    ("keep ratio", lambda r: f"{r['keep_ratio']:g}"),
    ("kept tokens", lambda r: str(r["kept_tokens"])),
    ("top-1 (%)", lambda r: f"{r['top1']:.1f}"),
    ("top-5 (%)", lambda r: f"{r['top5']:.1f}"),
    ("images/s", lambda r: f"{r['images_per_s']:.1f}"),
    ("relevance from", lambda r: r.get("relevance_from", "").replace("_", " ") or "-"),
]


def write_checkpoint_outputs(table: list[dict], out: Path, title: str) -> None:
    """The checkpoint sweep's results.md, results.csv and results.png in ``out``."""
    write_results(table, out, title, CHECKPOINT_COLUMNS, plot_checkpoint)
