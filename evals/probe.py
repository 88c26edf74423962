"""What a checkpoint's towers know about a classification set's classes (feature suppression).

    python -m evals.probe --checkpoint runs/x --data path/to/wds_set [--ema] [--json out.json]
        [--features joint|pooled] [--test-fraction 0.5] [--seed 0] [--C 1.0]

``--checkpoint`` is any CLIP the other eval commands take (an aclip run, an open_clip folder, an
open_clip checkpoint with ``--model-name``, an OpenAI file; ``evals.common``).

Reports, as JSON:
- ``linear_probe``: test top-1 of a logistic-regression probe (scikit-learn's
  ``LogisticRegression(C)`` objective, standardised features, L-BFGS) on the image embeddings,
  trained on a seeded stratified split of the set (``--test-fraction`` held out). ``joint``
  features are the L2-normalised joint-space embeddings zero-shot uses; ``pooled`` the vision
  tower's output before the projection.
- ``text``: mean cosine similarity between the text embeddings of class prompts that differ only
  in the class name (per template, averaged), and between the zero-shot class vectors.
- ``zeroshot_top1``: zero-shot top-1 on the whole set, for reference; ``chance`` = 1 / classes.
- ``precision``: ``--precision`` of the towers (fp32 by default; as the trainer's
  ``eval.precision``).

High prompt cosine with a probe near chance: neither tower learned the attribute the classes
differ in (e.g. shape, when colour alone solved the training batches).
"""

from __future__ import annotations

import argparse
import sys

from aclip.eval.probe import FEATURES
from aclip.studies.probe import probe
from evals.common import add_model_args, report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: prints the report as JSON (exit 2 with ``error: …`` on bad input)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", required=True, help="CLIP_benchmark wds classification set")
    parser.add_argument("--features", choices=FEATURES, default="joint")
    parser.add_argument("--test-fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    parser.add_argument("--C", type=float, default=1.0, help="inverse L2 strength (sklearn's C)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_args(parser)
    args = parser.parse_args(argv)
    return report(
        lambda: probe(
            args.checkpoint,
            args.data,
            args.ema,
            args.features,
            args.test_fraction,
            args.seed,
            args.C,
            args.batch_size,
            args.device,
            not args.no_progress,
            args.workers,
            args.model_name,
            args.precision,
        ),  # fmt: skip
        args.json,
    )


if __name__ == "__main__":
    sys.exit(main())
