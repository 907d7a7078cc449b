"""Continual-update methods: each is one module; `build_method` picks one by `method.name`."""

from recsim.methods.base import METHODS, ContinualMethod, build_method, register
from recsim.methods import evorec, ewc, ftkl, lsat  # noqa: F401  (each registers itself)
from recsim.methods import cumulative  # noqa: F401  (sumlora, sdlora, inflora)
from recsim.methods import proximal  # noqa: F401  (single_lora, peso, prox_l2, prox_output_kl, prox_orthogonal)
from recsim.methods import distill  # noqa: F401  (a small student from a trained teacher run)

__all__ = ["METHODS", "ContinualMethod", "build_method", "register"]
