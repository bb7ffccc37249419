"""Small datasets shipped with probdyn or generated with a fixed seed (NumPy only)."""

from probdyn.data._predator_prey import (
    HARE_LYNX,
    PredatorPreyData,
    hare_lynx,
    lotka_volterra,
    synthetic_predator_prey,
)

__all__ = [
    "HARE_LYNX",
    "PredatorPreyData",
    "hare_lynx",
    "lotka_volterra",
    "synthetic_predator_prey",
]
