"""probdyn's Pyro (PyTorch) backend: model primitives for Pyro models.

Importing this module imports torch, pyro and torchdiffeq. It exports the same
names as `probdyn.numpyro`, with the same argument names, defaults and semantics
(a test enforces it), so a model moves between backends by changing its imports:

* `BayesianMLP` / `lift`: sites ``f"{name}.layers.{i}.weight"`` shaped
  ``(in, out)`` and ``f"{name}.layers.{i}.bias"``, as on JAX, so one dict of
  weights is one network in both backends.
* `NeuralODE`: the shared solver vocabulary mapped onto torchdiffeq (see its
  table). What this backend cannot do is refused with a ValueError naming the
  nearest alternative: ``solver="kvaerno5"`` (torchdiffeq has no implicit stiff
  solver) and ``adjoint="forward"`` (no forward-mode derivative through
  torchdiffeq).

`BACKEND_ONLY_KWARGS` lists keyword arguments that only this backend's version
of a public name accepts (name -> set of argument names). It is empty: every
signature is identical to its NumPyro twin.
"""

from probdyn.pyro.primitives.bnn import MLP, BayesianMLP, lift
from probdyn.pyro.primitives.latent_ode import LatentODE, PaddedSeries, pad_series
from probdyn.pyro.primitives.latent_sde import LatentSDE
from probdyn.pyro.primitives.neural_process import (
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
from probdyn.pyro.primitives.ode import NeuralODE
from probdyn.pyro.primitives.sde import NeuralSDE

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

BACKEND_ONLY_KWARGS: dict[str, frozenset[str]] = {}
