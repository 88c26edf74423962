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

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from aclip.data.sets.wds import load_wds_classification, shard_paths
from aclip.eval.evaluate import eval_autocast, resolve_eval_precision, zero_shot_classifier
from aclip.eval.probe import linear_probe, prompt_similarity
from aclip.model.clip import CLIP
from aclip.tokenizer import Tokenizer
from evals.common import add_model_args, check_model_source, load_model, report

FEATURES = ("joint", "pooled")


@torch.no_grad()
def encode_images(
    clip: CLIP, loader: DataLoader, device: torch.device | str, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pooled [N, width], joint L2-normalised [N, embed_dim], labels [N]) on the CPU."""
    pooled, joint, labels = [], [], []
    for images, y in tqdm(loader, desc="images", disable=not progress):
        p = clip.visual(images.to(device))
        pooled.append(p.float().cpu())
        joint.append(clip.project_image(p, normalize=True).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(pooled), torch.cat(joint), torch.cat(labels)


def probe(
    checkpoint: str,
    data: str,
    use_ema: bool = False,
    features: str = "joint",
    test_fraction: float = 0.5,
    seed: int = 0,
    C: float = 1.0,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = True,
    workers: int = 0,
    model_name: str | None = None,
    precision: str = "fp32",
) -> dict:
    """Linear probe, class-prompt similarity and zero-shot top-1 of ``checkpoint`` on the wds
    classification set ``data`` (paths are checked before the model loads); the towers and the
    prompt similarities run at ``precision`` (``aclip.eval.evaluate.eval_autocast``), the linear
    probe and the zero-shot logits in fp32."""
    precision = resolve_eval_precision(precision, device)
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    if not 0.0 < test_fraction < 1.0 or C <= 0:
        raise ValueError(f"need 0 < test_fraction < 1 and C > 0 (got {test_fraction}, {C})")
    check_model_source(checkpoint)
    shard_paths(data)
    load_wds_classification(data, lambda image: image)  # class names and templates exist
    model = load_model(checkpoint, model_name, use_ema, device)
    clip = model.clip
    dataset, classnames, templates = load_wds_classification(data, model.transform)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    tokenizer = Tokenizer(model.context_length)
    with eval_autocast(precision, device):
        pooled, joint, labels = encode_images(clip, loader, device, progress)
        classifier_DC = zero_shot_classifier(clip, tokenizer, classnames, templates, device).cpu()
        text = prompt_similarity(clip.encode_text, tokenizer, classnames, templates, device)
    zeroshot_top1 = ((joint @ classifier_DC.float()).argmax(1) == labels).float().mean().item()
    feats = joint if features == "joint" else pooled
    result = linear_probe(feats, labels, len(classnames), test_fraction, seed, C)
    return {
        "n": len(labels),
        "num_classes": len(classnames),
        "chance": 1.0 / len(classnames),
        "linear_probe": result | {"features": features},
        "zeroshot_top1": zeroshot_top1,
        "text": text,
        "ema": use_ema,
        "precision": precision,
    }


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
