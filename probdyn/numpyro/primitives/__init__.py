"""The numpyro backend's model primitives (the code that needs the PPL; the shared checks
and layouts are in `probdyn.primitives`). Import them from `probdyn.numpyro`."""
