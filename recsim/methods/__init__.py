"""Continual-update methods: each is one module; `build_method` picks one by `method.name`."""

from recsim.methods.base import METHODS, ContinualMethod, build_method, register
from recsim.methods import evorec, ewc, ftkl, lsat  # noqa: F401  (each registers itself)

__all__ = ["METHODS", "ContinualMethod", "build_method", "register"]
