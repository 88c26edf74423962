"""Token-keep-ratio study runs: the grid of masking configs, one ``train.py`` run per point.

Each grid point is one ``train.py`` run (its own process, same base config and overrides, same
number of steps; with ``equal_cost`` the same training FLOPs instead, so a run that keeps fewer
tokens takes more steps; with ``equal_time``, after the equal-steps study in the same ``out``,
the same measured training wall time) evaluated on the config's ``eval.zeroshot_sets``;
:func:`summarise` gives each row's steps and measured training wall time and, with
:func:`point_cost`, the analytic model FLOPs per training sample beside the accuracy.
:func:`run_study` runs the whole grid (``python -m evals.keep_ratio study``).
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from aclip.distributed import single_process_env

REPO = Path(__file__).resolve().parents[2]
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


def run_study(
    config: str,
    out: Path,
    strategies: list[str],
    keep_ratios: list[float],
    views: list[int],
    seeds: list[int],
    teacher_sizes: Sequence[int] = (0,),
    equal_cost: bool = False,
    equal_time: bool = False,
    eval_set: str | None = None,
    overrides: Sequence[str] = (),
) -> list[dict]:
    """Run the grid (finished runs reused) and return its summary table, one row per
    (strategy, keep ratio, views, teacher size) with the runs' ``eval_precision``.

    Raises:
        FileNotFoundError: no train.py beside the package (an installed copy).
        ValueError: a bad config or override, a missing timed run (``equal_time``), no
            zero-shot results.
        RuntimeError: a run failed.
    """
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    points = grid(strategies, keep_ratios, views, seeds, teacher_sizes)
    rows, walls, precisions = [], {}, set()
    extra = list(overrides)
    _check_train_py()  # before the config: an installed copy has neither
    if equal_cost:
        points = equal_cost_steps(points, config, extra)
    if equal_time:
        points = equal_time_steps(points, config, extra, out)
    costs = {p: point_cost(p, config, extra) for p in points}  # refuses first
    for point in tqdm(points, desc="study"):
        results = run_point(point, config, out, extra)
        rows.append((point, _top1(results, eval_set)))
        precisions.add(_eval_precision(results, eval_set))
        walls[point] = results["train_wall_s"]
    table = summarise(rows, costs.__getitem__, walls)
    for row in table:  # the runs' eval.precision (one config: one value)
        row["eval_precision"] = ",".join(sorted(precisions))
    return table
