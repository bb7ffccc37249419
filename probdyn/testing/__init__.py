"""Reusable conformance checks and reference models with exact posteriors.

Any engine, including a third-party one registered with `probdyn.register_runner`,
can be checked with the same functions the test suite uses::

    post = probdyn.fit(normal_model, *normal_data().args, engine=MyEngine(...))
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
    ReferenceProblem,
    linear_regression_data,
    linear_regression_model,
    normal_data,
    normal_model,
)

__all__ = [
    "ReferenceProblem",
    "check_accuracy",
    "check_arviz",
    "check_finite",
    "check_layout",
    "check_reproducible",
    "linear_regression_data",
    "linear_regression_model",
    "normal_data",
    "normal_model",
]
