"""probdyn's NumPyro (JAX) backend: model primitives for NumPyro models.

Importing this module imports jax, numpyro, diffrax and equinox. The engines
(`probdyn.NUTS`, `probdyn.VI`, ...) run NumPyro models through `probdyn.fit`.
"""

from probdyn.numpyro._bnn import MLP, BayesianMLP, lift
from probdyn.numpyro._latent import LatentODE, PaddedSeries, pad_series
from probdyn.numpyro._latent_sde import LatentSDE
from probdyn.numpyro._np import (
    ANP,
    CNP,
    LNP,
    AttentiveNP,
    ConditionalNP,
    LatentNP,
    attentive_np_guide,
    attentive_np_model,
    conditional_np_model,
    latent_np_guide,
    latent_np_model,
)
from probdyn.numpyro._ode import NeuralODE
from probdyn.numpyro._sde import NeuralSDE

__all__ = [
    "ANP",
    "CNP",
    "LNP",
    "MLP",
    "AttentiveNP",
    "BayesianMLP",
    "ConditionalNP",
    "LatentNP",
    "LatentODE",
    "LatentSDE",
    "NeuralODE",
    "NeuralSDE",
    "PaddedSeries",
    "attentive_np_guide",
    "attentive_np_model",
    "conditional_np_model",
    "latent_np_guide",
    "latent_np_model",
    "lift",
    "pad_series",
]
