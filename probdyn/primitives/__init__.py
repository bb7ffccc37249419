"""The backend-neutral half of the model primitives (NumPy only).

Each backend's ``primitives/`` folder holds the code that needs its PPL; the argument
checks, time grids, masks, layouts and initial weights are written once here, so that
the NumPyro and Pyro twins accept and refuse the same input with the same message and
build the same sites from the same arguments.
"""
