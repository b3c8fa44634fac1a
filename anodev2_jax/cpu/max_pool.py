"""The max pool by oneDNN, for the CPU.

:func:`max_pool` computes :func:`anodev2_jax.nn.pooling.window_max`, forward and backward by
oneDNN's primitives (``csrc/onednn_max_pool.cc``), which beat XLA's reduce-window and our
former C++ gradient on every shape of the models (BENCHMARKS.md). The forward keeps each
window's argmax (oneDNN's workspace) for the backward, which sends the window's gradient
there. Used by :func:`anodev2_jax.nn.pooling.max_pool` where an op given the conv impl may run
oneDNN (:func:`anodev2_jax.backend.runs_onednn`: float32).

Where a window's maximum is tied, oneDNN's gradient goes to one of the tied elements and XLA's
derivative of the reduce-max shares it among them: the two differ only there. Every pool of
the models reads non-negative activations (a ReLU's output, or AlexNet's ODE block, whose
input and field are ReLU outputs), so its ties are in practice windows of zeros, and a
gradient sent to a zero goes on only into ReLUs at rest, which drop it: the parameters'
gradients are the same either way.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anodev2_jax.cpu import onednn

Array = jax.Array


def max_pool(x: Array, size: int) -> Array:
    """Max over non-overlapping size × size windows of float32 x (N, H, W, C) -> (N, H/size,
    W/size, C), by oneDNN. Reverse mode only, to any order; requires
    :func:`anodev2_jax.cpu.onednn.available`."""
    return _max_pool(x, size)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x: Array, size: int) -> tuple[Array, Array]:
    """:func:`max_pool` and oneDNN's workspace (each window's argmax) for its backward."""
    n, h, w, c = x.shape
    y_shape = jax.ShapeDtypeStruct((n, h // size, w // size, c), x.dtype)
    out = (y_shape, onednn.pool_workspace(x.shape, size))
    call = jax.ffi.ffi_call("anodev2_onednn_max_pool", out, vmap_method="sequential")
    y, ws = call(x, size=np.int64(size))
    return y, ws


def _max_pool_fwd(x: Array, size: int) -> tuple[tuple[Array, Array], tuple[Array, Array, Array]]:
    y, ws = _max_pool(x, size)
    return (y, ws), (x, y, ws)


def _max_pool_bwd(
    size: int, residuals: tuple[Array, Array, Array], cotangents: tuple[Array, Any]
) -> tuple[Array]:
    x, y, ws = residuals
    return (_max_pool_grad(x, y, ws, cotangents[0], size),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def _window_sum(x: Array, size: int) -> Array:
    n, h, w, c = x.shape
    return x.reshape(n, h // size, size, w // size, size, c).sum(axis=(2, 4))


def _upsample(y: Array, size: int) -> Array:
    """(N, Ho, Wo, C) -> (N, Ho·size, Wo·size, C), each value repeated over its window."""
    return jnp.repeat(jnp.repeat(y, size, axis=1), size, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _max_pool_grad(x: Array, y: Array, ws: Array, g: Array, size: int) -> Array:
    """The max pool's dx by oneDNN from its forward's workspace ``ws``; differentiable
    (reverse mode): linear in g (its transpose reads each window's g at the window's maxima,
    shared where they tie, as XLA's), piecewise constant in x and y."""
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    call = jax.ffi.ffi_call("anodev2_onednn_max_pool_grad", out, vmap_method="sequential")
    return call(g, ws, size=np.int64(size))


def _max_pool_grad_fwd(
    x: Array, y: Array, ws: Array, g: Array, size: int
) -> tuple[Array, tuple[Array, Array, Array]]:
    return _max_pool_grad(x, y, ws, g, size), (x, y, ws)


def _max_pool_grad_bwd(
    size: int, residuals: tuple[Array, Array, Array], cotangent: Array
) -> tuple[Array, Array, Any, Array]:
    x, y, ws = residuals
    mask = (x == _upsample(y, size)).astype(x.dtype)
    dg = _window_sum(mask * cotangent, size) / _window_sum(mask, size)
    dws = np.zeros(ws.shape, jax.dtypes.float0)
    return jnp.zeros_like(x), jnp.zeros_like(y), dws, dg


_max_pool_grad.defvjp(_max_pool_grad_fwd, _max_pool_grad_bwd)
