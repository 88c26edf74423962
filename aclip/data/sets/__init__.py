"""Evaluation-set readers, one file per format; each registers its format(s) at its end.

``wds`` (CLIP_benchmark webdatasets: classification and retrieval), ``imagefolder`` (ImageFolder
trees: classification) and ``karpathy`` (Karpathy split json: retrieval) are found by
:func:`aclip.data.sets.registry.find_set_format`; see :mod:`aclip.data.sets.registry` for adding
one (a new file registering a ``SetFormat``, and its import below).
"""

from __future__ import annotations

from aclip.data.sets import imagefolder, karpathy, wds  # noqa: F401  (each file registers)
