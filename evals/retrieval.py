"""Image<->text retrieval recall@1/5/10 of any CLIP, counted as CLIP_benchmark counts it.

    python -m evals.retrieval --checkpoint runs/x --data path/to/wds_retrieval_set [--ema]
    python -m evals.retrieval --checkpoint runs/x --karpathy-json dataset_flickr30k.json \\
                              --images flickr30k_images [--split test] [--json out.json]
    python -m evals.retrieval --checkpoint exports/x --data ...           (an open_clip folder)
    python -m evals.retrieval --checkpoint ViT-B-16.pt --data ...         (an OpenAI release)
    python -m evals.retrieval --checkpoint model.safetensors --model-name ViT-B-16 --data ...

``--checkpoint``: an aclip run, or any CLIP ``aclip.interop.load_clip`` reads (see
``evals.common``); an imported model is evaluated with its own preprocessing (``preprocess_cfg``).

``--data``: a set of any registered retrieval format, found by its layout
(``aclip.data.sets.registry``): a CLIP_benchmark wds set, a Karpathy ``*.json`` (its images
under ``--images``, default: the json's folder), ...; ``--karpathy-json`` names the Karpathy
format explicitly (and needs ``--images``).

``aclip-retrieval`` (installed with the package) takes the same arguments.

``image_retrieval_recall@k`` is text -> image, ``text_retrieval_recall@k`` is image -> text;
``precision`` is ``--precision`` (fp32 by default; the rule of the trainer's ``eval.precision``).
"""

from __future__ import annotations

import argparse
import sys

from torch.utils.data import DataLoader, Dataset, IterableDataset

from aclip.data.sets.registry import prepare_set
from aclip.data.sets.wds import retrieval_collate
from aclip.eval.evaluate import eval_autocast, resolve_eval_precision
from aclip.eval.retrieval import evaluate_retrieval
from aclip.tokenizer import Tokenizer
from evals.common import add_model_args, check_model_source, load_model, report

DEFAULT_SPLIT = "test"


def _dataset_builder(data: str | None, karpathy_json: str | None, images: str | None, split: str):
    """Check the data paths now (before the model loads); return ``transform -> dataset``.
    ``data``: any registered retrieval format (``aclip.data.sets.registry``), found by its
    layout; ``karpathy_json``: a Karpathy split json, its images under ``images``."""
    if (data is None) == (karpathy_json is None):
        raise ValueError("give either an evaluation set (data) or a Karpathy json (karpathy_json)")
    if karpathy_json is not None and images is None:
        raise ValueError("a Karpathy json needs the images folder (images)")
    path, format_name = (data, None) if data is not None else (karpathy_json, "karpathy")
    options = {"images": images, "split": None if split == DEFAULT_SPLIT else split}
    return prepare_set(path, "retrieval", format_name, **options)


def _loader(dataset: Dataset | IterableDataset, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=retrieval_collate
    )


def retrieval(
    checkpoint: str,
    data: str | None = None,
    karpathy_json: str | None = None,
    images: str | None = None,
    split: str = "test",
    use_ema: bool = False,
    batch_size: int = 256,
    workers: int = 0,
    device: str = "cpu",
    progress: bool = True,
    model_name: str | None = None,
    precision: str = "fp32",
) -> dict[str, float]:
    """Recall@1/5/10 both ways of ``checkpoint`` (an aclip run or any CLIP
    ``evals.common.load_model`` reads; ``model_name`` for an open_clip weights file) on a
    set of any registered format (``data``) or a Karpathy split (``karpathy_json`` +
    ``images``), plus the set's size and the ``precision`` (``aclip.eval.evaluate.eval_autocast``).

    Every path is checked before the model is loaded.
    """
    precision = resolve_eval_precision(precision, device)
    check_model_source(checkpoint)
    build_dataset = _dataset_builder(data, karpathy_json, images, split)
    model = load_model(checkpoint, model_name, use_ema, device)
    dataset = build_dataset(model.transform)
    tokenizer = Tokenizer(model.context_length)
    loader = _loader(dataset, batch_size, workers)
    with eval_autocast(precision, device):
        metrics = evaluate_retrieval(model.clip, tokenizer, loader, device, progress=progress)
    return metrics | {"precision": precision}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data", help="evaluation set of any registered format: wds set, Karpathy json, ..."
    )
    source.add_argument("--karpathy-json", help="dataset_flickr30k.json / dataset_coco.json")
    parser.add_argument("--images", help="image folder of the Karpathy json")
    parser.add_argument("--split", default=DEFAULT_SPLIT, help="split to evaluate (default: test)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: prints the metrics as JSON, optionally writes them to a file."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.karpathy_json and not args.images:
        parser.error("--karpathy-json needs --images")
    return report(
        lambda: retrieval(
            args.checkpoint,
            args.data,
            args.karpathy_json,
            args.images,
            args.split,
            args.ema,
            args.batch_size,
            args.workers,
            args.device,
            not args.no_progress,
            args.model_name,
            args.precision,
        ),  # fmt: skip
        args.json,
    )


if __name__ == "__main__":
    sys.exit(main())
