"""Tsitouras 5(4) for torchdiffeq, the shared default solver of the Pyro `NeuralODE`.

torchdiffeq has no Tsitouras 5(4) pair (diffrax's ``Tsit5``, the NumPyro backend's
default), so importing this module adds one to torchdiffeq's solver table, under the
name `METHOD` (``"probdyn_tsit5"``), from the coefficients of Tsitouras (2011).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchdiffeq._impl.odeint import SOLVERS as _TORCHDIFFEQ_SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver, _ButcherTableau

__all__ = ["METHOD"]

METHOD = "probdyn_tsit5"  # torchdiffeq's method name for it

# -- Tsitouras 5(4), the shared default solver ------------------------------------------
# Ch. Tsitouras, "Runge–Kutta pairs of order 5(4) satisfying only the first column
# simplifying assumption", Comput. Math. Appl. 62 (2011) 770–775. FSAL: the last
# stage is evaluated at the new state, as torchdiffeq's Dormand–Prince assumes.
_TSIT5_B = [
    0.09646076681806523,
    0.01,
    0.4798896504144996,
    1.379008574103742,
    -3.290069515436081,
    2.324710524099774,
    0.0,
]
_TSIT5_B_HAT = [
    0.09468075576583945,
    0.009183565540343254,
    0.4877705284247616,
    1.234297566930479,
    -2.7077123499835256,
    1.866628418170587,
    1 / 66,
]


def _tsit5_dense_weights(theta: float) -> list[float]:
    """Weights b_i(theta) of Tsitouras' continuous extension: y(t0 + theta dt) =
    y0 + dt sum_i b_i(theta) k_i. torchdiffeq fits its quartic interpolant through
    the state at theta = 1/2, so only that point is needed."""
    t = theta
    return [
        -1.0530884977290216
        * t
        * (t - 1.3299890189751412)
        * (t**2 - 1.4364028541716351 * t + 0.7139816917074209),
        0.1017 * t**2 * (t**2 - 2.1966568338249754 * t + 1.2949852507374631),
        2.490627285651252793 * t**2 * (t**2 - 2.38535645472061657 * t + 1.57803468208092486),
        -16.54810288924490272 * (t - 1.21712927295533244) * (t - 0.61620406037800089) * t**2,
        47.37952196281928122 * (t - 1.203071208372362603) * (t - 0.658047292653547382) * t**2,
        -34.87065786149660974 * (t - 1.2) * (t - 0.666666666666666667) * t**2,
        2.5 * (t - 1) * (t - 0.6) * t**2,
    ]


def _f64(values: Sequence[float]) -> Tensor:
    """The coefficients as a float64 tensor (torchdiffeq casts them to the state's dtype)."""
    return torch.tensor(values, dtype=torch.float64)


class _Tsit5Solver(RKAdaptiveStepsizeODESolver):
    """torchdiffeq's adaptive Runge–Kutta solver with Tsitouras' 5(4) tableau."""

    order = 5
    tableau = _ButcherTableau(
        alpha=_f64([0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0]),
        beta=[
            _f64([0.161]),
            _f64([-0.008480655492356989, 0.335480655492357]),
            _f64([2.8971530571054935, -6.359448489975075, 4.3622954328695815]),
            _f64(
                [5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525]
            ),
            _f64(
                [
                    5.86145544294642,
                    -12.92096931784711,
                    8.159367898576159,
                    -0.071584973281401,
                    -0.028269050394068383,
                ]
            ),
            _f64(_TSIT5_B[:-1]),
        ],
        c_sol=_f64(_TSIT5_B),
        c_error=_f64([b - bh for b, bh in zip(_TSIT5_B, _TSIT5_B_HAT)]),
    )
    mid = _f64(_tsit5_dense_weights(0.5))


_TORCHDIFFEQ_SOLVERS.setdefault(METHOD, _Tsit5Solver)
