"""Small datasets shipped with probdyn or generated with a fixed seed (NumPy only)."""

from probdyn.data._gp_tasks import (
    GPPredictive,
    GPTaskBatch,
    gp_oracle,
    gp_tasks,
    mean_log_likelihood,
)
from probdyn.data._ou import OUData, OUPredictive, ou_dataset, ou_oracle
from probdyn.data._predator_prey import (
    HARE_LYNX,
    PredatorPreyData,
    hare_lynx,
    lotka_volterra,
    synthetic_predator_prey,
)
from probdyn.data._spirals import SpiralData, spirals
from probdyn.data._tasks import TASK_FIELDS, TaskStream, gp_task_stream, stream_rng

__all__ = [
    "HARE_LYNX",
    "TASK_FIELDS",
    "GPPredictive",
    "GPTaskBatch",
    "OUData",
    "OUPredictive",
    "PredatorPreyData",
    "SpiralData",
    "TaskStream",
    "gp_oracle",
    "gp_task_stream",
    "gp_tasks",
    "hare_lynx",
    "lotka_volterra",
    "mean_log_likelihood",
    "ou_dataset",
    "ou_oracle",
    "spirals",
    "stream_rng",
    "synthetic_predator_prey",
]
