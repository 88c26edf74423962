"""``python -m aclip.bench [step options]`` or ``python -m aclip.bench loader [options]``."""

from __future__ import annotations

import argparse
import sys

import torch

from aclip.bench import common
from aclip.bench.loader import LoaderOptions, loader_table, run_loader_bench
from aclip.bench.step import DEFAULT_MODES, MODES, PRESETS, StepOptions, run_step_bench, step_table


def step_parser() -> argparse.ArgumentParser:
    """Options of the training-step benchmark."""
    p = argparse.ArgumentParser(
        prog="python -m aclip.bench",
        description="Time one training step of open_clip's CLIP and of our CLIP / FLIP / A-CLIP "
        "on the same batch and device; print a table of ratios and write JSON. "
        "`python -m aclip.bench loader --help` for the data-loader benchmark.",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="vit_b16",
        help="vit_b16 (the GPU benchmark) or tiny (a quick CPU run)",
    )
    p.add_argument("--batch", type=int, help="per-device batch (preset default: 64 / 32)")
    p.add_argument(
        "--precision",
        choices=["bf16", "fp16", "fp32"],
        default="bf16",
        help="GPU precision (the CPU always runs fp32)",
    )
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(DEFAULT_MODES))
    p.add_argument("--warmup", type=int, help="untimed steps per mode")
    p.add_argument("--steps", type=int, help="timed steps per mode (the median is reported)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        help="peak TFLOP/s for MFU (default: bf16 table for H100/H200/A100)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for our modes, e.g. model.grad_checkpointing=true",
    )
    p.add_argument(
        "--profile",
        dest="profile_dir",
        metavar="DIR",
        help="torch.profiler tables and traces of the timed steps into DIR",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (1 is steadier on a CPU shared with others)",
    )
    p.add_argument("--json", help="write the results here")
    return p  # fmt: skip


def loader_parser() -> argparse.ArgumentParser:
    """Options of the data-loader benchmark."""
    p = argparse.ArgumentParser(
        prog="python -m aclip.bench loader",
        description="A-CLIP samples/s per worker core through build_train_loader on "
        "img2dataset-style shards of 256-px JPEGs (written to a temp dir unless --shards).",
    )
    p.add_argument("--shards", help="brace spec of existing shards (default: write them)")
    p.add_argument("--samples", type=int, default=1024, help="samples to write")
    p.add_argument("--src-size", type=int, default=256, help="shorter side of written JPEGs")
    p.add_argument("--image-size", type=int, default=224, help="model image size")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batches", type=int, default=12, help="timed batches per worker count")
    p.add_argument(
        "--uint8",
        type=lambda v: v.lower() in ("1", "true", "yes"),
        nargs="+",
        default=[False, True],
        metavar="BOOL",
        help="views as uint8 (normalised on the GPU) or float: both by default",
    )
    p.add_argument(
        "--augment-on",
        nargs="+",
        choices=["cpu", "gpu"],
        default=["cpu"],
        help="data.augment_on: views made by the loader (cpu) or on the device (gpu: the "
        "loader's half timed per core, the device's half per batch)",
    )
    p.add_argument("--json", help="write the results here")
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Run the step benchmark, or the loader benchmark when the first argument is ``loader``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loader"]:
        args = vars(loader_parser().parse_args(argv[1:]))
        path = args.pop("json")
        payload = run_loader_bench(LoaderOptions(**args))
        print(loader_table(payload))
    else:
        args = vars(step_parser().parse_args(argv))
        path, threads = args.pop("json"), args.pop("threads")
        if threads:
            torch.set_num_threads(threads)
        payload = run_step_bench(StepOptions(**args))
        print(step_table(payload))
    common.write_json(path, payload)
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
