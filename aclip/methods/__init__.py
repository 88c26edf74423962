"""Training methods, one file each, chosen by name (``method=aclip|clip|flip|alpha_clip``).

A method owns what is specific to a recipe (student, teacher, views, loss, after-step update,
scalars, state); see :mod:`aclip.methods.base` and docs/design.md ("Adding a method"). Adding
one: a new file with a :class:`~aclip.methods.base.Method` subclass decorated with
``@register``, and its import below.
"""

from __future__ import annotations

from aclip.config import Config
from aclip.methods import aclip, alpha_clip, clip  # noqa: F401  (each file registers its methods)
from aclip.methods.base import Method, RunContext
from aclip.methods.registry import METHODS, get_method


def build_method(cfg: Config, ctx: RunContext) -> Method:
    """The method ``cfg.method`` names, for this run (its settings checked first)."""
    method = get_method(cfg.method)
    method.validate(cfg)
    return method(cfg, ctx)


def shape_fields(cfg: Config) -> dict:
    """The config values that decide what a checkpoint of ``cfg``'s run holds (its method's)."""
    return get_method(cfg.method).shape_fields(cfg)


__all__ = ["METHODS", "Method", "RunContext", "build_method", "get_method", "shape_fields"]
