"""Recipe study: which training settings make a model learn a hard attribute (shape) and not
only the easy one (colour), within a CPU budget.

    python -m evals.recipe_study run --variants configs/recipe_study.yaml --out runs/recipe \
        [--config configs/demo.yaml] [--only NAME ...] [--threads 1] [--eval-every 50] \
        [--probe-set demo_out/data/eval_cls] [section.key=value ...]
    python -m evals.recipe_study report --variants configs/recipe_study.yaml --out runs/recipe \
        [--docs docs/recipe_study] [--plot NAME ...]

The variants file maps a name to ``{overrides: [section.key=value ...], seeds: [0, 1], note:
"..."}``. ``run`` trains every variant × seed with ``train.py`` (one process per run, in turn,
``OMP_NUM_THREADS=--threads``), evaluating the config's zero-shot sets every ``--eval-every``
steps (tensorboard ``eval/zeroshot/<set>/top1``); it times each run (wall and CPU seconds of the
process and its loader workers) and, with ``--probe-set``, runs the linear probe of
``evals.probe`` on its final checkpoint. Finished runs are skipped when the study is run again
(an unfinished one is started afresh).

``report`` reads every finished run and writes ``results.md`` (one row per run: steps, samples,
times, final shape and colour top-1, probe), ``results.csv``, ``curves.csv`` and the learning
curves (zero-shot top-1 of each set against samples seen and against training-loop time)
as ``curves.png`` into ``--out`` (and ``--docs``, if given, as ``<docs>.md`` / ``<docs>_*.png``).
The training-loop time of a curve point is summed from the run's logged samples/s, so it leaves
out the periodic evaluations; it is the time of the ``--threads`` the run had.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TIMING = "timing.json"
PROBE = "probe.json"
# a variant name becomes the folder <name>_s<seed> (and <name>_s<seed>.log) under --out
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Variant:
    """A named set of config overrides, run once per seed."""

    name: str
    overrides: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    note: str = ""
    group: str = ""

    def run_name(self, seed: int) -> str:
        """Directory name of one run."""
        return f"{self.name}_s{seed}"


@dataclass
class Run:
    """What one finished run left behind: its final metrics, timing, curves and probe."""

    variant: Variant
    seed: int
    results: dict
    timing: dict
    curves: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)
    probe: dict | None = None


def load_variants(path: str | Path) -> list[Variant]:
    """Variants from a YAML mapping ``name -> {overrides, seeds, note, group}``, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"variants file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of variant names")
    variants = []
    for name, spec in data.items():
        if not VARIANT_NAME.fullmatch(str(name)):
            raise ValueError(
                f"{path}: variant name {str(name)!r} is not letters, digits, '.', '_' and '-' "
                "starting with a letter or digit (it names the run's folder under --out)"
            )
        spec = spec or {}
        unknown = set(spec) - {"overrides", "seeds", "note", "group"}
        if unknown:
            raise ValueError(f"{path}: variant {name!r} has unknown keys {sorted(unknown)}")
        overrides = tuple(str(o) for o in spec.get("overrides", []) or [])
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"{path}: variant {name!r}: {bad[0]!r} is not section.key=value")
        seeds = tuple(int(s) for s in spec.get("seeds", [0]))
        variants.append(
            Variant(str(name), overrides, seeds, str(spec.get("note", "")), spec.get("group", ""))
        )
    return variants


def select(variants: list[Variant], only: list[str] | None) -> list[Variant]:
    """The variants named in ``only`` (all when None); an unknown name is an error."""
    if not only:
        return variants
    names = {v.name for v in variants}
    missing = [n for n in only if n not in names]
    if missing:
        raise ValueError(f"unknown variant(s) {missing}; the file has {sorted(names)}")
    return [v for v in variants if v.name in only]


# ----------------------------------------------------------------------------- running


def inside(out: Path, path: Path) -> Path:
    """``path`` when it resolves (symbolic links followed) to somewhere below ``out``; a
    ValueError otherwise: the study writes and removes nothing outside its --out."""
    root, resolved = out.resolve(), path.resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise ValueError(f"{path} resolves to {resolved}, outside the study directory {out}")
    return path


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train_command(
    config: str, variant: Variant, seed: int, run_dir: Path, extra: list[str], eval_every: int
) -> list[str]:
    """The ``train.py`` command line of one run: base config, study-wide overrides, the
    variant's overrides, then the seed, output directory and evaluation interval."""
    return [
        sys.executable,
        str(REPO / "train.py"),
        "--config",
        config,
        *extra,
        *variant.overrides,
        f"train.seed={seed}",
        f"train.output_dir={run_dir}",
        f"eval.every_steps={eval_every}",
        "train.progress=false",
    ]


def run_one(
    config: str,
    variant: Variant,
    seed: int,
    out: Path,
    extra: list[str],
    threads: int,
    eval_every: int,
    probe_set: str | None,
) -> Path:
    """Train one run unless it has finished before (results and timing written); returns its
    directory. A directory without both files is an unfinished run and is started afresh."""
    run_dir = inside(out, out / variant.run_name(seed))
    log = inside(out, out / f"{variant.run_name(seed)}.log")
    if (run_dir / "results.json").is_file() and (run_dir / TIMING).is_file():
        if probe_set and not (run_dir / PROBE).is_file():
            _probe(run_dir, probe_set, threads)
        return run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)
    from aclip.distributed import single_process_env

    env = single_process_env(os.environ) | {
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}  # fmt: skip
    env.setdefault("DS_ACCELERATOR", "cpu")
    cmd = train_command(config, variant, seed, run_dir, extra, eval_every)
    cpu0, t0 = _children_cpu_s(), time.perf_counter()
    with log.open("w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    wall, cpu = time.perf_counter() - t0, _children_cpu_s() - cpu0
    if done.returncode != 0:
        raise RuntimeError(f"run {run_dir.name} failed (exit {done.returncode}); see {log}")
    timing = {"wall_s": wall, "cpu_s": cpu, "threads": threads, "eval_every": eval_every}
    (run_dir / TIMING).write_text(json.dumps(timing, indent=2))
    if probe_set:
        _probe(run_dir, probe_set, threads)
    return run_dir


def _probe(run_dir: Path, data: str, threads: int) -> None:
    import torch

    from evals.probe import probe

    torch.set_num_threads(threads)
    report = probe(str(run_dir), data, progress=False)
    (run_dir / PROBE).write_text(json.dumps(report, indent=2))


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


# ----------------------------------------------------------------------------- commands


def _parse_labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, _, value = item.partition("=")
        if not value:
            raise ValueError(f"--label {item!r} is not SET=LABEL")
        labels[key] = value
    return labels


def run_command(args: argparse.Namespace) -> int:
    """Train every selected variant × seed (finished runs are kept)."""
    from tqdm import tqdm

    variants = select(load_variants(args.variants), args.only)
    if not Path(args.config).is_file():
        raise FileNotFoundError(f"config file not found: {args.config}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(v, s) for v in variants for s in v.seeds]
    for variant, seed in tqdm(jobs, desc="recipe study"):
        run_one(
            args.config, variant, seed, out, args.overrides, args.threads, args.eval_every,
            args.probe_set,
        )  # fmt: skip
    return report_command(args)


def report_command(args: argparse.Namespace) -> int:
    """Table, CSVs and curves of the finished runs."""
    variants = select(load_variants(args.variants), args.only)
    out = Path(args.out)
    runs = [r for v in variants for s in v.seeds if (r := load_run(out, v, s)) is not None]
    if not runs:
        raise FileNotFoundError(f"no finished run of these variants in {out}")
    labels = _parse_labels(args.label)
    sets = args.sets or sorted({s for r in runs for s in r.curves})
    rows = table_rows(runs, sets)
    text = markdown(rows, sets, labels, args.title)
    (out / "results.md").write_text(text)
    write_csv(rows, out / "results.csv")
    write_curves_csv(runs, out / "curves.csv")
    plotted = [r for r in runs if not args.plot or r.variant.name in args.plot]
    plot_curves(plotted, sets, labels, out / "curves.png", args.title)
    if args.docs:
        docs = Path(args.docs)
        docs.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "curves.png", docs.with_name(docs.name + "_curves.png"))
        shutil.copy(out / "results.csv", docs.with_name(docs.name + ".csv"))
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
