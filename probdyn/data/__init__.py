"""Small datasets shipped with probdyn or generated with a fixed seed (NumPy only)."""

from probdyn.data._gp_tasks import (
    GPPredictive,
    GPTaskBatch,
    gp_oracle,
    gp_tasks,
    mean_log_likelihood,
)
from probdyn.data._predator_prey import (
    HARE_LYNX,
    PredatorPreyData,
    hare_lynx,
    lotka_volterra,
    synthetic_predator_prey,
)

__all__ = [
    "HARE_LYNX",
    "GPPredictive",
    "GPTaskBatch",
    "PredatorPreyData",
    "gp_oracle",
    "gp_tasks",
    "hare_lynx",
    "lotka_volterra",
    "mean_log_likelihood",
    "synthetic_predator_prey",
]
