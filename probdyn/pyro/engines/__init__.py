"""The pyro backend's engine runners, one module per engine; each registers as a
service of this backend in `probdyn.pyro.services`. The shared maths is in
`probdyn.engines`."""
