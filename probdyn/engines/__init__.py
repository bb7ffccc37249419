"""The backend-neutral half of the engines (NumPy only).

Each backend's ``engines/`` folder holds the runners; what they share is written once
here so the two cannot drift apart: the checks of a model and its arguments, with
their messages (`checks`); where NUTS, HMC and VI's autoguides start, and NUTS's tree
depth (`mcmc`); the maths and tuning rules of tempered SMC (`smc_math`), the metric of
its moves (`smc_preconditioner`) and what it records per stage (`smc_traces`); how
Feynman–Kac SMC cuts a model's data into batches (`fk_stream`); and the warnings an
ensemble gives (`ensemble_warnings`). The engine configs themselves (`NUTS`, `VI`,
...) are part of the core, in `probdyn.core.engines`.
"""
