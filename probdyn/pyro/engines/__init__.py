"""The pyro backend's engine runners, one module per engine; each registers as a
service of this backend in `probdyn.pyro.services`. The shared maths is in
`probdyn.engines`.

NumPyro modules with no counterpart here, and why:

* ``timing`` (`CompileTimer`): Pyro compiles nothing, so every runner records
  ``compile_time`` 0.
* ``shard`` (`shard_leading`): sharding an axis across devices is JAX's
  (``jax.sharding``); the Pyro runners run on one device.
* ``batching`` (`map_batched`, cache-sized batches of a ``vmap``): measured for
  XLA on a CPU only; the Pyro runners' ``torch.func.vmap`` over particles or
  members is unmeasured, so it takes them all at once (or loops, see
  ``attrs["batched"]``).
* ``smc_program``, ``smc_kernels`` and ``smc.sample_smc`` / ``SMCResult``: the
  NumPyro SMC runner compiles and caches its stage (`smc_program`), builds it on
  BlackJAX's kernels (`smc_kernels`), and lets repeated runs reuse that program
  without post-processing (`sample_smc`); here the stages and moves run in Python
  in `smc`, with nothing compiled to reuse.

Names only this backend has, and why: ``map.adam`` (Pyro's ``ClippedAdam`` with the
clipping off and a per-step decay, the Adam with exponential decay that NumPyro takes
from optax), and ``ensemble.prior_medians`` (the members' start, traced eagerly down
the model; NumPyro computes it inside its compiled ensemble program).
"""
