"""Max pooling over non-overlapping windows, as the models use it."""

from __future__ import annotations

import jax

from anodev2_jax import backend

Array = jax.Array


def max_pool(x: Array, size: int, impl: str = "xla") -> Array:
    """Max over non-overlapping size × size windows: (N, H, W, C) -> (N, H/size, W/size, C).

    A reshape and a max (:func:`window_max`), not ``flax.linen.max_pool``, whose gradient
    (select-and-scatter) XLA:CPU runs several times slower. At exact ties the gradient is
    split equally among the tied elements rather than given to one. ``impl``: a conv impl
    (``anodev2_jax.nn.conv.IMPLS``); where it may run oneDNN
    (:func:`anodev2_jax.backend.runs_onednn`: float32 on the CPU), the pool and its gradient
    are :mod:`anodev2_jax.cpu.max_pool`'s, equal to XLA's but at ties, where the gradient
    goes to one tied element.
    """
    h, w = x.shape[1:3]
    if h % size or w % size:
        raise ValueError(f"max_pool window {size} does not divide the input's {h}x{w}")
    if backend.runs_onednn(impl, x.dtype):
        from anodev2_jax.cpu import max_pool as cpu_max_pool  # only where it runs

        return cpu_max_pool.max_pool(x, size)
    return window_max(x, size)


def window_max(x: Array, size: int) -> Array:
    """x (N, H, W, C) -> (N, H/size, W/size, C), the max of each size × size window; H and W
    multiples of size."""
    n, h, w, c = x.shape
    return x.reshape(n, h // size, size, w // size, size, c).max(axis=(2, 4))
