# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # A Bayesian neural ODE for predator–prey data, with NUTS and VI side by side
#
# This is the model behind `probdyn demo`, step by step. We have sparse, noisy,
# irregularly timed counts of a prey and a predator species. We know how each
# species grows or dies on its own, but not how they interact, so we write a
# *universal differential equation*: mechanistic growth and death, plus a small
# Bayesian neural network for the interaction rates,
#
# $$\frac{dx}{dt} = \alpha x - x p\, g_1(x, p), \qquad
#   \frac{dp}{dt} = -\gamma p + x p\, g_2(x, p), \qquad g = \exp(\mathrm{MLP}(x, p)).$$
#
# Then we fit it with NUTS and with variational inference through the same call,
# and check both against a held-out extrapolation window.

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpyro
import numpyro.distributions as dist

import probdyn
from probdyn.calibration import calibration_table, interval
from probdyn.data import synthetic_predator_prey
from probdyn.numpyro import BayesianMLP, NeuralODE

SMOKE_TEST = "CI" in os.environ  # tiny sizes when run by the test suite

# %% [markdown]
# ## The data
#
# `synthetic_predator_prey` simulates Lotka–Volterra dynamics with a fixed seed
# and keeps 16 log-normal observations at random times in $[0, 8]$ for training and
# 8 in $(8, 12]$ for testing.

# %%
data = synthetic_predator_prey(seed=0)
print(data.t_train.round(2))

# %% [markdown]
# ## The model
#
# `BayesianMLP` is called *inside* the model: it registers the weights as sample
# sites and returns an ordinary network holding this run's weights, which the ODE
# solver can call thousands of times. `NeuralODE` solves from `t0 = 0` (where the
# state `z0` is latent) to the irregular observation times. If a proposal makes the
# solve fail, the model's log density is $-\infty$ for that proposal: the sampler
# rejects it and probdyn counts it; the run never crashes.
#
# The prior is a mapping from parameter path to distribution. The network gives
# the *log* interaction rates: its output bias (prior $N(0, 1)$) is the log of a
# constant rate, as in classical Lotka–Volterra, and its output weights (prior
# $N(0, 0.1)$) let the rates vary with the state. This says "Lotka–Volterra unless
# the data say otherwise", and it matters for sampling: with $N(0, 1)$ on every
# weight, the posterior is a thin ridge in 42 dimensions and NUTS chains stall.

# %%
PRIOR = {
    "layers.0.*": dist.Normal(0.0, 1.0),
    "layers.1.weight": dist.Normal(0.0, 0.1),
    "layers.1.bias": dist.Normal(0.0, 1.0),
}


def model(times, y=None):
    alpha = numpyro.sample("alpha", dist.LogNormal(0.0, 1.0))
    gamma = numpyro.sample("gamma", dist.LogNormal(0.0, 1.0))
    z0 = numpyro.sample("z0", dist.LogNormal(0.0, 1.0).expand([2]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(0.5))
    net = BayesianMLP("interaction", [2, 8, 2], prior=PRIOR)

    def field(t, z, args):
        rates = jnp.exp(net(z))
        encounters = z[0] * z[1]
        return jnp.stack(
            [alpha * z[0] - encounters * rates[0], -gamma * z[1] + encounters * rates[1]]
        )

    z = numpyro.deterministic("z", NeuralODE(field, rtol=1e-5, atol=1e-5)(z0, times, t0=0.0))
    numpyro.sample("y", dist.LogNormal(jnp.log(jnp.clip(z, 1e-6)), sigma), obs=y)


# %% [markdown]
# ## Two engines, one call
#
# Oscillating ODE models have a poor local optimum where every wiggle is "noise".
# Starting from a MAP estimate (`init="map"`) avoids it for both engines.

# %%
if SMOKE_TEST:
    nuts = probdyn.NUTS(num_warmup=20, num_samples=20, max_tree_depth=4, init="map")
    vi = probdyn.VI(num_steps=100, num_draws=40, init="map")
else:
    nuts = probdyn.NUTS(
        num_warmup=250, num_samples=250, num_chains=2, max_tree_depth=7, init="map"
    )
    vi = probdyn.VI(num_steps=3000, num_draws=600, init="map")

posteriors = {
    name: probdyn.fit(model, data.t_train, data.y_train, engine=engine, key=0)
    for name, engine in [("NUTS", nuts), ("VI", vi)]
}
for name, post in posteriors.items():
    print(name, post, f"{post.attrs['wall_time']:.1f} s")

# %% [markdown]
# Every engine returns the same layout, `(chain, draw, *event)`: NUTS has chains,
# VI one chain of draws from the fitted guide. The summary folds the network's
# weight matrices into one row each (worst R-hat, smallest ESS).

# %%
print(posteriors["NUTS"].summary().round(3))

# %% [markdown]
# ## Predictions on new times and calibration
#
# `predict` runs the model for every draw on new inputs. On the held-out window
# we compare the predictive intervals with the observations. The figure is written
# to `neural_ode_bands.png`.

# %%
split = (data.t_train[-1] + data.t_test[0]) / 2  # between the last training and first test time
fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True, sharey="row")
for col, (name, post) in enumerate(posteriors.items()):
    grid = post.predict(data.t_grid, key=1, sites=["z"])["z"]
    test = post.predict(data.t_test, key=2, sites=["y"])["y"]
    print(name)
    print(calibration_table(test, data.y_test).round(3))
    for j, species in enumerate(["prey", "predator"]):
        lo, hi = interval(grid[..., j], 0.9)
        ax = axes[j, col]
        ax.fill_between(data.t_grid, lo, hi, alpha=0.3, label="90% credible interval (state)")
        ax.plot(data.t_grid, data.z_grid[:, j], "k--", lw=1, label="true state")
        ax.plot(data.t_train, data.y_train[:, j], "ko", ms=3, label="observed (training)")
        ax.plot(data.t_test, data.y_test[:, j], "rx", label="held out")
        ax.axvline(split, color="grey", lw=0.8, ls=":", label="end of training data")
        if col == 0:
            ax.set_ylabel(f"{species} (arbitrary units)")
    axes[0, col].set_title(f"{name}: posterior of the state")
    axes[1, col].set_xlabel("time (arbitrary units)")
handles, labels = axes[0, 0].get_legend_handles_labels()
fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
fig.tight_layout(rect=(0, 0.06, 1, 1))
fig.savefig("neural_ode_bands.png", dpi=100)

# %% [markdown]
# ## Diagnostics with ArviZ
#
# `to_arviz()` fills posterior, sample_stats, posterior_predictive, log_likelihood
# and observed_data, so ArviZ's tools work directly.

# %%
idata = posteriors["NUTS"].to_arviz()
print(idata)

# %% [markdown]
# ## The same model in Pyro
#
# `probdyn.pyro` exports the same primitives with the same names and arguments, so
# the model is the same text with Pyro's spelling; `probdyn.fit` sees a Pyro model
# and runs the Pyro engines, and the Posterior has the same layout, groups and file
# format. (JAX compiles the whole sampler and is much faster for NUTS on neural
# ODEs; see the benchmarks page for the measured ratio.)

# %%
import pyro
import pyro.distributions as pdist
import torch

from probdyn.pyro import BayesianMLP as TorchBayesianMLP
from probdyn.pyro import NeuralODE as TorchNeuralODE

torch.set_default_dtype(torch.float64)  # before building distributions: they keep their dtype
TORCH_PRIOR = {
    "layers.0.*": pdist.Normal(0.0, 1.0),
    "layers.1.weight": pdist.Normal(0.0, 0.1),
    "layers.1.bias": pdist.Normal(0.0, 1.0),
}


def pyro_model(times, y=None):
    alpha = pyro.sample("alpha", pdist.LogNormal(0.0, 1.0))
    gamma = pyro.sample("gamma", pdist.LogNormal(0.0, 1.0))
    z0 = pyro.sample("z0", pdist.LogNormal(0.0, 1.0).expand([2]).to_event(1))
    sigma = pyro.sample("sigma", pdist.HalfNormal(0.5))
    net = TorchBayesianMLP("interaction", [2, 8, 2], prior=TORCH_PRIOR)

    def field(t, z, args):
        rates = torch.exp(net(z))
        encounters = z[0] * z[1]
        return torch.stack(
            [alpha * z[0] - encounters * rates[0], -gamma * z[1] + encounters * rates[1]]
        )

    z = pyro.deterministic("z", TorchNeuralODE(field, rtol=1e-5, atol=1e-5)(z0, times, t0=0.0))
    pyro.sample("y", pdist.LogNormal(torch.log(torch.clamp(z, min=1e-6)), sigma), obs=y)


times, y = torch.as_tensor(data.t_train), torch.as_tensor(data.y_train)
# (The MAP start is 2000 Adam steps through torchdiffeq, about two minutes on a CPU:
# the smoke run skips it.)
pyro_vi = probdyn.VI(
    num_steps=100 if SMOKE_TEST else 3000,
    num_draws=40 if SMOKE_TEST else 600,
    init="median" if SMOKE_TEST else "map",
)
pyro_post = probdyn.fit(pyro_model, times, y, engine=pyro_vi, key=0)
print(pyro_post)
pyro_test = pyro_post.predict(data.t_test, key=2, sites=["y"])["y"]
print(calibration_table(pyro_test, data.y_test).round(3))
