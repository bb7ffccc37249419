# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # A latent SDE on sparse, irregular series, and how calibrated its forecasts are
#
# Many real time series are short, noisy, observed at irregular times, and have gaps:
# a sensor misses readings, or a patient is measured when they visit. A model with a
# fixed time step cannot take such data as it is. A *latent SDE* (Li, Wong, Chen &
# Duvenaud, 2020) can: it models each series as a noisy read-out of a hidden
# continuous-time stochastic path, so an observation at any time is just the path
# evaluated at that time.
#
# In this tutorial we
#
# 1. simulate a batch of ragged, irregularly sampled, noisy series from a known
#    stochastic process, with entries dropped at random;
# 2. pad them into one batch with a mask (`probdyn.numpyro.pad_series`);
# 3. fit `probdyn.numpyro.LatentSDE` by variational inference with `probdyn.fit`;
# 4. forecast the last part of every series, which the fit never saw;
# 5. check with `probdyn.calibration` whether the forecast intervals are honest.

# %%
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import probdyn
from probdyn import calibration
from probdyn.numpyro import LatentSDE, pad_series

SMOKE_TEST = "CI" in os.environ  # tiny sizes when run by the test suite

# %% [markdown]
# ## The data: a stochastic damped oscillator
#
# Each series is a path of a damped oscillator pushed around by white noise,
#
# $$dx = v\,dt, \qquad dv = (-\omega^2 x - \gamma v)\,dt + \sigma\,dW,$$
#
# with $\omega = 1.5$, $\gamma = 0.2$, $\sigma = 0.5$ and a random start
# $(x, v)(0) \sim N(0, I)$. We observe both position and velocity with Gaussian noise of
# sd 0.1. The noise $dW$ keeps every path oscillating with a wandering amplitude and
# phase, so no deterministic model (an ODE) can forecast it; the best forecast is a
# distribution that widens with the horizon.
#
# We simulate on a fine Euler–Maruyama grid and read the paths on a lattice of step 0.05
# on $[0, 10]$. Every series then keeps a random subset of 15 to 40 of those times (so
# the series are ragged and irregularly spaced), and on top of that each kept entry,
# position or velocity, is dropped with probability 0.3 (so some times have one of the
# two values only). The points after $t = 7$ are held out for forecasting.

# %%
OMEGA, GAMMA, SIGMA, NOISE = 1.5, 0.2, 0.5, 0.1
T_END, T_SPLIT, LATTICE = 10.0, 7.0, 0.05


def simulate(num_series: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free paths ``(num_series, len(lattice), 2)`` of the oscillator on the lattice."""
    rng = np.random.default_rng(seed)
    sub = 10  # Euler–Maruyama steps per lattice step
    h = LATTICE / sub
    lattice = np.round(np.arange(0.0, T_END + LATTICE / 2, LATTICE), 10)
    state = rng.standard_normal((num_series, 2))
    out = [state]
    for _ in range(len(lattice) - 1):
        for _ in range(sub):
            x, v = state[:, 0], state[:, 1]
            dw = np.sqrt(h) * rng.standard_normal(num_series)
            state = np.stack([x + v * h, v + (-(OMEGA**2) * x - GAMMA * v) * h + SIGMA * dw], -1)
        out.append(state)
    return lattice, np.stack(out, 1)


num_series = 16 if SMOKE_TEST else 64
lattice, paths = simulate(num_series, seed=0)
rng = np.random.default_rng(1)
train_t, train_y, test_t, test_y = [], [], [], []
for b in range(num_series):
    keep = np.sort(rng.choice(len(lattice), size=rng.integers(15, 41), replace=False))
    t = lattice[keep]
    y = paths[b, keep] + NOISE * rng.standard_normal((keep.size, 2))
    y[rng.uniform(size=y.shape) < 0.3] = np.nan  # drop entries at random
    seen = ~np.isnan(y).all(-1)  # a time with both entries dropped is no observation
    t, y = t[seen], y[seen]
    early = t <= T_SPLIT
    train_t.append(t[early])
    train_y.append(y[early])
    test_t.append(t[~early])
    test_y.append(y[~early])

print("observed entries per series (training part):", [int(np.isfinite(y).sum()) for y in train_y])

# %% [markdown]
# ## Padding ragged series into one batch, with a mask
#
# A batch needs rectangular arrays. `pad_series` pads every series to the longest one and
# returns `times` `(B, T)`, `values` `(B, T, D)` with NaN at padding and at dropped
# entries, and a boolean `mask` `(B, T, D)` that is True exactly where a value was
# observed. The padding times continue past the end of each series in tiny steps, so
# every row of `times` stays strictly increasing.
#
# The mask is what makes ragged and partly observed data a non-issue: the likelihood of
# a masked entry is exactly zero (its NaN never reaches the loss or its gradient), and
# the encoder sees the mask as an input, so it knows which values are missing rather than
# mistaking a fill-in value for data. The held-out points are padded the same way; their
# NaNs mark "nothing to score here" for the calibration functions later.

# %%
train = pad_series(train_t, train_y)
test = pad_series(test_t, test_y)
print("training batch:", train.times.shape, train.values.shape, "observed:", train.mask.sum())
print("held-out batch:", test.times.shape, "observed:", int(np.isfinite(test.values).sum()))

fig, axes = plt.subplots(1, 3, figsize=(13, 3), sharey=True)
for b, ax in enumerate(axes):
    ax.plot(lattice, paths[b, :, 0], c="0.7", lw=1, label="true position (unseen)")
    ax.scatter(train.times[b], train.values[b, :, 0], s=12, c="C0", label="observed position")
    ax.scatter(test.times[b], test.values[b, :, 0], s=12, c="r", marker="x", label="held out")
    ax.axvline(T_SPLIT, c="k", lw=0.8, ls=":", label=f"end of training data (t = {T_SPLIT:g})")
    ax.set(title=f"series {b}", xlabel="time t")
axes[0].set_ylabel("position")
handles, labels = axes[0].get_legend_handles_labels()
fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
fig.suptitle("Three of the training series: sparse, irregular, ragged, with entries missing")
fig.tight_layout(rect=(0, 0.08, 1, 1))
fig.savefig("latent_sde_data.png", dpi=100)

# %% [markdown]
# ## The latent SDE
#
# `LatentSDE` is a variational auto-encoder whose latent variable is a whole path
# $z_b(t)$ of a small stochastic differential equation, one path per series $b$:
#
# - **prior (the generative model):** a Gaussian start $z_b(0)$, then
#   $dz = f_p(z)\,dt + g(z)\,dW$, and every observed entry is
#   $y_{bij} \sim N(\mathrm{decoder}(z_b(t_{bi}))_j, \text{obs\_scale})$. The drift
#   $f_p$, the diagonal diffusion $g$ and the decoder are neural networks, learned from
#   all the series together; they are the model of the dynamics. We use
#   `z0_prior="learned"`: the start is $N(m, \mathrm{diag}(s)^2)$ with a learned $m$ and
#   $s$, so the prior's spread of starting points can match the encoder's (the default is
#   $N(0, I)$).
# - **posterior (the guide):** a GRU reads each series backwards in time and gives
#   $q(z_b(0) \mid \text{series})$ and a context $c_b(t)$ that summarises the
#   observations after $t$. The posterior path follows
#   $dz = f_q(z, c_b(t))\,dt + g(z)\,dW$: a drift that is steered by the data towards the
#   observations, with the same diffusion as the prior.
#
# The ELBO needs the KL divergence between the posterior and the prior *path*
# distributions. Because the two SDEs share the diffusion $g$, Girsanov's theorem gives it
# as an expectation over posterior paths: with $u = (f_q - f_p) / g$, the KL is
# $\mathbb{E}_q \tfrac12 \int_0^T |u(t)|^2 dt$ (plus the usual KL of the start $z_0$). The
# posterior pays for every bit of steering it adds to the prior drift, measured in units
# of the diffusion: steering is cheap where the prior is noisy (large $g$), since the
# prior could have gone there by chance, and expensive where it is nearly deterministic.
# probdyn makes this an ordinary part of NumPyro's ELBO: the
# Brownian increments are one sample site, `latent_sde.path_noise`, in both model and
# guide, and the guide's density is set up so that the ELBO's path term is exactly the
# Euler discretisation $-\tfrac12 \sum_k |u_k|^2 h_k$ (see the module docstring of
# `LatentSDE` and `docs/latent.md`).
#
# Both SDEs are solved by Euler–Maruyama on one grid through $t_0$ and every time at which
# some series has an observation, with steps no longer than `dt`. The observation noise
# `obs_scale` is fixed, not learned; we set it to the noise level of the data, 0.1. (With
# unknown noise, choose it by the held-out likelihood.)
#
# **Time scale.** The networks start from random weights made for dynamics on time scales
# of order one. Over our ten time units a random initial drift would carry the latent
# paths far away (the fit then starts from an enormous loss and recovers slowly), so the
# model sees time divided by `TIME_SCALE = 5`: it lives on $[0, 2]$, with the split at
# $1.4$. This is the usual input normalisation; the forecasts are indexed by the same
# scaled times and nothing else changes. `dt` is in the model's time units.

# %%
TIME_SCALE = 5.0
times = train.times / TIME_SCALE  # the model's time axis
target = test.times / TIME_SCALE
lsde = LatentSDE(
    obs_dim=2,
    latent_dim=4,
    dt=0.02,
    drift_sizes=(32,) if SMOKE_TEST else (32, 32),
    encoder_hidden=32,
    context_dim=8,
    obs_scale=NOISE,
    z0_prior="learned",
)
print(lsde)
print("Euler–Maruyama steps:", len(lsde.grid(times, train.mask, t0=0.0)) - 1)

# %% [markdown]
# ## Fitting
#
# The model and the amortised guide go to `probdyn.fit` with the `VI` engine. The data are
# passed positionally as `(times, values, mask)`, and `t0=0.0` fixes the common start of
# the latent SDE. `num_draws` is the number of posterior draws (of $z_0$ and the whole
# path noise) that the returned `Posterior` keeps. The loss is the negative ELBO in nats
# for the whole batch.

# %%
steps = 500 if SMOKE_TEST else 2000
num_draws = 40 if SMOKE_TEST else 200
engine = probdyn.VI(
    guide=lsde.guide,
    num_steps=steps,
    learning_rate=2e-2,
    num_draws=num_draws,
    progress_bar=not SMOKE_TEST,
)
post = probdyn.fit(lsde.model, times, train.values, train.mask, t0=0.0, engine=engine, key=0)
loss = post.traces["loss"]
print(f"loss: first 50 steps {loss[:50].mean():.0f}, last 50 steps {loss[-50:].mean():.0f}")

# %% [markdown]
# ## Forecasting the held-out future
#
# `post.predict` runs the model once per posterior draw. We pass the same `times`,
# `values`, `mask` and `t0` as in fitting (the draws of `path_noise` live on that grid)
# and add `target_times`, the times to predict at: here the held-out times of each series,
# `(B, T')`. At target times inside the fitted grid the path is the posterior path; after
# the last observed time of the batch, the *prior* SDE continues each path with fresh
# Brownian noise (the site `latent_sde.forecast_noise`), so the spread of the forecasts
# grows with the horizon.
#
# The site `latent_sde.forecast` is the decoded **mean** of the observations,
# $\mathrm{decoder}(z(t))$, not an observation. A forecast of what will be *measured* must
# add the observation noise, $N(0, \text{obs\_scale})$, to every draw; we do that
# ourselves below. Each draw then is one sample of the posterior predictive of the
# held-out observations.

# %%
pred = post.predict(
    times,
    train.values,
    train.mask,
    t0=0.0,
    target_times=target,
    key=1,
    sites=["latent_sde.forecast"],
)
mean_draws = pred["latent_sde.forecast"]  # (chain, draw, B, T', 2): the decoded means
noise = np.random.default_rng(2).standard_normal(mean_draws.shape)
obs_draws = mean_draws + lsde.obs_scale * noise  # predictive draws of observations
print("forecast draws:", obs_draws.shape)

# %% [markdown]
# For the figure we predict on a dense grid over the whole range (a 1-D `target_times`
# is shared by all series): before $t = 7$ the band shows how well the posterior
# reconstructs the observed part, after it how the forecast spreads.

# %%
dense = np.linspace(0.0, T_END, 201)
band = post.predict(
    times,
    train.values,
    train.mask,
    t0=0.0,
    target_times=dense / TIME_SCALE,
    key=3,
    sites=["latent_sde.forecast"],
)["latent_sde.forecast"]
band = band + lsde.obs_scale * np.random.default_rng(4).standard_normal(band.shape)
lo, mid, hi = np.quantile(band[0], [0.05, 0.5, 0.95], axis=0)

fig, axes = plt.subplots(2, 3, figsize=(13, 5.5), sharex=True)
for b in range(3):
    for d, label in enumerate(["position", "velocity"]):
        ax = axes[d, b]
        ax.fill_between(
            dense, lo[b, :, d], hi[b, :, d], alpha=0.3, label="90 % predictive interval"
        )
        ax.plot(dense, mid[b, :, d], lw=1.2, label="median")
        ax.plot(lattice, paths[b, :, d], c="0.5", lw=0.8, label="true path")
        ax.scatter(train.times[b], train.values[b, :, d], s=10, c="k", zorder=3,
                   label="observed (conditioned on)")  # fmt: skip
        ax.scatter(test.times[b], test.values[b, :, d], s=14, c="r", marker="x", zorder=3,
                   label="held out")  # fmt: skip
        ax.axvline(T_SPLIT, c="k", lw=0.8, ls=":", label=f"forecast starts (t = {T_SPLIT:g})")
        if b == 0:
            ax.set_ylabel(label)
    axes[0, b].set_title(f"series {b}")
    axes[1, b].set_xlabel("time t")
handles, labels = axes[0, 0].get_legend_handles_labels()
fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8, frameon=False)
fig.suptitle("Latent SDE: reconstruction up to t = 7, forecast after it")
fig.tight_layout(rect=(0, 0.06, 1, 1))
fig.savefig("latent_sde_forecast.png", dpi=100)

# %% [markdown]
# ## Are the forecasts calibrated?
#
# A forecast distribution is *calibrated* when its stated uncertainty matches the
# frequency of what happens: 90 % intervals should contain about 90 % of the held-out
# observations, 50 % intervals about half. `calibration.coverage` measures exactly that;
# below the nominal level the model is overconfident, above it underconfident. Coverage
# alone rewards any very wide interval, so we also report the CRPS (continuous ranked
# probability score, in the units of the data, lower is better), which rewards forecasts
# that are both calibrated and sharp, and the mean width of the 90 % interval.
#
# The draws are in the posterior layout `(chain, draw, *shape)` and the held-out values
# have `shape` `(B, T', 2)`, with NaN at padding and dropped entries; the calibration
# functions leave NaNs out, so the padded arrays go in as they are. (`interval_width`
# sees no observations, so we average its per-element widths over the observed entries.)
#
# We score three forecasts:
#
# - the latent SDE's predictive draws of observations (decoded mean plus noise);
# - the decoded means alone, to show what forgetting the observation noise does;
# - a "climatology" reference that ignores time: draws from the pooled training values
#   of each dimension. A useful forecast must beat it on CRPS, at least at short
#   horizons.

# %%
rng = np.random.default_rng(5)
pooled = train.values[train.mask[..., 0], 0], train.values[train.mask[..., 1], 1]
climate = np.stack(
    [rng.choice(p, size=(1, mean_draws.shape[1], *test.times.shape)) for p in pooled], -1
)
forecasts = {
    "latent SDE": obs_draws,
    "decoded mean only": mean_draws,
    "climatology": climate,
}
observed = test.values
for name, draws in forecasts.items():
    cov = calibration.coverage(draws, observed, levels=(0.5, 0.9))
    score = calibration.crps(draws, observed)
    width = calibration.interval_width(draws, 0.9, reduce=False)[np.isfinite(observed)].mean()
    print(
        f"{name:>18}: coverage 50/90 % {cov[0.5]:.2f}/{cov[0.9]:.2f}, "
        f"90 % width {width:.2f}, CRPS {score:.3f}"
    )

# %% [markdown]
# Forecast quality depends on the horizon. We split the held-out points by lead time
# (time after the split at $t = 7$) and score each part by setting the other held-out
# values to NaN.

# %%
lead = test.times - T_SPLIT
for lo_h, hi_h in [(0.0, 1.0), (1.0, 2.0), (2.0, T_END - T_SPLIT)]:
    part = np.where(((lead > lo_h) & (lead <= hi_h))[..., None], observed, np.nan)
    if np.isnan(part).all():
        continue
    cov = calibration.coverage(obs_draws, part, levels=0.9)[0.9]
    score = calibration.crps(obs_draws, part)
    ref = calibration.crps(climate, part)
    width = calibration.interval_width(obs_draws, 0.9, reduce=False)[np.isfinite(part)].mean()
    n = int(np.isfinite(part).sum())
    print(
        f"lead ({lo_h:.0f}, {hi_h:.0f}]: n={n:3d}, 90 % coverage {cov:.2f}, "
        f"90 % width {width:.2f}, CRPS {score:.3f} (climatology {ref:.3f})"
    )

# %% [markdown]
# Two plots show the whole predictive distribution rather than two levels. The
# reliability diagram plots the empirical coverage of central intervals against their
# nominal level; calibrated forecasts lie on the diagonal, inside the grey band that
# binomial noise would allow. The PIT histogram shows where each observation falls within
# its forecast distribution (its predictive CDF value); calibrated forecasts give a flat
# histogram, a U shape means too narrow intervals, a hump too wide ones, a slope a biased
# mean. Both bands assume independent observations; points along one series are
# correlated, so read them as a guide rather than a test.

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
calibration.plot_reliability(obs_draws, observed, ax=axes[0])
axes[0].set_title("Reliability: latent SDE (mean + noise)")
calibration.plot_reliability(mean_draws, observed, ax=axes[1])
axes[1].set_title("Reliability: decoded mean only")
calibration.plot_pit(calibration.pit(obs_draws, observed), bins=10, ax=axes[2])
fig.tight_layout()
fig.savefig("latent_sde_calibration.png", dpi=100)

# %% [markdown]
# ## What to look for
#
# - **Coverage against the nominal level.** Coverage below 0.5 and 0.9, a reliability
#   curve under the diagonal and a U-shaped PIT histogram all say the same thing: the
#   forecast intervals are too narrow, the model is overconfident. Coverage above the
#   levels and a hump in the PIT histogram would mean too wide intervals. A slope in the
#   PIT histogram would mean a biased forecast.
# - **The observation noise.** Without it the draws describe where the *mean* of the
#   observations will be, not the observations themselves, so their intervals are
#   narrower and their coverage lower. How much lower depends on how the spread of the
#   forecast paths compares with `obs_scale`: the difference is large where the paths are
#   pinned down more tightly than the noise (just after dense observations, or when
#   reconstructing the observed stretch) and small where the path spread dominates, as it
#   does over most of this forecast window. Always add the noise before scoring or
#   plotting predictive bands of observations.
# - **CRPS against climatology.** The lead-time table shows the forecast spreading: its
#   interval width grows with the horizon, and so does its CRPS, towards the CRPS of the
#   climatology, because the oscillator forgets its phase. A forecast whose CRPS is below
#   the climatology's carries information about the future of each series.
# - **What this fit gets right and wrong.** With the sizes used here, at both the smoke-test
#   sizes (16 series, 500 steps) and the full ones (64 series, 2000 steps), our runs gave
#   forecasts that beat the climatology on CRPS, most clearly at short lead times, but
#   whose intervals were too narrow: coverage well below the nominal levels at every lead
#   time, a reliability curve under the diagonal and a U-shaped PIT histogram. The
#   forecast figure shows why: where a series has no observation shortly before the
#   split, the posterior path can be off in phase by then, and the learned prior SDE
#   spreads its forecast paths less than the true process does. Overconfident forecasts
#   are a common result of a briefly trained latent SDE; longer training, more series and
#   more ELBO particles (`num_particles`) are the first things to try, and this section
#   is how you check whether they helped. Points along one series are correlated, so
#   coverage on a few hundred held-out points scatters more than the binomial band
#   suggests.
