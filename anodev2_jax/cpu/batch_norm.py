"""Training-mode BatchNorm (and a following ReLU) by the C++ kernels, for the CPU.

:func:`batch_norm_relu` computes what :func:`anodev2_jax.nn.normalization.batch_norm_train`
and ``jax.nn.relu`` compute, in two passes over x forward (``csrc/batch_norm.cc``: the
moments, then the normalization with the ReLU fused in) and two backward, where XLA makes
more. Its derivatives of any order (reverse mode) are those of the jnp formula. Used by
:func:`anodev2_jax.nn.normalization.batch_norm` where an op given the conv impl runs the C++
kernels (:func:`anodev2_jax.backend.runs_cpu_kernels`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from anodev2_jax.cpu import native
from anodev2_jax.nn import normalization

Array = jax.Array


def _reference(
    x: Array, scale: Array, bias: Array, epsilon: float, relu: bool
) -> tuple[Array, dict[str, Array]]:
    """What :func:`batch_norm_relu` computes, in jnp: the reference for its derivatives."""
    y, moments = normalization.batch_norm_train(x, scale, bias, epsilon)
    return (jax.nn.relu(y) if relu else y), moments


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_relu(
    x: Array, scale: Array, bias: Array, epsilon: float, relu: bool
) -> tuple[Array, dict[str, Array]]:
    """Training-mode BatchNorm of x (N, H, W, C), then a ReLU if ``relu``, and the batch's
    moments, by the C++ kernel (``csrc/batch_norm.cc``), its VJP by the C++ kernel: what
    ``anodev2_jax.nn.normalization.batch_norm_train`` (and ``jax.nn.relu``) compute, equal
    to rounding. scale, bias: (C,) -> (y of x's shape, {"mean", "var"}: (C,)). Reverse mode
    only, to any order; requires :func:`anodev2_jax.cpu.native.available`."""
    y, mean, var = native.batch_norm(x, scale, bias, epsilon, relu)
    return y, {"mean": mean, "var": var}


def _batch_norm_relu_fwd(
    x: Array, scale: Array, bias: Array, epsilon: float, relu: bool
) -> tuple[tuple[Array, dict[str, Array]], tuple[Any, ...]]:
    y, moments = batch_norm_relu(x, scale, bias, epsilon, relu)
    return (y, moments), (x, scale, bias, moments)


def _batch_norm_relu_bwd(
    epsilon: float,
    relu: bool,
    residuals: tuple[Any, ...],
    cotangents: tuple[Array, dict[str, Array]],
) -> tuple[Array, Array, Array]:
    x, scale, bias, moments = residuals
    g, dmoments = cotangents
    return _batch_norm_relu_grad(x, scale, bias, moments, g, dmoments, epsilon, relu)


batch_norm_relu.defvjp(_batch_norm_relu_fwd, _batch_norm_relu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _batch_norm_relu_grad(
    x: Array,
    scale: Array,
    bias: Array,
    moments: dict[str, Array],
    g: Array,
    dmoments: dict[str, Array],
    epsilon: float,
    relu: bool,
) -> tuple[Array, Array, Array]:
    """(dx, dscale, dbias) by the C++ kernel, given ``moments``, the batch's own (it takes
    them instead of recomputing them). Differentiable as the VJP of :func:`_reference`,
    through which x determines the moments (their own cotangent is zero)."""
    return native.batch_norm_grad(
        x,
        g,
        scale,
        bias,
        (moments["mean"], moments["var"]),
        (dmoments["mean"], dmoments["var"]),
        epsilon,
        relu,
    )


def _batch_norm_relu_grad_fwd(*args: Any) -> tuple[tuple[Array, Array, Array], tuple[Any, ...]]:
    return _batch_norm_relu_grad(*args), args[:6]  # residuals: the differentiable inputs


def _batch_norm_relu_grad_bwd(
    epsilon: float, relu: bool, residuals: tuple[Any, ...], cotangent: tuple[Array, ...]
) -> tuple[Any, ...]:
    x, scale, bias, moments, g, dmoments = residuals

    def vjp(x: Array, scale: Array, bias: Array, g: Array, dmoments: dict[str, Array]) -> Any:
        forward = functools.partial(_reference, epsilon=epsilon, relu=relu)
        return jax.vjp(forward, x, scale, bias)[1]((g, dmoments))

    dx, dscale, dbias, dg, ddmoments = jax.vjp(vjp, x, scale, bias, g, dmoments)[1](cotangent)
    return dx, dscale, dbias, jax.tree.map(jnp.zeros_like, moments), dg, ddmoments


_batch_norm_relu_grad.defvjp(_batch_norm_relu_grad_fwd, _batch_norm_relu_grad_bwd)
