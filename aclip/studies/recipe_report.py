"""The recipe study's report: what each finished run left behind, read back, as a table, CSVs
and learning curves.

:func:`write_report` reads every finished run of the variants and writes ``results.md`` (one
row per run: steps, samples, times, final top-1 per set, probe), ``results.csv``,
``curves.csv`` and the learning curves (zero-shot top-1 of each set against samples seen and
against training-loop time) as ``curves.png``. The training-loop time of a curve point is
summed from the run's logged samples/s, so it leaves out the periodic evaluations; it is the
time of the threads the run had.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from aclip.studies.recipe import PROBE, TIMING, Variant


@dataclass
class Run:
    """What one finished run left behind: its final metrics, timing, curves and probe."""

    variant: Variant
    seed: int
    results: dict
    timing: dict
    curves: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)
    probe: dict | None = None


# ----------------------------------------------------------------------------- reading


def read_curves(run_dir: Path, batch_size: int) -> dict[str, list[tuple[int, float, float]]]:
    """Per zero-shot set: (step, training-loop seconds, top-1 %) at each periodic evaluation.

    Training-loop seconds at a step = sum over the logged intervals up to it of the samples in
    the interval divided by the interval's ``perf/samples_per_s`` (data wait included,
    evaluation and checkpointing left out).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    elapsed, t, prev = {0: 0.0}, 0.0, 0
    for event in acc.Scalars("perf/samples_per_s") if "perf/samples_per_s" in tags else []:
        t += (event.step - prev) * batch_size / max(event.value, 1e-9)
        elapsed[event.step], prev = t, event.step
    known = sorted(elapsed)
    curves = {}
    for tag in tags:
        parts = tag.split("/")
        if len(parts) == 4 and parts[:2] == ["eval", "zeroshot"] and parts[3] == "top1":
            points = []
            for event in acc.Scalars(tag):
                step_t = elapsed.get(event.step)
                if step_t is None:  # eval step not on a log step: nearest logged step below
                    step_t = elapsed[max(s for s in known if s <= event.step)]
                points.append((event.step, step_t, 100.0 * event.value))
            curves[parts[2]] = points
    return curves


def load_run(out: Path, variant: Variant, seed: int) -> Run | None:
    """The finished run of ``variant`` / ``seed`` in ``out``, or None if it is not there."""
    run_dir = out / variant.run_name(seed)
    files = [run_dir / "results.json", run_dir / TIMING, run_dir / "config.yaml"]
    if not all(f.is_file() for f in files):
        return None
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    batch = int(cfg["train"]["global_batch_size"])
    probe = json.loads((run_dir / PROBE).read_text()) if (run_dir / PROBE).is_file() else None
    return Run(
        variant,
        seed,
        json.loads(files[0].read_text()),
        json.loads(files[1].read_text()) | {"batch": batch},
        read_curves(run_dir, batch),
        probe,
    )


def _final_top1(run: Run, eval_set: str) -> float | None:
    metrics = run.results.get(f"zeroshot/{eval_set}")
    return None if metrics is None else 100.0 * metrics["top1"]


def table_rows(runs: list[Run], sets: list[str]) -> list[dict]:
    """One row per run: variant, seed, steps, samples, times, final top-1 per set, probe."""
    rows = []
    for run in runs:
        curve = next(iter(run.curves.values()), [])
        row = {
            "variant": run.variant.name,
            "group": run.variant.group,
            "seed": run.seed,
            "steps": int(run.results.get("step", 0)),
            "batch": run.timing["batch"],
            "samples_k": run.results.get("step", 0) * run.timing["batch"] / 1000.0,
            "train_s": curve[-1][1] if curve else float("nan"),
            "wall_s": run.timing["wall_s"],
            "cpu_s": run.timing["cpu_s"],
            "threads": run.timing["threads"],
        }
        for s in sets:
            row[f"{s}_top1"] = _final_top1(run, s)
        if run.probe is not None:
            row["probe_top1"] = 100.0 * run.probe["linear_probe"]["top1"]
            row["prompt_cos"] = run.probe["text"]["prompt_cosine_mean"]
        row["note"] = run.variant.note
        rows.append(row)
    return rows


def _fmt(value: object, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(rows: list[dict], sets: list[str], labels: dict[str, str], title: str) -> str:
    """The results table as markdown (a probe column when any run has one)."""
    has_probe = any("probe_top1" in r for r in rows)
    head = ["variant", "seed", "steps × batch", "train s", "process wall s", "CPU s"]
    head += [f"{labels.get(s, s)} top-1" for s in sets]
    head += ["probe top-1", "prompt cos"] if has_probe else []
    head += ["what changes"]
    lines = [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], str(r["seed"]), f"{r['steps']} × {r['batch']}"]
        cells += [_fmt(r["train_s"], 0), _fmt(r["wall_s"], 0), _fmt(r["cpu_s"], 0)]
        cells += [_fmt(r[f"{s}_top1"]) for s in sets]
        if has_probe:
            cells += [_fmt(r.get("probe_top1")), _fmt(r.get("prompt_cos"), 2)]
        cells.append(r["note"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    """Rows as CSV, the union of their keys as columns."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def write_curves_csv(runs: list[Run], path: Path) -> None:
    """Every curve point: variant, seed, set, step, samples, train seconds, top-1."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["variant", "seed", "set", "step", "samples", "train_s", "top1"])
        for run in runs:
            for name, points in run.curves.items():
                for step, secs, top1 in points:
                    samples = step * run.timing["batch"]
                    row = [run.variant.name, run.seed, name, step, samples, f"{secs:.1f}"]
                    writer.writerow([*row, f"{top1:.2f}"])


def plot_curves(
    runs: list[Run], sets: list[str], labels: dict[str, str], path: Path, title: str
) -> None:
    """Top-1 of each set (rows) against samples seen and training-loop time (columns), one
    colour per variant, one line per seed (dashed for seeds after the first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sets), 2, figsize=(12, 4 * len(sets)), squeeze=False)
    names = list(dict.fromkeys(r.variant.name for r in runs))
    colours = {n: plt.cm.tab20(i % 20) for i, n in enumerate(names)}
    for run in runs:
        first = run.seed == run.variant.seeds[0]
        for row, s in enumerate(sets):
            points = run.curves.get(s, [])
            if not points:
                continue
            samples = [p[0] * run.timing["batch"] / 1000 for p in points]
            for col, xs in enumerate((samples, [p[1] / 60 for p in points])):
                axes[row][col].plot(
                    xs,
                    [p[2] for p in points],
                    "-" if first else "--",
                    marker=".",
                    color=colours[run.variant.name],
                    label=run.variant.name if first else None,
                )
    threads = sorted({r.timing["threads"] for r in runs})
    for row, s in enumerate(sets):
        xlabels = ("samples seen (thousands)", f"training-loop time (min, {threads} thread(s))")
        for col, xlabel in enumerate(xlabels):
            ax = axes[row][col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"zero-shot {labels.get(s, s)} top-1 (%)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_labels(items: Sequence[str]) -> dict[str, str]:
    """``SET=LABEL`` items as a mapping set -> label (a ValueError naming a bad item)."""
    labels = {}
    for item in items:
        key, _, value = item.partition("=")
        if not value:
            raise ValueError(f"--label {item!r} is not SET=LABEL")
        labels[key] = value
    return labels


def write_report(
    variants: list[Variant],
    out: Path,
    label_items: Sequence[str] = (),
    sets: list[str] | None = None,
    title: str = "Recipe study: zero-shot top-1",
    plot: list[str] | None = None,
    docs: str | None = None,
) -> str:
    """Table, CSVs and curves of the finished runs of ``variants`` in ``out`` (``label_items``:
    ``SET=LABEL``; ``sets``: default every set the runs have; ``plot``: the variants to draw,
    default all; ``docs``: also copy curves.png / results.csv to ``<docs>_curves.png`` /
    ``<docs>.csv``); returns the markdown table.

    Raises:
        FileNotFoundError: no finished run of these variants in ``out``.
        ValueError: a label item that is not ``SET=LABEL``.
    """
    runs = [r for v in variants for s in v.seeds if (r := load_run(out, v, s)) is not None]
    if not runs:
        raise FileNotFoundError(f"no finished run of these variants in {out}")
    labels = parse_labels(label_items)
    sets = sets or sorted({s for r in runs for s in r.curves})
    rows = table_rows(runs, sets)
    text = markdown(rows, sets, labels, title)
    (out / "results.md").write_text(text)
    write_csv(rows, out / "results.csv")
    write_curves_csv(runs, out / "curves.csv")
    plotted = [r for r in runs if not plot or r.variant.name in plot]
    plot_curves(plotted, sets, labels, out / "curves.png", title)
    if docs:
        docs_path = Path(docs)
        docs_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "curves.png", docs_path.with_name(docs_path.name + "_curves.png"))
        shutil.copy(out / "results.csv", docs_path.with_name(docs_path.name + ".csv"))
    return text
