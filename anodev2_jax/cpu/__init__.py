"""CPU-only speed-ups, plugged in by :mod:`anodev2_jax.backend`: C++ kernels, custom VJPs."""
