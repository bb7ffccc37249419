"""The quality of the demo's fit, in the default suite (issue 17).

What the demo reports, computed as the demo computes it: the predator-prey universal
differential equation fitted to the synthetic data (seed 0) with the demo's own
engine settings, scored on the held-out extrapolation window (8 times x 2 species =
16 observations) with `calibration_table`.

The default suite checks `probdyn demo --engine vi` at its full sizes (2000 MAP +
3000 VI steps): its cost is nearly all JAX compilation, the same as at ``--quick``
sizes, and unlike the quick runs it is a fit worth checking. The NUTS demo's check
(coverage and R-hat) needs the full-size run, about 70 s: end to end (``e2e``).
Measured (float64, as here; synthetic data, key = seed; 2-core machine):

| run | seeds | held-out 90 % coverage | RMSE to the true states | max R-hat |
| --- | --- | --- | --- | --- |
| VI, full sizes | 0, 1, 2, 3 | 1.0, 1.0, 1.0, 1.0 | 0.54, 0.36, 0.30, 0.40 | |
| VI, ``--quick`` (200 + 200 steps) | 0, 1 | 0.88, 0.94 | 0.79, 0.84 | |
| VI, broken (2 + 2 steps) | 0, 1 | 0.94, 1.0 | 0.73, 0.70 | |
| NUTS, full sizes (2 x (250 + 250)) | 0, 1 | 0.94, 1.0 | 0.11, 0.19 | 1.040, 1.049 |
| NUTS, ``--quick`` (1 x (30 + 30)) | 0-5 | 0.81, 1.0, 0.81, 0.38, 0.44, 0.25 | | 2.7-3.1 (split) |

Cost on an idle 2-core machine: the VI fit and prediction take 12-17 s in a process
where JAX has compiled before (42 s for this file alone, in a fresh process); the
full NUTS demo 65-100 s of CPU.

The quick NUTS run is not converged: the split R-hat (its one chain cut in four) of
its largest site was 2.7-3.1, and of ``alpha``, ``gamma``, ``sigma``, ``z0`` 1.4-2.6,
over seeds 0-5 (with 150 + 100 draws at tree depth 5 still 1.4-2.1), and its coverage
swings with the seed: "coverage >= 0.6 and R-hat <= 1.1" fails for most seeds at the
quick sizes, which are a smoke test.

Thresholds. Coverage >= 0.6: at the nominal 0.9, 16 independent points fall below
0.6 with probability 2e-4 (binomial; sd 0.075), so this fails only a fit whose
intervals sit in the wrong place or are far too narrow. Coverage alone passes a fit
that has not moved from its start (the broken run covers 0.94-1.0 with wide bands),
so the RMSE of the predicted states to the truth must be <= 0.65 for VI: between the
full runs (0.30-0.54, mean 0.40, sd 0.10, so 0.65 is 2.5 sd above the mean) and the
broken and quick ones (>= 0.70). R-hat <= 1.1 for NUTS: the measured maxima over
every site (about 70 scalars) were 1.04-1.05, and 1.06 in docs/benchmarks.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from probdyn.calibration import calibration_table
from probdyn.demo._run import DemoSettings, _engine, _load_data, _model

# Early proposals can leave the ODE's stable region; the runner rejects them and
# says so with a RuntimeWarning, expected here (as in the demo's own runs).
ODE_WARNING = "ignore:.*solve\\(s\\) failed during the run:RuntimeWarning"


@pytest.fixture(scope="module")
def vi_demo() -> dict[str, Any]:
    import probdyn

    data = _load_data("synthetic", 0)
    engine = _engine("vi", DemoSettings())
    post = probdyn.fit(_model("numpyro"), data.t_train, data.y_train, engine=engine, key=0)
    test = post.predict(data.t_test, key=2, sites=["z", "y"])  # the demo's key + 2
    return {
        "observations": calibration_table(test["y"], data.y_test, levels=(0.9,)),
        "states": calibration_table(test["z"], data.z_test, levels=(0.9,)),
    }


@pytest.mark.filterwarnings(ODE_WARNING)
def test_vi_demo_covers_the_held_out_window_and_finds_the_trajectory(
    vi_demo: dict[str, Any],
) -> None:
    observations, states = vi_demo["observations"], vi_demo["states"]
    assert observations.loc[0.9, "n"] == 16
    assert observations.loc[0.9, "coverage"] >= 0.6, observations
    assert states.loc[0.9, "rmse"] <= 0.65, states


# Two chains of 250 + 250 draws at tree depth 7 on the neural ODE: about a minute of
# sampling and compilation on 2 cores, so end to end.
@pytest.mark.e2e
@pytest.mark.filterwarnings(ODE_WARNING)
def test_nuts_demo_covers_the_held_out_window_and_converges(tmp_path: Path) -> None:
    import arviz as az
    import numpy as np

    from probdyn.demo._run import run_demo

    result = run_demo(engine="nuts", data="synthetic", out=str(tmp_path), seed=0, verbose=False)
    table = result["calibration"].reset_index().set_index(["target", "nominal"])
    assert table.loc[("held-out observations", 0.9), "coverage"] >= 0.6, table
    rhat = az.rhat(result["posterior"].to_arviz())
    worst = max(float(np.max(rhat[name].values)) for name in rhat.data_vars)
    assert worst <= 1.1, rhat
