"""Training-free dense heads on a CLIP image tower: per-patch embeddings in the joint space.

One file per head, each registering a :class:`HeadSpec` (its formula, source and
position-embedding resampling in the file's docstring): ``vanilla``, ``maskclip`` (MaskCLIP),
``sclip`` (SCLIP), ``clearclip`` (ClearCLIP), ``cliper`` (CLIPer). :class:`DenseHead` runs one; the
tower pieces they share are :mod:`aclip.dense.tower`. A new head is one new file here, imported
below (the order of the imports is the order of ``--head all``).

``ignore_residual`` (ClearCLIP's ``base_config.py`` sets it for every ``model_type``, so its
vanilla, MaskCLIP and SCLIP comparison rows run so): ``vanilla``, ``maskclip`` and ``sclip`` give
their last block's attention output alone, ``proj(A v)``, without residual and feed-forward.
"""

# isort: off
from aclip.dense.heads import vanilla, maskclip, sclip, clearclip, cliper  # noqa: F401

# isort: on
from aclip.dense.heads.base import (
    DenseHead,
    HeadSpec,
    get_head,
    head_names,
    last_block,
    register_head,
)
from aclip.dense.heads.cliper import fuse_attention
from aclip.dense.tower import POS_INTERP, DenseOutput, embed_tokens, resample_pos_embed

HEADS: tuple[str, ...] = head_names()
# each head's own position-embedding resampling on another grid (``pos_interp: head``)
HEAD_POS_INTERP = {name: get_head(name).pos_interp for name in HEADS}

__all__ = [
    "HEADS",
    "HEAD_POS_INTERP",
    "POS_INTERP",
    "DenseHead",
    "DenseOutput",
    "HeadSpec",
    "embed_tokens",
    "fuse_attention",
    "get_head",
    "last_block",
    "register_head",
    "resample_pos_embed",
]
