"""Hand-written kernels (Pallas) for the hot paths; each has a reference in plain JAX it is tested against."""
