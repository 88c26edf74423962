"""The keep-ratio studies' figures (matplotlib, Agg): top-1 against the kept fraction of patch
tokens (and against GFLOP/sample, or images/s for one checkpoint's sweep)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def teacher_cell(row: dict) -> str:
    """The teacher resolution of a table row: px, or ``model`` for the model's own size."""
    if "teacher_px" in row:
        return str(row["teacher_px"])
    return str(row["teacher_size"]) if row.get("teacher_size") else "model"


def _by_strategy(table: list[dict], *extra: str) -> Iterator[tuple[tuple, list[dict]]]:
    """Rows grouped by (strategy, *extra), each group sorted by keep ratio."""
    keys = ("strategy", *extra)
    rows = sorted(table, key=lambda r: (*(r[k] for k in keys), r["keep_ratio"]))
    for key, group in itertools.groupby(rows, key=lambda r: tuple(r[k] for k in keys)):
        yield key, list(group)


def _finish(
    fig, axes: list, path: Path, title: str, extra_axes: Sequence = (), extra_xlabel: str = ""
) -> None:
    """Label, grid and (on ``axes``, not ``extra_axes``) legend the panels; save and close.
    ``extra_xlabel`` replaces the kept-fraction label on ``extra_axes``."""
    for ax in [*axes, *extra_axes]:
        is_extra = ax in extra_axes
        ax.set_xlabel(
            extra_xlabel if is_extra and extra_xlabel else "kept fraction of patch tokens"
        )
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def _series_label(strategy: str, views: int, row: dict) -> str:
    label = f"{strategy} ({views} view{'s' if views > 1 else ''}"
    if row.get("teacher_size") or "teacher_px" in row:
        label += f", teacher {teacher_cell(row)} px"
    return label + ")"


def plot_study(table: list[dict], path: Path, title: str) -> None:
    """Top-1 against the kept fraction and, when the rows have costs, against GFLOP/sample."""
    with_cost = all("gflop_per_sample" in r for r in table)
    fig, axes = pyplot().subplots(1, 2 if with_cost else 1, figsize=(11 if with_cost else 6, 4))
    acc = axes[0] if with_cost else axes
    for (strategy, views, _), rows in _by_strategy(table, "views", "teacher_size"):
        label = _series_label(strategy, views, rows[0])
        acc.errorbar(
            [r["keep_ratio"] for r in rows],
            [r["top1_mean"] for r in rows],
            yerr=[r["top1_std"] for r in rows],
            marker="o",
            capsize=3,
            label=label,
        )
        if with_cost:
            axes[1].errorbar([r["gflop_per_sample"] for r in rows],
                             [r["top1_mean"] for r in rows], yerr=[r["top1_std"] for r in rows],
                             marker="o", capsize=3, linestyle="none", label=label)  # fmt: skip
    acc.set_ylabel("zero-shot top-1 (%)")
    if not with_cost:
        _finish(fig, [acc], path, title)
        return
    axes[1].set_ylabel("zero-shot top-1 (%)")
    axes[1].legend(fontsize="small")
    _finish(fig, [acc], path, title, extra_axes=[axes[1]],
            extra_xlabel="training cost: model GFLOP per sample (aclip.methods.flops)")  # fmt: skip


def plot_checkpoint(table: list[dict], path: Path, title: str) -> None:
    """Top-1 and images/s against keep ratio, one line per strategy from the all-tokens point."""
    fig, (acc, speed) = pyplot().subplots(1, 2, figsize=(10, 4))
    full = [r for r in table if r["strategy"] == "none"]
    for (strategy,), rows in _by_strategy(table):
        if strategy != "none":
            rows += full
            acc.plot(
                [r["keep_ratio"] for r in rows], [r["top1"] for r in rows], "o-", label=strategy
            )
            speed.plot([r["keep_ratio"] for r in rows], [r["images_per_s"] for r in rows], "o-")
    for ax, key in ((acc, "top1"), (speed, "images_per_s")):
        ax.plot([r["keep_ratio"] for r in full], [r[key] for r in full], "k*", ms=12, zorder=3)
    acc.plot([], [], "k*", ms=12, label="all tokens")
    acc.set_ylabel("zero-shot top-1 (%)")
    speed.set_ylabel("images / s (image tower + teacher)")
    _finish(fig, [acc], path, title, extra_axes=[speed])
