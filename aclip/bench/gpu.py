"""``make bench-gpu``: the prepared one-GPU check, in one process, in under 8 minutes.

    python -m aclip.bench.gpu --out runs/bench/gpu            # one GPU: ViT-B/16, batch 64, bf16
    python -m aclip.bench.gpu --cpu --preset tiny --out DIR   # the CPU smoke run (tests)

Runs, in this order, each phase only while the time budget lasts (``--budget-s``; a phase
that would not fit is recorded as skipped, never silently dropped):

1. the loader benchmark (``aclip.bench.loader``): the CPU view path and the GPU view path
   (``data.augment_on=gpu``: the loader's half per core, the device's half per batch);
2. the step benchmark (``aclip.bench.step``) of open_clip's CLIP step, our CLIP, FLIP, A-CLIP
   and A-CLIP with the cheaper teacher (``ema.image_size`` = half the model's), eager;
3. the same modes with ``torch.compile`` (``model.compile=true``; open_clip's model compiled
   the same way), last: compiling five graphs is the longest phase.

Writes ``bench_gpu.json`` (every payload, the environment, the phases' times) and
``bench_gpu.md`` (the tables) into ``--out``. Without a GPU it refuses (exit 2) unless told to
run on the CPU (``--cpu``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from aclip.bench import common
from aclip.bench.loader import LoaderOptions, loader_table, run_loader_bench
from aclip.bench.step import PRESETS, StepOptions, run_step_bench, step_table

GPU_MODES = ["openclip", "clip", "flip", "aclip", "aclip_cheap"]
# seconds each phase is expected to need at most (ViT-B/16 batch 64 on one H100-class GPU)
PHASE_ESTIMATE_S = {"eager": 120.0, "compiled": 300.0, "loader": 60.0}
TINY_ESTIMATE_S = {"eager": 60.0, "compiled": 180.0, "loader": 30.0}


def parser() -> argparse.ArgumentParser:
    """The command line of the GPU check."""
    p = argparse.ArgumentParser(prog="python -m aclip.bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", default="runs/bench/gpu", help="directory for the JSON and table")
    p.add_argument("--preset", choices=sorted(PRESETS), default="vit_b16")
    p.add_argument("--batch", type=int, default=None, help="per-device batch (preset default)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per mode")
    p.add_argument("--modes", nargs="+", choices=GPU_MODES, default=list(GPU_MODES),
                   help="step modes (default: all five)")  # fmt: skip
    p.add_argument("--cpu", action="store_true", help="run on the CPU (a smoke test)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile phase")
    p.add_argument("--budget-s", type=float, default=450.0, help="time budget of the run")
    p.add_argument("--loader-samples", type=int, default=1024)
    p.add_argument("--loader-batches", type=int, default=8)
    p.add_argument("--loader-batch", type=int, default=64)
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for our modes")  # fmt: skip
    return p


def _step_options(args: argparse.Namespace, compiled: bool) -> StepOptions:
    warmup = args.warmup if args.warmup is not None else (5 if compiled else None)
    overrides = [*args.overrides, *(["model.compile=true"] if compiled else [])]
    return StepOptions(preset=args.preset, batch=args.batch, precision="bf16",
                       modes=list(args.modes), warmup=warmup, steps=args.steps,
                       overrides=overrides)  # fmt: skip


def _loader_options(args: argparse.Namespace) -> LoaderOptions:
    size = 224 if args.preset == "vit_b16" else 64
    return LoaderOptions(samples=args.loader_samples, src_size=size * 8 // 7, image_size=size,
                         batch=args.loader_batch, workers=[0], uint8=[True],
                         augment_on=["cpu", "gpu"],
                         batches=args.loader_batches, warmup_batches=1)  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every phase that fits the budget; returns the JSON payload."""
    start = time.perf_counter()
    estimates = TINY_ESTIMATE_S if args.preset == "tiny" else PHASE_ESTIMATE_S
    phases: dict[str, Any] = {}
    # cheapest and most needed first: torch.compile's phase (compilation per mode) runs last
    plan = [
        ("loader", lambda: run_loader_bench(_loader_options(args))),
        ("eager", lambda: run_step_bench(_step_options(args, compiled=False))),
    ]
    if not args.no_compile:
        plan.append(("compiled", lambda: run_step_bench(_step_options(args, compiled=True))))
    timings, skipped = {}, []
    for name, phase in plan:
        left = args.budget_s - (time.perf_counter() - start)
        if left < estimates[name]:
            skipped.append(f"{name}: {left:.0f} s of the budget left, needs ~{estimates[name]:.0f}")
            print(f"[bench-gpu] skipping {name} ({skipped[-1]})", flush=True)
            continue
        print(f"[bench-gpu] {name} ({left:.0f} s of the budget left)", flush=True)
        t0 = time.perf_counter()
        phases[name] = phase()
        timings[name] = time.perf_counter() - t0
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    return {
        "kind": "bench-gpu",
        "environment": common.environment(device),
        "preset": args.preset,
        "phases": phases,
        "phase_seconds": timings,
        "skipped": skipped,
        "elapsed_s": time.perf_counter() - start,
    }


def markdown(payload: dict[str, Any]) -> str:
    """The phases' tables as one markdown document."""
    env = payload["environment"]
    lines = [f"# bench-gpu: {env['device']}, {env['date']}, preset {payload['preset']}", ""]
    titles = {"eager": "Training step, eager", "compiled": "Training step, torch.compile",
              "loader": "Data loader (CPU view path vs GPU view path)"}  # fmt: skip
    for name, phase in payload["phases"].items():
        table = loader_table(phase) if name == "loader" else step_table(phase)
        lines += [f"## {titles[name]} ({payload['phase_seconds'][name]:.0f} s)", "", table, ""]
    lines += [f"skipped: {s}" for s in payload["skipped"]]
    lines.append(f"total {payload['elapsed_s']:.0f} s")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Refuse without a GPU unless ``--cpu``; run; write the JSON and the table."""
    args = parser().parse_args(argv)
    if args.cpu:
        if torch.cuda.is_available():
            print("error: --cpu given but a GPU is visible: hide it (CUDA_VISIBLE_DEVICES=) to "
                  "run the CPU smoke test", file=sys.stderr)  # fmt: skip
            return 2
    elif not torch.cuda.is_available():
        print("error: no GPU (torch.cuda.is_available() is False): make bench-gpu needs one; "
              "pass --cpu (with --preset tiny) for the CPU smoke run", file=sys.stderr)  # fmt: skip
        return 2
    out = Path(args.out)
    payload = run(args)
    common.write_json(out / "bench_gpu.json", payload)
    (out / "bench_gpu.md").write_text(markdown(payload))
    print(markdown(payload))
    print(f"wrote {out / 'bench_gpu.json'} and {out / 'bench_gpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
