"""Export an aclip run's CLIP (or any CLIP the one reader, ``aclip.interop.reader``, reads) for
open_clip, OpenAI-layout tools or timm.

    python -m aclip.interop.export --checkpoint RUN_OR_TAG --out DIR [--ema] \\
        [--format open_clip|openai|timm] [--overwrite] [--no-verify]

open_clip (default): DIR holds ``open_clip_config.json`` (model_cfg + the run's preprocess_cfg)
and ``open_clip_model.safetensors``; ``open_clip.create_model_and_transforms("local-dir:DIR")``
loads it strictly, and the folder can be pushed to a model hub as it is. openai: DIR/
``openai_clip.pt``, a plain state dict in OpenAI's layout. timm: the vision tower, with the image
projection as its head, as a timm folder (``timm.create_model("local-dir:DIR", pretrained=True)``).

The folder is written beside DIR and moved into place once it has been checked: by default it is
loaded back by its peer library (open_clip, aclip's OpenAI reader, timm) and its features are
compared with the run's on a random batch. A model the format cannot express (for open_clip: a
vision tower that is neither CLIP architecture nor a timm trunk open_clip can name) is refused
with the reason, exit code 2.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aclip.interop import (
    NotExpressible,
    Preprocess,
    WeightsError,
    export_open_clip,
    export_timm,
    to_aclip_state_dict,
    to_openai_state_dict,
)
from aclip.interop.reader import load_model
from aclip.interop.safe_load import add_trust_argument
from aclip.model.clip import CLIP
from aclip.tokenizer import Tokenizer

FORMATS = ("open_clip", "openai", "timm")
OPENAI_FILE = "openai_clip.pt"
VERIFY_ATOL = 1e-4  # fp32 features of two implementations of the same model
PROBE_CAPTIONS = ["a photo of a dog", "a red square on a white background"]


def _probe(size: int, context_length: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, size, size, generator=gen)
    return images, Tokenizer(context_length)(PROBE_CAPTIONS)


def _max_diff(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _verify_open_clip(clip: CLIP, out: Path, images: Tensor, tokens: Tensor) -> float:
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    with torch.no_grad():
        return max(
            _max_diff(model.encode_image(images), clip.encode_image(images)),
            _max_diff(model.encode_text(tokens), clip.encode_text(tokens)),
        )


def _verify_openai(clip: CLIP, out: Path, images: Tensor, tokens: Tensor) -> float:
    """OpenAI's layout holds no head counts, so read it back into the run's own architecture:
    every tensor must come back bit-exact (the difference returned is over all weights)."""
    back = to_aclip_state_dict(torch.load(out / OPENAI_FILE, map_location="cpu", weights_only=True))
    ours = clip.state_dict()
    if set(back) != set(ours):
        return float("inf")
    return max(_max_diff(back[k], v) for k, v in ours.items())


def openai_head_note(clip: CLIP) -> str | None:
    """A warning when the model's heads are not OpenAI's 64 wide (the layout cannot say so)."""
    vit_heads = clip.visual.vit.blocks[0].attn.num_heads
    text_heads = clip.text.blocks[0].attn.heads
    if clip.visual.width == 64 * vit_heads and clip.text.width == 64 * text_heads:
        return None
    return (
        f"note: OpenAI's layout records no head counts and readers that infer them (OpenAI's "
        f"build_model, open_clip's OpenAI loader, aclip without a model name) assume 64-wide "
        f"heads; this model has {vit_heads} vision heads (width {clip.visual.width}) and "
        f"{text_heads} text heads (width {clip.text.width}): give readers these sizes"
    )


def _verify_timm(clip: CLIP, out: Path, images: Tensor, tokens: Tensor) -> float:
    import timm

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        return _max_diff(model(images), clip.encode_image(images))


def _write(fmt: str, clip: CLIP, out: Path, preprocess: Preprocess) -> None:
    if fmt == "open_clip":
        export_open_clip(clip, out, preprocess)
    elif fmt == "openai":
        out.mkdir(parents=True)
        torch.save(to_openai_state_dict(clip), out / OPENAI_FILE)
    else:
        export_timm(clip, out, preprocess)


VERIFY: dict[str, Callable[[CLIP, Path, Tensor, Tensor], float]] = {
    "open_clip": _verify_open_clip,
    "openai": _verify_openai,
    "timm": _verify_timm,
}


def export(
    checkpoint: str | Path,
    out: str | Path,
    fmt: str = "open_clip",
    use_ema: bool = False,
    overwrite: bool = False,
    verify: bool = True,
) -> dict[str, Any]:
    """Export ``checkpoint``'s CLIP (``use_ema``: the EMA image side) to ``out`` in ``fmt``.

    Returns ``diff``, the largest difference the check found (features; for ``openai`` the
    weights read back; None without ``verify``), and ``notes`` for the user.

    Raises:
        FileExistsError: ``out`` exists and is not empty, without ``overwrite``.
        NotExpressible: the model cannot be written in ``fmt`` (the reason is in the message).
        RuntimeError: the written export does not give the run's features.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    loaded = load_model(checkpoint, use_ema=use_ema, action="export")
    clip, preprocess = loaded.clip, loaded.preprocess  # a run's: OpenAI's mean and std
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _write(fmt, clip, partial, preprocess)
        diff = None
        if verify:
            probe = _probe(preprocess.size, loaded.context_length)
            diff = VERIFY[fmt](clip, partial, *probe)
            if not diff <= VERIFY_ATOL:
                raise RuntimeError(
                    f"the {fmt} export gives features {diff:.2e} away from the run's"
                )
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    notes = [n for n in [openai_head_note(clip)] if n and fmt == "openai"]
    return {"diff": diff, "notes": notes}


def loading_lines(fmt: str, out: Path) -> list[str]:
    """The lines that load the export in its peer library."""
    if fmt == "open_clip":
        return [
            "import open_clip",
            f'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{out}")',
            f'tokenizer = open_clip.get_tokenizer("local-dir:{out}")',
        ]
    if fmt == "timm":
        return ["import timm", f'model = timm.create_model("local-dir:{out}", pretrained=True)']
    return [
        "from aclip.interop import load_clip  # or timm's checkpoint_filter_fn for the image tower",
        f'clip, model_cfg, preprocess = load_clip("{out / OPENAI_FILE}")',
    ]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="run dir, checkpoints dir or tag dir (or an open_clip folder, an OpenAI file)",
    )
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--format", default="open_clip", choices=FORMATS)
    parser.add_argument("--ema", action="store_true", help="image side from the EMA teacher")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--no-verify", action="store_true", help="skip loading the export back")
    add_trust_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; exit code 2 with ``error: ...`` for a refusal or a bad path."""
    args = _parser().parse_args(argv)
    try:
        result = export(
            args.checkpoint, args.out, args.format, args.ema, args.overwrite, not args.no_verify
        )
    except (FileNotFoundError, FileExistsError, NotExpressible, WeightsError, ValueError) as err:
        prefix = "cannot export: " if isinstance(err, NotExpressible) else ""
        print(f"error: {prefix}{err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # the written export did not give the run's features
        print(f"error: {err}", file=sys.stderr)
        return 1
    diff, what = result["diff"], "weight" if args.format == "openai" else "feature"
    checked = "not checked" if diff is None else f"checked: max {what} difference {diff:.1e}"
    print(f"wrote {args.format} export of {args.checkpoint} to {args.out} ({checked})")
    for note in result["notes"]:
        print(note)
    print("load it with:")
    for line in loading_lines(args.format, Path(args.out)):
        print(f"    {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
