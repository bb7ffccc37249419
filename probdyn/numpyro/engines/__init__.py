"""The numpyro backend's engine runners, one module per engine; each registers as a
service of this backend in `probdyn.numpyro.services`. The shared maths is in
`probdyn.engines`."""
