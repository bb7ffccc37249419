"""probdyn's NumPyro (JAX) backend: model primitives for NumPyro models.

Importing this module imports jax, numpyro, diffrax and equinox. The engines
(`probdyn.NUTS`, `probdyn.VI`, ...) run NumPyro models through `probdyn.fit`.
"""

from probdyn.numpyro._bnn import MLP, BayesianMLP, lift
from probdyn.numpyro._ode import NeuralODE
from probdyn.numpyro._sde import NeuralSDE

__all__ = ["MLP", "BayesianMLP", "NeuralODE", "NeuralSDE", "lift"]
