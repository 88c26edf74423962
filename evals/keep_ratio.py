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
import csv
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from aclip.data.sets.wds import load_wds_classification
from aclip.distributed import single_process_env
from aclip.eval.evaluate import (
    classification_metrics,
    eval_autocast,
    resolve_eval_precision,
    zero_shot_classifier,
    zero_shot_logits,
)
from aclip.interop.safe_load import add_trust_argument
from aclip.methods.tokens import num_keep, random_keep, topk_keep
from aclip.model.clip import CLIP
from aclip.model.vision import VisionTower
from aclip.tokenizer import Tokenizer
from aclip.train.checkpoint import load_eval_model
from evals.common import EvalModel, add_precision_arg, check_model_source, load_model

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / "train.py"  # the study trains with the checkout's train.py


@dataclass(frozen=True)
class GridPoint:
    """One training run of the study."""

    strategy: str
    keep_ratio: float
    views: int
    seed: int
    teacher_size: int = 0  # ema.image_size (0: the model's image size)
    steps: int = 0  # optim.total_steps (0: the config's run length); set by equal_cost_steps

    @property
    def name(self) -> str:
        """Directory name of the run (``_t<px>`` only for a teacher at another resolution,
        ``_n<steps>`` only for a run length other than the config's)."""
        teacher = f"_t{self.teacher_size}" if self.teacher_size else ""
        steps = f"_n{self.steps}" if self.steps else ""
        return f"{self.strategy}_k{self.keep_ratio:g}_v{self.views}{teacher}{steps}_s{self.seed}"

    def overrides(self) -> list[str]:
        """The dotted overrides that select this point."""
        ratio = 1.0 if self.strategy == "none" else self.keep_ratio
        return (
            [
                f"mask.strategy={self.strategy}",
                f"mask.keep_ratio={ratio}",
                f"mask.num_views={self.views}",
                f"train.seed={self.seed}",
            ]
            + (["loss.w_simclr=0"] if self.views < 2 else [])
            + ([f"ema.image_size={self.teacher_size}"] if self.teacher_size else [])
            + ([f"optim.total_steps={self.steps}"] if self.steps else [])
        )


def grid(
    strategies: list[str],
    ratios: list[float],
    views: list[int],
    seeds: list[int],
    teacher_sizes: Sequence[int] = (0,),
) -> list[GridPoint]:
    """The study's runs; ``none`` keeps every token, so it is run once per views × teacher
    size × seed."""
    points = []
    for strategy, ratio, n_views, size, seed in itertools.product(
        strategies, ratios, views, teacher_sizes, seeds
    ):
        point = GridPoint(strategy, 1.0 if strategy == "none" else ratio, n_views, seed, size)
        if point not in points:
            points.append(point)
    return points


def point_cost(point: GridPoint, config: str | None, extra: Sequence[str] = ()) -> dict:
    """The teacher's resolution (px) and the analytic model FLOPs per training sample
    (``aclip.methods.flops``; GFLOP) of a grid point's run, from its resolved config."""
    from aclip.config import load_config
    from aclip.methods.aclip import teacher_image_size
    from aclip.methods.flops import config_step_flops

    cfg = load_config(config, [*extra, *point.overrides()])
    flops = config_step_flops(cfg)
    return {
        "teacher_px": teacher_image_size(cfg),
        "gflop_per_sample": flops.per_sample / 1e9,
        "teacher_gflop_per_sample": flops.teacher / flops.batch / 1e9,
    }


def _scale_to_all_token_budget(
    points: Sequence[GridPoint],
    config: str | None,
    extra: Sequence[str],
    step_cost: Callable[[GridPoint], float],
) -> list[GridPoint]:
    """Each point with round(S x C_all / C) steps, where S is the config's run length, C
    ``step_cost`` of the point and C_all that of the all-token run with the same views and
    teacher (a cost that does not depend on the seed); a point as long as the config's run keeps
    ``steps`` 0 (the same run as in the equal-steps study, reused)."""
    from aclip.config import load_config
    from aclip.train.optim import run_length
    from aclip.train.preflight import resolve_epoch_size

    base_cfg = load_config(config, list(extra))  # no point changes the run length
    base = run_length(base_cfg, resolve_epoch_size(base_cfg)).total_steps
    all_tokens: dict[tuple[int, int], float] = {}  # (views, teacher size) -> cost of the run
    out = []
    for point in points:
        key = (point.views, point.teacher_size)
        if key not in all_tokens:
            all_tokens[key] = step_cost(replace(point, strategy="none", keep_ratio=1.0))
        steps = max(1, round(base * all_tokens[key] / step_cost(point)))
        out.append(replace(point, steps=0 if steps == base else steps))
    return out


def equal_cost_steps(
    points: Sequence[GridPoint], config: str | None, extra: Sequence[str] = ()
) -> list[GridPoint]:
    """The points with their run lengths set for equal training compute: each gets
    round(S x F_all / F) steps, where S is the config's run length, F the analytic model FLOPs
    of one of its steps (``aclip.methods.flops``) and F_all that of the all-token run with the
    same views and teacher; a point as long as the config's run keeps ``steps`` 0 (the same run
    as in the equal-steps study, reused)."""
    from aclip.config import load_config
    from aclip.methods.flops import config_step_flops

    def step_flops(point: GridPoint) -> float:
        return config_step_flops(load_config(config, [*extra, *point.overrides()])).total

    return _scale_to_all_token_budget(points, config, extra, step_flops)


def _measured_wall(point: GridPoint, out: Path) -> float:
    """The training wall time (s) of a finished run in ``out`` (its ``study_time.json``)."""
    timing = out.resolve() / point.name / TIME_FILE
    if not timing.is_file():
        raise ValueError(
            f"--equal-time needs the equal-steps run {point.name} timed in {out} "
            f"(no {timing}): run the same study without --equal-time first"
        )
    return json.loads(timing.read_text())["train_wall_s"]


def _timed_seeds(point: GridPoint, out: Path) -> set[int]:
    """The seeds of ``point`` (its other fields as they are) with a timed run in ``out``."""
    prefix = point.name[: -len(f"_s{point.seed}")] + "_s"
    found = set()
    for timing in out.resolve().glob(f"{prefix}*/{TIME_FILE}"):
        seed = timing.parent.name[len(prefix) :]
        if seed.isdigit():
            found.add(int(seed))
    return found


def equal_time_steps(
    points: Sequence[GridPoint], config: str | None, extra: Sequence[str], out: Path
) -> list[GridPoint]:
    """The points with their run lengths set for equal training wall time, from the
    equal-steps study already in ``out``: each gets round(S x W_all / W) steps, where S is the
    config's run length, W the point's measured ``train.py`` wall time at S steps (mean over
    the grid's seeds, which must all be timed, and any other seed of it timed in ``out``, so
    that one process per seed gets the same run lengths; start-up and evaluation included) and
    W_all that of the all-token run with the same views and teacher. Wall times are only
    comparable between runs made on the same machine under the same load (the study's two
    seeds side by side, say)."""
    grid_seeds = {p.seed for p in points}

    def mean_wall(point: GridPoint) -> float:
        seeds = grid_seeds | _timed_seeds(point, out)
        return statistics.fmean(_measured_wall(replace(point, seed=s), out) for s in seeds)

    return _scale_to_all_token_budget(points, config, extra, mean_wall)


def _check_train_py() -> None:
    if not TRAIN_PY.is_file():
        raise FileNotFoundError(
            f"the study trains with train.py, not found at {TRAIN_PY}: run it from a "
            "checkout of the repository (or an editable install, pip install -e .)"
        )


TIME_FILE = "study_time.json"


def run_point(point: GridPoint, config: str, out: Path, extra: list[str]) -> dict:
    """Train one grid point (or reuse its finished results) and return its results.json, with
    ``train_wall_s``: the wall time of its ``train.py`` process (kept in the run directory's
    ``study_time.json``; None for a run finished before the study timed its runs)."""
    run_dir = out.resolve() / point.name
    results = run_dir / "results.json"
    timing = run_dir / TIME_FILE
    if not results.is_file():
        _check_train_py()
        cmd = [
            sys.executable,
            str(TRAIN_PY),
            "--config",
            str(Path(config).resolve()),
            *extra,
            *point.overrides(),
            f"train.output_dir={run_dir}",
            "train.progress=false",
        ]
        log = out / f"{point.name}.log"
        start = time.perf_counter()
        with log.open("w") as fh:
            # in the caller's directory: relative paths of the overrides mean what they mean here
            done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                  env=single_process_env(os.environ))  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"run {point.name} failed (exit {done.returncode}); see {log}")
        timing.write_text(json.dumps({"train_wall_s": time.perf_counter() - start}))
    wall = json.loads(timing.read_text())["train_wall_s"] if timing.is_file() else None
    return json.loads(results.read_text()) | {"train_wall_s": wall}


def _top1(results: dict, eval_set: str | None = None) -> float:
    """Top-1 (%) on ``eval_set`` (its folder name), or on the first zero-shot set."""
    sets = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith("zeroshot/")}
    if not sets:
        raise ValueError("the study needs eval.zeroshot_sets in the config")
    if eval_set is not None and eval_set not in sets:
        raise ValueError(f"no zero-shot results for {eval_set!r}; have {sorted(sets)}")
    name = eval_set or next(iter(sets))
    if "top1" not in sets[name]:
        raise ValueError(f"zero-shot set {name!r} has no top-1 in this run: {sets[name]}")
    return 100.0 * sets[name]["top1"]


def _eval_precision(results: dict, eval_set: str | None = None) -> str:
    """The precision a run's zero-shot set was evaluated at (:func:`_top1`'s set; ``unrecorded``
    for a run made before results recorded it)."""
    sets = [v for k, v in results.items() if k.startswith("zeroshot/")]
    if eval_set is not None:
        sets = [results.get(f"zeroshot/{eval_set}", {})]
    return str(sets[0].get("precision", "unrecorded")) if sets else "unrecorded"


def summarise(
    rows: list[tuple[GridPoint, float]],
    cost: Callable[[GridPoint], dict] | None = None,
    walls: dict[GridPoint, float | None] | None = None,
) -> list[dict]:
    """Mean and spread of top-1 over seeds for each (strategy, keep ratio, views, teacher
    size); ``cost`` (e.g. :func:`point_cost`) adds its keys to each row, ``walls`` (each run's
    training wall time, s) the mean ``train_wall_s`` over the seeds that have one; ``steps``
    is the points' run length (0: the config's)."""
    groups: dict[tuple, list[tuple[GridPoint, float]]] = {}
    for point, top1 in rows:
        key = (point.strategy, point.keep_ratio, point.views, point.teacher_size)
        groups.setdefault(key, []).append((point, top1))
    table = []
    for (strategy, ratio, views, teacher), members in sorted(groups.items()):
        values = [top1 for _, top1 in members]
        row = {
            "strategy": strategy,
            "keep_ratio": ratio,
            "views": views,
            "teacher_size": teacher,
            "runs": len(values),
            "top1_mean": statistics.fmean(values),
            "top1_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "top1_runs": " ".join(f"{v:.1f}" for v in values),
            "steps": members[0][0].steps,
        }
        timed = [w for p, _ in members if (w := (walls or {}).get(p)) is not None]
        if timed:
            row["train_wall_s"] = statistics.fmean(timed)
        table.append(row | (cost(members[0][0]) if cost is not None else {}))
    return table


Column = tuple[str, Callable[[dict], str]]
Plotter = Callable[[list[dict], Path, str], None]


def _teacher_cell(row: dict) -> str:
    if "teacher_px" in row:
        return str(row["teacher_px"])
    return str(row["teacher_size"]) if row.get("teacher_size") else "model"


def _gflop_cell(row: dict) -> str:
    return f"{row['gflop_per_sample']:.4g}" if "gflop_per_sample" in row else "–"


STUDY_COLUMNS: list[Column] = [
    ("strategy", lambda r: r["strategy"]),
    ("keep ratio", lambda r: f"{r['keep_ratio']:g}"),
    ("views", lambda r: str(r["views"])),
    ("teacher px", _teacher_cell),
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
    write_results(table, out, title, STUDY_COLUMNS, _plot)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    _pyplot().close(fig)


def _series_label(strategy: str, views: int, row: dict) -> str:
    label = f"{strategy} ({views} view{'s' if views > 1 else ''}"
    if row.get("teacher_size") or "teacher_px" in row:
        label += f", teacher {_teacher_cell(row)} px"
    return label + ")"


def _plot(table: list[dict], path: Path, title: str) -> None:
    """Top-1 against the kept fraction and, when the rows have costs, against GFLOP/sample."""
    with_cost = all("gflop_per_sample" in r for r in table)
    fig, axes = _pyplot().subplots(1, 2 if with_cost else 1, figsize=(11 if with_cost else 6, 4))
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


def study(args: argparse.Namespace) -> int:
    """Run the grid and write the table, CSV and plot."""
    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points = grid(args.strategies, args.keep_ratios, args.views, args.seeds, args.teacher_sizes)
    rows, walls, precisions = [], {}, set()
    try:
        _check_train_py()  # before the config: an installed copy has neither
        if args.equal_cost:
            points = equal_cost_steps(points, args.config, args.overrides)
        if args.equal_time:
            points = equal_time_steps(points, args.config, args.overrides, out)
        costs = {p: point_cost(p, args.config, args.overrides) for p in points}  # refuses first
        for point in tqdm(points, desc="study"):
            results = run_point(point, args.config, out, args.overrides)
            rows.append((point, _top1(results, args.eval_set)))
            precisions.add(_eval_precision(results, args.eval_set))
            walls[point] = results["train_wall_s"]
    except (FileNotFoundError, ValueError, RuntimeError) as err:  # no train.py; a failed run
        print(f"error: {err}", file=sys.stderr)
        return 1 if isinstance(err, RuntimeError) else 2
    table = summarise(rows, costs.__getitem__, walls)
    for row in table:  # the runs' eval.precision (one config: one value)
        row["eval_precision"] = ",".join(sorted(precisions))
    write_outputs(table, out, args.title)
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.png'}")
    return 0


# ---------------------------------------------------- eval-time keep ratio of one checkpoint
CHECKPOINT_COLUMNS: list[Column] = [
    ("strategy", lambda r: r["strategy"]),
    ("keep ratio", lambda r: f"{r['keep_ratio']:g}"),
    ("kept tokens", lambda r: str(r["kept_tokens"])),
    ("top-1 (%)", lambda r: f"{r['top1']:.1f}"),
    ("top-5 (%)", lambda r: f"{r['top5']:.1f}"),
    ("images/s", lambda r: f"{r['images_per_s']:.1f}"),
    ("relevance from", lambda r: r.get("relevance_from", "").replace("_", " ") or "-"),
]
KeepFn = Callable[[torch.Tensor], torch.Tensor]


def eval_points(strategies: Sequence[str], ratios: Sequence[float]) -> list[tuple[str, float]]:
    """(strategy, keep ratio) to evaluate: all tokens ("none", 1.0) first, then every strategy
    at every ratio below 1, ratios descending."""
    if any(not 0.0 < r <= 1.0 for r in ratios):
        raise ValueError(f"keep ratios must be in (0, 1], got {list(ratios)}")
    below = sorted({r for r in ratios if r < 1.0}, reverse=True)
    return [("none", 1.0)] + [(s, r) for s in strategies for r in below]


def attentive_keep(teacher: VisionTower, images: torch.Tensor, k: int) -> torch.Tensor:
    """The k patches with the highest CLS relevance of ``teacher`` on ``images`` themselves.

    At eval time the EMA view is the eval image (its box is the whole image), so the relevance
    lies on the eval grid as it is: no box mapping is needed.
    """
    _, relevance_BN = teacher.forward_with_relevance(images)
    return topk_keep(relevance_BN, k, teacher.grid_hw)


def keep_fn(
    strategy: str,
    keep_ratio: float,
    grid_hw: tuple[int, int],
    teacher: VisionTower | None = None,
    seed: int = 0,
) -> KeepFn | None:
    """``images -> LongTensor[B, k]`` for ``strategy`` at ``keep_ratio``; None keeps all tokens.

    ``random`` draws from one CPU generator seeded with ``seed`` (same indices on any device);
    ``attentive`` needs the EMA ``teacher`` vision tower.
    """
    num_patches = grid_hw[0] * grid_hw[1]
    k = num_keep(num_patches, keep_ratio)
    if strategy == "none" or k == num_patches:
        return None
    if strategy == "random":
        gen = torch.Generator().manual_seed(seed)
        return lambda x: random_keep(
            len(x), num_patches, k, grid_hw, generator=gen, device=x.device
        )
    if strategy == "attentive":
        if teacher is None:
            raise ValueError("attentive selection needs the EMA teacher's vision tower")
        return lambda x: attentive_keep(teacher, x, k)
    raise ValueError(f"unknown strategy {strategy!r}; expected none, random or attentive")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedImageEncoder:
    """Stands in for the CLIP in ``zero_shot_logits``: selects the tokens of each batch (teacher
    pass included), encodes them and times both with ``time.perf_counter``."""

    def __init__(self, clip: CLIP, select: KeepFn | None) -> None:
        self.clip, self.select = clip, select
        self.seconds: list[float] = []
        self.images: list[int] = []

    def encode_image(
        self, images: torch.Tensor, keep_idx_BK: torch.Tensor | None = None, normalize: bool = False
    ) -> torch.Tensor:
        """``clip.encode_image`` on the tokens ``select`` keeps (or ``keep_idx_BK``), timed."""
        _sync(images.device)
        start = time.perf_counter()
        keep = self.select(images) if self.select is not None else keep_idx_BK
        emb = self.clip.encode_image(images, keep, normalize)
        _sync(images.device)
        self.seconds.append(time.perf_counter() - start)
        self.images.append(len(images))
        return emb

    def images_per_s(self) -> float:
        """Encoded images per second, the first (warm-up) batch left out when there are more."""
        skip = 1 if len(self.seconds) > 1 else 0
        return sum(self.images[skip:]) / max(sum(self.seconds[skip:]), 1e-12)


def evaluate_point(
    clip: CLIP,
    classifier_DC: torch.Tensor,
    loader: Iterable,
    num_classes: int,
    select: KeepFn | None,
    device: torch.device,
) -> dict[str, float]:
    """Zero-shot top-1/top-5 (%) and images/s of ``clip`` keeping the tokens ``select`` picks."""
    encoder = TimedImageEncoder(clip, select)
    logits, labels = zero_shot_logits(encoder, classifier_DC, loader, device)  # type: ignore[arg-type]
    metrics = classification_metrics(logits, labels, num_classes)
    return {
        "top1": 100.0 * metrics["top1"],
        "top5": 100.0 * metrics["top5"],
        "images_per_s": encoder.images_per_s(),
        "n": len(labels),
    }


def checkpoint_sweep(
    checkpoint: str | Path,
    data: str | Path,
    keep_ratios: Sequence[float] = (1.0, 0.75, 0.5, 0.25),
    strategies: Sequence[str] = ("attentive", "random"),
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 0,
    workers: int = 0,
    model_name: str | None = None,
    precision: str = "fp32",
) -> list[dict]:
    """Zero-shot accuracy and speed of one model at each eval-time keep ratio and strategy,
    the towers run at ``precision`` (``aclip.eval.evaluate.eval_autocast``; each row records it).

    The online model is evaluated on the wds classification set at ``data``; ``attentive``
    keeps the patches the checkpoint's EMA vision tower finds most relevant on the same image
    (a model that is not an aclip run, e.g. an OpenAI or open_clip CLIP: its own vision tower).
    One row per (strategy, keep ratio) plus the all-tokens row ("none", 1.0), as dicts with
    strategy, keep_ratio, kept_tokens, top1, top5 (%), images_per_s, n, relevance_from
    (``ema_teacher`` / ``own_tower`` for attentive rows, empty otherwise) and precision.
    """
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from aclip.data.sets.wds import check_eval_set

    precision = resolve_eval_precision(precision, device)
    check_model_source(checkpoint)  # refuse missing paths before loading any model
    if check_eval_set(data, "zeroshot") == "multilabel":
        raise ValueError(f"{data} is a multilabel set; the keep-ratio sweep reports top-1/top-5 "
                         "and needs a single-label classification set")  # fmt: skip
    device = torch.device(device)
    model = load_model(checkpoint, model_name, device=device)
    clip, teacher, relevance_from = model.clip, None, ""
    if "attentive" in strategies:
        teacher, relevance_from = _relevance_tower(checkpoint, model, device)
    dataset, classnames, templates = load_wds_classification(data, model.transform)
    tokenizer = Tokenizer(model.context_length)
    with eval_autocast(precision, device):
        classifier = zero_shot_classifier(clip, tokenizer, classnames, templates, device)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    grid_hw, rows = clip.visual.grid_hw, []
    for strategy, ratio in tqdm(eval_points(strategies, keep_ratios), desc="keep ratios"):
        select = keep_fn(strategy, ratio, grid_hw, teacher, seed)
        with eval_autocast(precision, device):
            result = evaluate_point(clip, classifier, loader, len(classnames), select, device)
        kept = num_keep(clip.visual.num_patches, ratio)
        source = relevance_from if strategy == "attentive" else ""
        rows.append({"strategy": strategy, "keep_ratio": ratio, "kept_tokens": kept} | result
                    | {"relevance_from": source, "precision": precision})  # fmt: skip
    return rows


def _relevance_tower(
    checkpoint: str | Path, model: EvalModel, device: torch.device
) -> tuple[VisionTower, str]:
    """The tower whose CLS relevance picks the attentive tokens: an aclip run's EMA teacher, or
    (for any other CLIP, which has none) the model's own vision tower."""
    if model.is_aclip_run:
        return load_eval_model(checkpoint, use_ema=True, device=device)[0].visual, "ema_teacher"
    return model.clip.visual, "own_tower"


def _plot_checkpoint(table: list[dict], path: Path, title: str) -> None:
    """Top-1 and images/s against keep ratio, one line per strategy from the all-tokens point."""
    fig, (acc, speed) = _pyplot().subplots(1, 2, figsize=(10, 4))
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


def write_checkpoint_outputs(table: list[dict], out: Path, title: str) -> None:
    """The checkpoint sweep's results.md, results.csv and results.png in ``out``."""
    write_results(table, out, title, CHECKPOINT_COLUMNS, _plot_checkpoint)


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
