"""``python -m aclip.interop PATH``: the ``model:`` config section (and preprocess) of a
pretrained CLIP, to write a run config that starts from it."""

from __future__ import annotations

from dataclasses import fields

from aclip.config import ModelConfig
from aclip.interop.read import read_weights
from aclip.interop.weights import WeightsError


def model_yaml(model_cfg: ModelConfig) -> str:
    """The ``model:`` section of a run config that builds exactly this model: every
    ``ModelConfig`` field (taken from the dataclass, so a new field is printed too) but the
    run-time ones of ``RUNTIME_MODEL_KEYS`` (where the weights come from, recomputation,
    compilation), which a checkpoint also leaves free."""
    from omegaconf import OmegaConf

    from aclip.methods.base import RUNTIME_MODEL_KEYS

    keys = [f.name for f in fields(ModelConfig) if f.name not in RUNTIME_MODEL_KEYS]
    section = {k: getattr(model_cfg, k) for k in keys}
    section["vision_kwargs"] = dict(section["vision_kwargs"])
    return OmegaConf.to_yaml({"model": section})


def main(argv: list[str] | None = None) -> int:
    """``python -m aclip.interop PATH [--model-name NAME]``: print the ``model:`` config section
    and the preprocess of a pretrained CLIP (to write a run config that starts from it)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("path", help="OpenAI file, open_clip checkpoint or folder, aclip run")
    parser.add_argument("--model-name", help="open_clip model name or open_clip_config.json")
    args = parser.parse_args(argv)
    try:
        weights = read_weights(args.path, args.model_name)
    except (WeightsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(model_yaml(weights.model_cfg), end="")
    print(f"# preprocess: {weights.preprocess}")
    for note in weights.notes:
        print(f"# {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
