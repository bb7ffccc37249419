"""The backend-neutral half of the engines (NumPy only).

Each backend's ``engines/`` folder holds the runners; what they share is written once
here so the two cannot drift apart: the maths and tuning rules of tempered SMC
(`smc_math`), how Feynman–Kac SMC cuts a model's data into batches (`fk_stream`), and
the warnings an ensemble gives (`ensemble_warnings`). The engine configs themselves
(`NUTS`, `VI`, ...) are part of the core, in `probdyn.core.engines`.
"""
