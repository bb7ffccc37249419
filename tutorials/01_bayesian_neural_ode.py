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
#   \frac{dp}{dt} = -\gamma p + x p\, g_2(x, p), \qquad g = \mathrm{softplus}(\mathrm{MLP}(x, p)).$$
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


# %%
def model(times, y=None):
    alpha = numpyro.sample("alpha", dist.LogNormal(0.0, 1.0))
    gamma = numpyro.sample("gamma", dist.LogNormal(0.0, 1.0))
    z0 = numpyro.sample("z0", dist.LogNormal(0.0, 1.0).expand([2]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(0.5))
    net = BayesianMLP("interaction", [2, 8, 2], prior=dist.Normal(0.0, 1.0))

    def field(t, z, args):
        rates = jax.nn.softplus(net(z))
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
    nuts = probdyn.NUTS(num_warmup=300, num_samples=300, num_chains=2, max_tree_depth=7, init="map")
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
# we compare the predictive intervals with the observations.

# %%
fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
for col, (name, post) in enumerate(posteriors.items()):
    grid = post.predict(data.t_grid, key=1, sites=["z"])["z"]
    test = post.predict(data.t_test, key=2, sites=["y"])["y"]
    print(name)
    print(calibration_table(test, data.y_test).round(3))
    for j in range(2):
        lo, hi = interval(grid[..., j], 0.9)
        ax = axes[j, col]
        ax.fill_between(data.t_grid, lo, hi, alpha=0.3, label="90% credible")
        ax.plot(data.t_grid, data.z_grid[:, j], "k--", lw=1, label="truth")
        ax.plot(data.t_train, data.y_train[:, j], "ko", ms=3, label="train")
        ax.plot(data.t_test, data.y_test[:, j], "rx", label="held out")
    axes[0, col].set_title(name)
axes[0, 0].legend(fontsize=7)
fig.tight_layout()

# %% [markdown]
# ## Diagnostics with ArviZ
#
# `to_arviz()` fills posterior, sample_stats, posterior_predictive, log_likelihood
# and observed_data, so ArviZ's tools work directly.

# %%
idata = posteriors["NUTS"].to_arviz()
print(idata)
