"""Argument checks shared by the backends' primitives (NumPy only).

Each primitive's checks now live in its own neutral module (`probdyn.primitives.bnn`,
`probdyn.primitives.ode`, ...); `BayesianMLP`'s are re-exported here for old imports.
"""

from __future__ import annotations

from probdyn.primitives.bnn import check_mlp_args, layer_index

__all__ = ["check_mlp_args", "layer_index"]
