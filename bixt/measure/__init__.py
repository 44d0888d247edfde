"""Measurement: MAC counting with every fvcore handle in one module (flops.py), the peak-memory probe (memory.py),
`bixt profile` (profile.py) and the scaling sweep of `bixt compare` (compare.py). Depends on bixt.nn, bixt.models
and bixt.io only."""
