"""Token strategies, one file each, chosen by name (``mask.strategy=none|random|attentive|
gaussian``).

A strategy decides which patch tokens of each online view the student encodes; see
:mod:`aclip.methods.tokens.base` and docs/design.md (A-CLIP steps 3-4). Adding one: a new file
with a :class:`~aclip.methods.tokens.base.TokenStrategy` subclass decorated with
``@register_strategy``, and its import below.
"""

from __future__ import annotations

from aclip.methods.tokens import attentive, gaussian, none, random  # noqa: F401  (each file registers)
from aclip.methods.tokens.attentive import topk_keep
from aclip.methods.tokens.base import (
    STRATEGIES,
    TokenStrategy,
    get_strategy,
    map_relevance_to_views,
    num_keep,
    register_strategy,
)
from aclip.methods.tokens.gaussian import gaussian_keep, gaussian_pdf
from aclip.methods.tokens.random import random_keep
from aclip.methods.tokens.selector import TokenSelector

__all__ = [
    "STRATEGIES",
    "TokenSelector",
    "TokenStrategy",
    "gaussian_keep",
    "gaussian_pdf",
    "get_strategy",
    "map_relevance_to_views",
    "num_keep",
    "random_keep",
    "register_strategy",
    "topk_keep",
]
