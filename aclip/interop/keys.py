"""Key layouts: OpenAI's (= open_clip's native ViT CLIP), open_clip with a timm trunk, and
aclip's ``CLIP``; the rules that rename (and reshape) each key from one layout to the other."""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache

from torch import Tensor

from aclip.interop.weights import WeightsError

_VISION_BLOCK = [
    ("ln_1.{p}", "norm1.{p}"),
    ("attn.in_proj_{p}", "attn.qkv.{p}"),
    ("attn.out_proj.{p}", "attn.proj.{p}"),
    ("ln_2.{p}", "norm2.{p}"),
    ("mlp.c_fc.{p}", "mlp.fc1.{p}"),
    ("mlp.c_proj.{p}", "mlp.fc2.{p}"),
]
_TEXT_BLOCK = [
    ("ln_1.{p}", "ln1.{p}"),
    ("attn.in_proj_{p}", "attn.qkv.{p}"),
    ("attn.out_proj.{p}", "attn.proj.{p}"),
    ("ln_2.{p}", "ln2.{p}"),
    ("mlp.c_fc.{p}", "fc1.{p}"),
    ("mlp.c_proj.{p}", "fc2.{p}"),
]
# (OpenAI / open_clip key, aclip key, reshape); the reshape names how the tensors differ
_TEXT_RULES = [
    ("token_embedding.weight", "text.token_embedding.weight", None),
    ("positional_embedding", "text.positional_embedding", None),
    *[(f"transformer.resblocks.{{i}}.{o}", f"text.blocks.{{i}}.{a}", None) for o, a in _TEXT_BLOCK],
    ("ln_final.{p}", "text.ln_final.{p}", None),
    ("text_projection", "text_proj.weight", "transpose"),
    ("logit_scale", "logit_scale", "scalar"),
]
OPENAI_RULES = [
    ("visual.conv1.weight", "visual.vit.patch_embed.proj.weight", None),
    ("visual.class_embedding", "visual.vit.cls_token", "cls"),
    ("visual.positional_embedding", "visual.vit.pos_embed", "pos"),
    ("visual.ln_pre.{p}", "visual.vit.norm_pre.{p}", None),
    *[
        (f"visual.transformer.resblocks.{{i}}.{o}", f"visual.vit.blocks.{{i}}.{a}", None)
        for o, a in _VISION_BLOCK
    ],
    ("visual.ln_post.{p}", "visual.vit.norm.{p}", None),
    ("visual.proj", "image_proj.weight", "transpose"),
    *_TEXT_RULES,
]
# open_clip with a timm trunk (``TimmModel``: ``visual.trunk`` + ``visual.head.proj``)
TIMM_TRUNK_RULES = [
    ("visual.trunk.{rest}", "visual.vit.{rest}", None),
    ("visual.head.proj.weight", "image_proj.weight", None),
    *_TEXT_RULES,
]
LAYOUT_RULES = {"openai": OPENAI_RULES, "open_clip_timm": TIMM_TRUNK_RULES}
_FIELDS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)", "rest": r"(?P<rest>.+)"}


@cache
def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    body = "".join(_FIELDS[p[1:-1]] if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(body + r"\Z")


def _reshape(kind: str | None, value: Tensor, to_aclip: bool, key: str) -> Tensor:
    """OpenAI ↔ aclip tensor shapes: cls [W] ↔ [1,1,W], pos [N,W] ↔ [1,N,W], matrices
    [in,out] ↔ [out,in], logit scale [] ↔ [1]."""
    want = {"cls": 1, "pos": 2, "transpose": 2}.get(kind or "")
    if to_aclip is False and kind in ("cls", "pos"):
        want = 3
    if want is not None and value.dim() != want:
        raise WeightsError(f"{key}: expected a {want}-D tensor, got shape {tuple(value.shape)}")
    if kind == "scalar" and value.numel() != 1:
        raise WeightsError(f"{key}: expected one value, got shape {tuple(value.shape)}")
    if kind == "transpose":
        return value.t().contiguous()
    if kind == "scalar":
        return value.reshape(1) if to_aclip else value.reshape(())
    if kind == "cls":
        return value.reshape(1, 1, -1) if to_aclip else value.reshape(-1)
    if kind == "pos":
        return value.unsqueeze(0) if to_aclip else value[0]
    return value


def _compiled(
    rules: list[tuple[str, str, str | None]], to_aclip: bool
) -> list[tuple[re.Pattern, str, str | None]]:
    src_i, dst_i = (0, 1) if to_aclip else (1, 0)
    return [(_pattern(r[src_i]), r[dst_i], r[2]) for r in rules]


def rename_key(
    key: str, rules: list[tuple[str, str, str | None]], to_aclip: bool
) -> tuple[str, str | None] | None:
    """``key``'s name in the other layout and the reshape it needs; None if no rule knows it."""
    for pattern, target, kind in _compiled(rules, to_aclip):
        match = pattern.match(key)
        if match:
            return target.format(**match.groupdict()), kind
    return None


def convert_keys(
    state_dict: Mapping[str, Tensor], rules: list[tuple[str, str, str | None]], to_aclip: bool
) -> dict[str, Tensor]:
    """Rename (and reshape) every key by ``rules``; refuse keys no rule knows, naming them."""
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        renamed = rename_key(key, rules, to_aclip)
        if renamed is None:
            unknown.append(key)
        else:
            out[renamed[0]] = _reshape(renamed[1], value, to_aclip, key)
    if unknown:
        raise WeightsError(f"keys this layout does not know: {_listed(unknown)}")
    return out


def _listed(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")
