"""``python -m aclip.data.synthetic``: write the synthetic shards and sets (flags: --help;
the package docstring describes the layouts)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from aclip.data import synthetic
from aclip.data.synthetic.regions import write_region_sets
from aclip.data.synthetic.scenes import OBJECT_RADIUS
from aclip.data.synthetic.segmentation import write_segmentation_set
from aclip.data.synthetic.shards import write_synthetic


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(
        prog="python -m aclip.data.synthetic", description=synthetic.__doc__.split("\n")[0]
    )
    p.add_argument("--out", required=True)
    p.add_argument("--n-train", type=int, default=6000)
    p.add_argument("--n-eval-cls", type=int, default=500)
    p.add_argument("--n-eval-ret", type=int, default=500)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--object-radius", type=float, nargs=2, default=OBJECT_RADIUS,
                   metavar=("LO", "HI"), help="object radius range, fractions of the side "
                   f"(default {OBJECT_RADIUS[0]} {OBJECT_RADIUS[1]})")  # fmt: skip
    p.add_argument(
        "--n-eval-seg",
        type=int,
        default=0,
        help="also write N segmentation scenes with masks to OUT/eval_seg",
    )
    p.add_argument(
        "--seg-only",
        action="store_true",
        help="write only OUT/eval_seg (the other parts are left as they are)",
    )
    p.add_argument("--n-train-region", type=int, default=0,
                   help="also write N region scenes as shards to OUT/train_region")  # fmt: skip
    p.add_argument("--n-eval-region", type=int, default=0,
                   help="also write N region eval samples to OUT/eval_region")  # fmt: skip
    p.add_argument("--region-only", action="store_true",
                   help="write only the region parts (and eval_seg if asked)")  # fmt: skip
    a = p.parse_args(argv)
    if a.seg_only and a.n_eval_seg < 1:
        p.error("--seg-only needs --n-eval-seg N (N >= 1)")
    if a.region_only and a.n_train_region < 1 and a.n_eval_region < 1:
        p.error("--region-only needs --n-train-region N or --n-eval-region N (N >= 1)")
    t0 = time.perf_counter()
    if a.n_eval_seg > 0:
        write_segmentation_set(Path(a.out) / "eval_seg", a.n_eval_seg, a.image_size, a.seed)
        print(f"wrote {a.n_eval_seg} segmentation scenes to {Path(a.out) / 'eval_seg'}")
    if a.n_train_region > 0 or a.n_eval_region > 0:
        counts = write_region_sets(a.out, a.n_train_region, a.n_eval_region, a.image_size,
                                   a.samples_per_shard, a.seed, a.workers)  # fmt: skip
        print(f"wrote {counts} region samples to {a.out}")
    if a.seg_only or a.region_only:
        return
    counts = write_synthetic(
        a.out, a.n_train, a.n_eval_cls, a.n_eval_ret, a.image_size, a.samples_per_shard,
        a.seed, a.workers, tuple(a.object_radius),
    )  # fmt: skip
    dt = time.perf_counter() - t0
    total = sum(counts.values())
    print(f"wrote {counts} to {a.out} in {dt:.1f}s ({total / dt:.0f} images/s)")


if __name__ == "__main__":
    main()
