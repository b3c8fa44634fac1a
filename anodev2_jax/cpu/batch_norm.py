"""Training-mode BatchNorm (and a following ReLU) by oneDNN, for the CPU.

:func:`batch_norm_relu` computes what :func:`anodev2_jax.nn.normalization.batch_norm_train`
and ``jax.nn.relu`` compute, forward and backward by oneDNN's primitives
(``csrc/onednn_norm_pool.cc``, the ReLU fused in), which beat both XLA and our former C++
kernels on every shape of the models (BENCHMARKS.md). Its derivatives of any order (reverse
mode) are those of the jnp formula. Used by :func:`anodev2_jax.nn.normalization.batch_norm`
where an op given the conv impl may run oneDNN (:func:`anodev2_jax.backend.runs_onednn`:
float32).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anodev2_jax.cpu import onednn
from anodev2_jax.nn import normalization

Array = jax.Array


def _reference(
    x: Array, scale: Array, bias: Array, epsilon: float, relu: bool
) -> tuple[Array, dict[str, Array]]:
    """What :func:`batch_norm_relu` computes, in jnp: the reference for its derivatives."""
    y, moments = normalization.batch_norm_train(x, scale, bias, epsilon)
    return (jax.nn.relu(y) if relu else y), moments


def batch_norm_relu(
    x: Array, scale: Array, bias: Array, epsilon: float, relu: bool
) -> tuple[Array, dict[str, Array]]:
    """Training-mode BatchNorm of float32 x (N, H, W, C), then a ReLU if ``relu``, and the
    batch's moments, forward and VJP by oneDNN: what
    ``anodev2_jax.nn.normalization.batch_norm_train`` (and ``jax.nn.relu``) compute, equal
    to rounding. scale, bias: (C,) -> (y of x's shape, {"mean", "var"}: (C,)). Reverse mode
    only, to any order; requires :func:`anodev2_jax.cpu.onednn.available`."""
    y, moments, _ = _batch_norm_relu(x, scale, bias, epsilon, relu)
    return y, moments


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_relu(
    x: Array, scale: Array, bias: Array, epsilon: float, relu: bool
) -> tuple[Array, dict[str, Array], Array]:
    """:func:`batch_norm_relu` and oneDNN's workspace, which its backward reads."""
    c = jax.ShapeDtypeStruct(scale.shape, x.dtype)
    ws = onednn.workspace("batch_norm", x.shape, int(relu), epsilon)
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), c, c, ws)
    call = jax.ffi.ffi_call("anodev2_onednn_batch_norm", out, vmap_method="sequential")
    y, mean, var, ws = call(x, scale, bias, epsilon=np.float32(epsilon), relu=np.int64(relu))
    return y, {"mean": mean, "var": var}, ws


def _batch_norm_relu_fwd(
    x: Array, scale: Array, bias: Array, epsilon: float, relu: bool
) -> tuple[tuple[Array, dict[str, Array], Array], tuple[Any, ...]]:
    y, moments, ws = _batch_norm_relu(x, scale, bias, epsilon, relu)
    return (y, moments, ws), (x, scale, bias, moments, ws)


def _batch_norm_relu_bwd(
    epsilon: float,
    relu: bool,
    residuals: tuple[Any, ...],
    cotangents: tuple[Array, dict[str, Array], Any],
) -> tuple[Array, Array, Array]:
    x, scale, bias, moments, ws = residuals
    g, dmoments, _ = cotangents
    return _batch_norm_relu_grad(x, scale, bias, moments, ws, g, dmoments, epsilon, relu)


_batch_norm_relu.defvjp(_batch_norm_relu_fwd, _batch_norm_relu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _batch_norm_relu_grad(
    x: Array,
    scale: Array,
    bias: Array,
    moments: dict[str, Array],
    ws: Array,
    g: Array,
    dmoments: dict[str, Array],
    epsilon: float,
    relu: bool,
) -> tuple[Array, Array, Array]:
    """(dx, dscale, dbias) by oneDNN, given ``moments``, the batch's own, and ``ws``, the
    forward's workspace. Differentiable as the VJP of :func:`_reference`, through which x
    determines the moments (their own cotangent is zero)."""
    c = jax.ShapeDtypeStruct(scale.shape, x.dtype)
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), c, c)
    call = jax.ffi.ffi_call("anodev2_onednn_batch_norm_grad", out, vmap_method="sequential")
    args = (x, g, scale, moments["mean"], moments["var"], ws, dmoments["mean"], dmoments["var"])
    dx, dscale, dbias = call(*args, epsilon=np.float32(epsilon), relu=np.int64(relu))
    return dx, dscale, dbias


def _batch_norm_relu_grad_fwd(*args: Any) -> tuple[tuple[Array, Array, Array], tuple[Any, ...]]:
    return _batch_norm_relu_grad(*args), args[:7]  # residuals: the array inputs


def _batch_norm_relu_grad_bwd(
    epsilon: float, relu: bool, residuals: tuple[Any, ...], cotangent: tuple[Array, ...]
) -> tuple[Any, ...]:
    x, scale, bias, moments, ws, g, dmoments = residuals

    def vjp(x: Array, scale: Array, bias: Array, g: Array, dmoments: dict[str, Array]) -> Any:
        forward = functools.partial(_reference, epsilon=epsilon, relu=relu)
        return jax.vjp(forward, x, scale, bias)[1]((g, dmoments))

    dx, dscale, dbias, dg, ddmoments = jax.vjp(vjp, x, scale, bias, g, dmoments)[1](cotangent)
    dws = np.zeros(ws.shape, jax.dtypes.float0)
    return dx, dscale, dbias, jax.tree.map(jnp.zeros_like, moments), dws, dg, ddmoments


_batch_norm_relu_grad.defvjp(_batch_norm_relu_grad_fwd, _batch_norm_relu_grad_bwd)
