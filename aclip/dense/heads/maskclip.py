"""``maskclip`` (Zhou et al., ECCV 2022; chongzhou96/MaskCLIP): the last block's attention replaced
by the identity, i.e. only the value path ``proj(v)``. Its official ViT backbone keeps the block's
residual and feed-forward around it (``v += x; v = ffn(norm2(v), identity=v)`` in
``mmseg/models/backbones/vit.py``), and so do we (ClearCLIP's re-implementation drops them:
``ignore_residual``). Position embedding: bicubic to the size (its ``vit.py:383-410``)."""

from aclip.dense.heads.base import HeadSpec, register_head

register_head(HeadSpec("maskclip", pos_interp="maskclip", attention=None))
