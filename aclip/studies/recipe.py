"""The recipe study: named variants of config overrides, each trained with ``train.py`` per seed.

A variants file maps a name to ``{base: OTHER, overrides: [section.key=value ...], seeds: [0,
1], note: "...", group: "..."}``; :func:`load_variants` reads it, expanding each variant's
``base`` chain into its effective overrides. :func:`run_variants` trains every variant × seed
(one process per run, in turn, ``OMP_NUM_THREADS=threads``), evaluating the config's zero-shot
sets every ``eval_every`` steps, times each run (wall and CPU seconds of the process and its
loader workers) and, with a probe set, runs the linear probe of ``aclip.studies.probe`` on its
final checkpoint. Finished runs are skipped when the study is run again (an unfinished one is
started afresh). ``aclip.studies.recipe_report`` reads the finished runs back;
``python -m evals.recipe_study`` is the command line.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
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


def load_variants(path: str | Path) -> list[Variant]:
    """Variants from a YAML mapping ``name -> {base, overrides, seeds, note, group}``, in file
    order, each with its effective overrides (:func:`expand_overrides`).

    ``base: OTHER`` names another variant of the file whose effective overrides this one starts
    from (chains allowed); seeds, note and group are the variant's own.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a bad name, key or override, an unknown base or a cycle of bases (naming
            the file and the variant).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"variants file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of variant names")
    variants, bases = [], {}
    for name, spec in data.items():
        if not VARIANT_NAME.fullmatch(str(name)):
            raise ValueError(
                f"{path}: variant name {str(name)!r} is not letters, digits, '.', '_' and '-' "
                "starting with a letter or digit (it names the run's folder under --out)"
            )
        spec = spec or {}
        unknown = set(spec) - {"base", "overrides", "seeds", "note", "group"}
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
        if spec.get("base") is not None:
            bases[str(name)] = str(spec["base"])
    own = {v.name: v.overrides for v in variants}
    return [replace(v, overrides=expand_overrides(v.name, own, bases, path)) for v in variants]


def _override_key(override: str) -> str:
    """The dotted key an override sets (``section.key`` of ``section.key=value``)."""
    return override.split("=", 1)[0].strip()


def merge_overrides(base: Sequence[str], own: Sequence[str]) -> tuple[str, ...]:
    """``base`` then ``own``, the later winning for the same key: an override of a key ``base``
    sets replaces it where it stands (the order of the keys stays the base's), a new key is
    appended."""
    merged = {_override_key(o): o for o in base}
    for override in own:
        merged[_override_key(override)] = override
    return tuple(merged.values())


def expand_overrides(
    name: str, own: dict[str, tuple[str, ...]], bases: dict[str, str], path: str | Path
) -> tuple[str, ...]:
    """The effective overrides of variant ``name``: those of its chain of bases (``bases``:
    variant -> base), the root's first, each merged with the next (:func:`merge_overrides`);
    ``own`` holds each variant's own overrides. A variant without a base keeps its own as they
    are.

    Raises:
        ValueError: a base that is not a variant of the file, or a cycle of bases.
    """
    chain = [name]
    while chain[-1] in bases:
        base = bases[chain[-1]]
        if base not in own:
            raise ValueError(
                f"{path}: variant {chain[-1]!r}: base {base!r} is not a variant of this file"
            )
        if base in chain:
            cycle = " -> ".join([*chain[chain.index(base) :], base])
            raise ValueError(f"{path}: variant {name!r}: its bases form a cycle ({cycle})")
        chain.append(base)
    overrides = own[chain[-1]]
    for variant in reversed(chain[:-1]):
        overrides = merge_overrides(overrides, own[variant])
    return overrides


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

    from aclip.studies.probe import probe

    torch.set_num_threads(threads)
    report = probe(str(run_dir), data, progress=False)
    (run_dir / PROBE).write_text(json.dumps(report, indent=2))


def run_variants(
    config: str,
    variants: list[Variant],
    out: Path,
    overrides: list[str],
    threads: int,
    eval_every: int,
    probe_set: str | None,
) -> None:
    """Train every variant × seed with :func:`run_one` (finished runs are kept).

    Raises:
        FileNotFoundError: no config file at ``config``.
        ValueError: a run folder outside ``out``.
        RuntimeError: a run failed.
    """
    from tqdm import tqdm

    if not Path(config).is_file():
        raise FileNotFoundError(f"config file not found: {config}")
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(v, s) for v in variants for s in v.seeds]
    for variant, seed in tqdm(jobs, desc="recipe study"):
        run_one(config, variant, seed, out, overrides, threads, eval_every, probe_set)
