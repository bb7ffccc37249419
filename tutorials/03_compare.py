# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Comparing engines on held-out data with `probdyn.compare`
#
# Which engine should you use for your model? `probdyn.compare` answers with one
# call: it fits the model with each engine, scores every fit on the same held-out
# data, and returns a table with one row per engine,
#
# - **cost**: wall time, compile time, and effective samples per second (ESS/s) for
#   the engines whose draws are chains (NUTS, HMC, SMC);
# - **health**: divergent transitions (NUTS, HMC);
# - **predictive accuracy**: NLPD (negative log predictive density, exact from the
#   model's own likelihood), CRPS and RMSE;
# - **calibration**: coverage of the 50/90/95 % predictive intervals and the mean
#   width of the 90 % interval;
# - the **log evidence** $\log p(y)$ where an engine estimates it (SMC);
#
# and a figure of the predictive bands side by side. An engine that fails becomes
# a row with its error message, so a long comparison never dies halfway. The same
# comparison runs from the shell: `probdyn compare --engines nuts,vi,ensemble` (the
# demo model below), or `probdyn compare --model my_model.py:model --data data.npz`
# for your own model and data; each run writes its table and figure to a new folder
# under `--out` (default `probdyn-compare/`).
#
# We compare on two problems: the Bayesian neural ODE of the first tutorial, and a
# Bayesian neural network on a UCI regression data set.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np
import numpyro
import numpyro.distributions as dist

import probdyn
from probdyn.data import synthetic_predator_prey
from probdyn.demo._numpyro import predator_prey_ude  # the first tutorial's model
from probdyn.numpyro import BayesianMLP

SMOKE_TEST = "CI" in os.environ  # tiny sizes when run by the test suite

# %% [markdown]
# ## A Bayesian neural ODE: extrapolating predator–prey dynamics
#
# The model (`predator_prey_ude(times, y=None)`, built step by step in the first
# tutorial) is Lotka–Volterra with a small Bayesian MLP for the interaction rates.
# We train on 16 noisy observations in $[0, 8]$ and test on the 8 in $(8, 12]$:
# an extrapolation, where a good posterior has to know what it does not know.
#
# `compare` takes the training data as `probdyn.fit` does and the test data as
# `test=(inputs, observations)`: the observations go into the model's argument `y`
# (change it with `observed_arg=`), the inputs replace the other arguments, here
# the observation times.

# %%
data = synthetic_predator_prey(seed=0)

if SMOKE_TEST:
    ode_engines = {
        "NUTS": probdyn.NUTS(num_warmup=20, num_samples=20, max_tree_depth=4, init="map"),
        "VI": probdyn.VI(num_steps=100, num_draws=40, init="map"),
        "Ensemble": probdyn.Ensemble(num_members=4, num_steps=100),
    }
else:
    ode_engines = {
        "NUTS": probdyn.NUTS(num_warmup=150, num_samples=150, max_tree_depth=6, init="map"),
        "VI": probdyn.VI(num_steps=2000, num_draws=300, init="map"),
        "Ensemble": probdyn.Ensemble(num_members=4, num_steps=500),
    }

ode = probdyn.compare(
    predator_prey_ude,
    data.t_train,
    data.y_train,
    engines=ode_engines,
    test=((data.t_test,), data.y_test),
    key=0,
    progress_bar=False,
)
print(ode.to_markdown())

# %% [markdown]
# How to read it: lower NLPD and CRPS are better; coverage should be close to its
# nominal level (0.5, 0.9, 0.95), far below it means overconfident intervals, and
# among engines with the right coverage a narrower interval is better. NUTS is the
# reference here, but only if it mixed: a small `ess` (tens or less) means its
# scores still carry Monte-Carlo noise and the chains should be longer. A
# mean-field VI guide and a small ensemble of MAP fits are approximations whose
# intervals can be too narrow or too wide; the held-out scores say which. The NLPD
# is averaged per observation, on the data's scale.
#
# The bands: `plot` predicts on a dense time grid for smooth bands, with the
# training data (black), the held-out data (red crosses) and, from `x_split`, a
# dotted line where the training data end. Each row's y axis spans
# the data and the bands, but at most half the data's range beyond the data: a band
# much wider than that (an engine that has not converged) runs off its panel.

# %%
fig = ode.plot(
    (data.t_grid,),
    x=data.t_grid,
    x_split=(data.t_train[-1] + data.t_test[0]) / 2,  # the labelled end of training data
    x_label="time (arbitrary units)",
    output_names=["prey (arbitrary units)", "predator (arbitrary units)"],
)
fig.savefig("compare_ode.png", dpi=100)

# %% [markdown]
# Everything behind the table stays available: `ode.posteriors` (the `Posterior`
# of every engine), `ode.predictions` (the test predictive draws) and
# `ode.errors` (tracebacks of failed engines). `to_csv` and `to_markdown(path)`
# write the table.

# %%
ode.to_csv("compare_ode.csv")
print(ode.posteriors["NUTS"])

# %% [markdown]
# ## A Bayesian neural network on UCI "yacht"
#
# The standard UCI regression protocol (Hernández-Lobato & Adams, 2015): one
# hidden layer of 50 units, inputs and targets standardised with the training
# split's statistics, 20 fixed train/test splits (we use split 0). The data are
# not shipped with probdyn; this part runs when the benchmark folder
# `shared/data/uci` is found (set `PROBDYN_UCI_DATA` to its path otherwise).


# %%
def find_uci() -> Path | None:
    candidates = [os.environ.get("PROBDYN_UCI_DATA"), "../shared/data/uci"]
    if "__file__" in globals():  # run as a script: next to the repository
        candidates.append(str(Path(__file__).resolve().parents[2] / "shared/data/uci"))
    found = [Path(c) for c in candidates if c and (Path(c) / "yacht").is_dir()]
    return found[0] if found else None


def load_uci(folder: Path, split: int = 0):
    table = np.loadtxt(folder / "data.txt")
    features = np.loadtxt(folder / "index_features.txt", dtype=int)
    target = int(np.loadtxt(folder / "index_target.txt"))
    train = np.loadtxt(folder / f"index_train_{split}.txt", dtype=int)
    test = np.loadtxt(folder / f"index_test_{split}.txt", dtype=int)
    x, y = table[:, features], table[:, target]
    x_mean, x_sd = x[train].mean(0), x[train].std(0)
    x_sd[x_sd == 0] = 1.0  # a constant column stays constant
    y_mean, y_sd = y[train].mean(), y[train].std()
    x, y = (x - x_mean) / x_sd, (y - y_mean) / y_sd
    return x[train], y[train], x[test], y[test], y_sd


UCI = find_uci()
print("UCI data:", UCI or "not found, skipping the BNN comparison")

# %% [markdown]
# The model: weights with prior $N(0, 1/\text{fan-in})$, so that the network's output
# has unit scale whatever the width (the prior is a callable `(path, shape) ->
# distribution`; a weight matrix is shaped `(in, out)`), and a Gaussian likelihood
# with unknown noise.


# %%
def weight_prior(path, shape):
    fan_in = shape[0] if path.endswith("weight") else 1
    return dist.Normal(0.0, 1.0 / np.sqrt(fan_in))


def bnn(x, y=None):
    net = BayesianMLP("net", [x.shape[1], 50, 1], activation="tanh", prior=weight_prior)
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(net(x)[..., 0], sigma), obs=y)


# %%
if UCI is not None:
    x_train, y_train, x_test, y_test, y_sd = load_uci(UCI / "yacht")
    print(f"yacht: {len(y_train)} training, {len(y_test)} test points, {x_train.shape[1]} inputs")
    if SMOKE_TEST:
        bnn_engines = {
            "NUTS": probdyn.NUTS(num_warmup=20, num_samples=20, max_tree_depth=4),
            "VI": probdyn.VI(num_steps=200, num_draws=50),
            "Ensemble": probdyn.Ensemble(num_members=4, num_steps=200),
        }
    else:
        bnn_engines = {
            "NUTS": probdyn.NUTS(num_warmup=200, num_samples=200, max_tree_depth=7),
            "VI": probdyn.VI(num_steps=3000, num_draws=500),
            "Ensemble": probdyn.Ensemble(num_members=10, num_steps=3000),
        }
    uci = probdyn.compare(
        bnn,
        x_train,
        y_train,
        engines=bnn_engines,
        test=((x_test,), y_test),
        key=0,
        progress_bar=False,
    )
    print(uci.to_markdown())
    # The scores are on the standardised scale; in the target's own units the RMSE
    # is multiplied by its training sd and log(sd) is added to the NLPD (a density
    # per unit of y), which is how published UCI tables report them.
    original = uci.table[["nlpd", "rmse"]].assign(
        nlpd=uci.table["nlpd"] + np.log(y_sd), rmse=uci.table["rmse"] * y_sd
    )
    print(original.round(3))
    # Several inputs: the test points are drawn in the order of their observed value.
    uci.plot(output_names=["resistance (standardised)"]).savefig("compare_yacht.png", dpi=100)

# %% [markdown]
# The wall times include compilation (the `compile_time` column), which dominates
# runs as short as these; `ess_per_s` divides the smallest predictive ESS by the
# whole wall time, compile included, so for short runs it understates what a long
# run would achieve. For the full UCI protocol (all splits and data sets) see
# `benchmarks/uci.py`.
