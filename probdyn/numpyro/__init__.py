"""probdyn's NumPyro (JAX) backend: model primitives for NumPyro models.

Importing this module imports jax, numpyro, diffrax and equinox. The engines
(`probdyn.NUTS`, `probdyn.VI`, ...) run NumPyro models through `probdyn.fit`.
"""

from probdyn.numpyro.primitives.bnn import MLP, BayesianMLP, lift
from probdyn.numpyro.primitives.latent_ode import LatentODE, PaddedSeries, pad_series
from probdyn.numpyro.primitives.latent_sde import LatentSDE
from probdyn.numpyro.primitives.neural_process import (
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
from probdyn.numpyro.primitives.ode import NeuralODE
from probdyn.numpyro.primitives.sde import NeuralSDE

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
