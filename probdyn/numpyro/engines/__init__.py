"""The numpyro backend's engine runners, one module per engine; each registers as a
service of this backend in `probdyn.numpyro.services`. The shared maths is in
`probdyn.engines`.

Modules only this backend has (``timing``, ``shard``, ``batching``, ``smc_program``,
``smc_kernels``) serve JAX's compilation, devices and ``vmap``; why Pyro needs none is
said in `probdyn.pyro.engines`.
"""
