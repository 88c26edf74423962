"""The probe of one model on a classification set: what its towers know about the classes.

:func:`probe` loads a model (any CLIP the eval command lines take) and reports a linear probe
on its image embeddings, the similarity of its class prompts and its zero-shot top-1
(``aclip.eval.probe`` holds the measurements; ``python -m evals.probe`` is the command line;
the recipe study probes each final checkpoint with it).
"""

from __future__ import annotations

from torch.utils.data import DataLoader

from aclip.data.sets.wds import load_wds_classification, shard_paths
from aclip.eval.evaluate import eval_autocast, resolve_eval_precision, zero_shot_classifier
from aclip.eval.probe import FEATURES, encode_images, linear_probe, prompt_similarity
from aclip.interop.reader import check_model_source, load_model
from aclip.tokenizer import Tokenizer


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
