"""Diagnostics that work on any `Posterior`, whatever its engine or backend.

* `calibration`: coverage, PIT, CRPS, NLPD, RMSE, interval width and their plots
  (public as `probdyn.calibration`);
* `sbc`: simulation-based calibration of an engine on a model (`probdyn.sbc`);
* `compare`: several engines on one model, scored on held-out data (`probdyn.compare`).

Nothing here imports jax or torch: what needs a backend (running the model once for
SBC, the float settings of worker processes) is asked of the backend's services.
"""
