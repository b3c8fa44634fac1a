"""The max pool's gradient by a C++ kernel, for the CPU.

:func:`max_pool` computes :func:`anodev2_jax.nn.pooling.window_max`; its gradient is one pass
of ``csrc/max_pool.cc`` over x, where XLA's derivative of the reduce-max makes several, with
the same values (tied maxima share the gradient equally). Used by
:func:`anodev2_jax.nn.pooling.max_pool` where an op given the conv impl runs the C++ kernels
(:func:`anodev2_jax.backend.runs_cpu_kernels`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from anodev2_jax.cpu import native
from anodev2_jax.nn.pooling import window_max

Array = jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool(x: Array, size: int) -> Array:
    """Max over non-overlapping size × size windows of x (N, H, W, C) -> (N, H/size, W/size,
    C), its gradient by the C++ kernel. Reverse mode only, to any order; requires
    :func:`anodev2_jax.cpu.native.available`."""
    return window_max(x, size)


def _max_pool_fwd(x: Array, size: int) -> tuple[Array, tuple[Array, Array]]:
    y = window_max(x, size)
    return y, (x, y)


def _max_pool_bwd(size: int, residuals: tuple[Array, Array], g: Array) -> tuple[Array]:
    x, y = residuals
    return (_max_pool_grad(x, y, g, size),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def _window_sum(x: Array, size: int) -> Array:
    n, h, w, c = x.shape
    return x.reshape(n, h // size, size, w // size, size, c).sum(axis=(2, 4))


def _upsample(y: Array, size: int) -> Array:
    """(N, Ho, Wo, C) -> (N, Ho·size, Wo·size, C), each value repeated over its window."""
    return jnp.repeat(jnp.repeat(y, size, axis=1), size, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _max_pool_grad(x: Array, y: Array, g: Array, size: int) -> Array:
    """The max pool's dx by the C++ kernel; differentiable (reverse mode): linear in g, and
    piecewise constant in x and y (as XLA's reduce-max derivative)."""
    return native.max_pool_grad(x, y, g, size)


def _max_pool_grad_fwd(
    x: Array, y: Array, g: Array, size: int
) -> tuple[Array, tuple[Array, Array]]:
    return native.max_pool_grad(x, y, g, size), (x, y)


def _max_pool_grad_bwd(
    size: int, residuals: tuple[Array, Array], cotangent: Array
) -> tuple[Array, Array, Array]:
    x, y = residuals
    mask = (x == _upsample(y, size)).astype(x.dtype)
    dg = _window_sum(mask * cotangent, size) / _window_sum(mask, size)
    return jnp.zeros_like(x), jnp.zeros_like(y), dg


_max_pool_grad.defvjp(_max_pool_grad_fwd, _max_pool_grad_bwd)
