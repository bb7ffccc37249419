"""Reusable conformance checks and reference models with exact posteriors.

Any engine, including a third-party one registered with `probdyn.register_runner`,
can be checked with the same functions the test suite uses::

    post = probdyn.fit(normal_model, *normal_data().args, engine=MyEngine(...))
    # the same model in Pyro: reference_model("normal", "pyro") is normal_model_pyro
    check_layout(post, {"mu": ()})
    check_arviz(post)
    check_accuracy(post, "mu", *normal_data().exact)
"""

from probdyn.testing._checks import (
    check_accuracy,
    check_arviz,
    check_finite,
    check_layout,
    check_reproducible,
)
from probdyn.testing._models import (
    REFERENCE_MODELS,
    ReferenceProblem,
    linear_regression_data,
    linear_regression_model,
    linear_regression_model_pyro,
    normal_data,
    normal_model,
    normal_model_pyro,
    reference_model,
)

__all__ = [
    "REFERENCE_MODELS",
    "ReferenceProblem",
    "check_accuracy",
    "check_arviz",
    "check_finite",
    "check_layout",
    "check_reproducible",
    "linear_regression_data",
    "linear_regression_model",
    "linear_regression_model_pyro",
    "normal_data",
    "normal_model",
    "normal_model_pyro",
    "reference_model",
]
