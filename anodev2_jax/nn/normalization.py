"""BatchNorm as pure functions, with per-evaluation running statistics for the ODE blocks.

A layer outside the ODE blocks normalizes once per call and keeps one running mean and
variance, (C,). An ODE block evaluates its field f Nz·stages times per call, and each
evaluation k (z-step n, stage i, k = n·stages + i) sees activations with moments of its
own (z₀ and z₀ + h f(z₀) differ, and θ(t) evolves): its running statistics are therefore
per evaluation, (E, C) with E = Nz·stages, and evaluation k is normalized in eval mode with
row k (docs/math.md §7). Scale and offset are shared by default ((C,), the parameter count of the
residual block) or, optionally, per evaluation too ((E, C)).

Training mode differentiates in closed form (:func:`batch_norm_train`), on every backend.
Where an op given the conv impl runs the C++ kernels
(:func:`anodev2_jax.backend.runs_cpu_kernels`), training mode and its gradient are those of
:mod:`anodev2_jax.cpu.batch_norm` instead, a following ReLU fused in.
"""

from __future__ import annotations

import bisect
import functools
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anodev2_jax import backend
from anodev2_jax import solve as solve_lib

PyTree = Any
Array = jax.Array

# Flax convention: running = momentum·running + (1 - momentum)·batch (PyTorch's momentum 0.1).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
NORM_PARAMS = ("shared", "per_evaluation")


def channels(v: Array) -> Array:
    """(C,) -> (1, 1, 1, C), broadcastable against NHWC activations."""
    return v.reshape(1, 1, 1, -1)


def batch_moments(x: Array) -> dict[str, Array]:
    """Per-channel mean and (biased) variance of x (N, H, W, C) -> {"mean", "var"}: (C,)."""
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x - channels(mean)), axis=(0, 1, 2))
    return {"mean": mean, "var": var}


def batch_norm(
    x: Array,
    norm: dict[str, Array],
    train: bool,
    epsilon: float = BN_EPSILON,
    *,
    offset: Array | None = None,
    relu: bool = False,
    impl: str = "xla",
) -> tuple[Array, dict[str, Array]]:
    """BatchNorm of x + offset (x: (N, H, W, C)), then a ReLU if ``relu``, and the moments it
    used.

    ``norm``: {"scale", "bias"} (C,) and, for ``train=False``, the running {"mean", "var"}.
    Training normalizes with the batch's own moments (and differentiates through them).
    ``offset``: (C,), e.g. the bias of the conv before; it only shifts the mean, so it is
    added to the mean, not to x (one pass over x fewer). ``impl``: a conv impl
    (``conv.IMPLS``); where it runs the C++ kernels
    (:func:`anodev2_jax.backend.runs_cpu_kernels`) and x, scale and bias share a dtype,
    training mode is the C++ kernel's (equal to the formula up to rounding, reverse mode to
    any order).
    """
    same_dtype = norm["scale"].dtype == norm["bias"].dtype == x.dtype
    if train and same_dtype and backend.runs_cpu_kernels(impl, x.dtype):
        from anodev2_jax.cpu import batch_norm as cpu_batch_norm  # only where it runs

        y, moments = cpu_batch_norm.batch_norm_relu(x, norm["scale"], norm["bias"], epsilon, relu)
    elif train:
        y, moments = batch_norm_train(x, norm["scale"], norm["bias"], epsilon)
        y = jax.nn.relu(y) if relu else y
    else:
        moments = {"mean": norm["mean"], "var": norm["var"]}
        mean = moments["mean"] if offset is None else moments["mean"] - offset
        inv = norm["scale"] * jax.lax.rsqrt(moments["var"] + epsilon)
        y = (x - channels(mean)) * channels(inv) + channels(norm["bias"])
        return (jax.nn.relu(y) if relu else y), moments
    if offset is not None:
        moments = {**moments, "mean": moments["mean"] + offset}
    return y, moments


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(
    x: Array, scale: Array, bias: Array, epsilon: float
) -> tuple[Array, dict[str, Array]]:
    """Training-mode BatchNorm and its batch moments, with the gradient in closed form.

    x: (N, H, W, C); scale, bias: (C,) -> (y of x's shape, {"mean", "var"}: (C,)). The closed
    form reads and writes x-sized arrays fewer times than autodiff through the mean, the
    variance and the normalization, passes that cost about as much as the arithmetic
    (BENCHMARKS.md). Reverse mode only, to any order.
    """
    return batch_norm_train_fwd(x, scale, bias, epsilon)[0]


def batch_norm_train_fwd(
    x: Array, scale: Array, bias: Array, epsilon: float
) -> tuple[tuple[Array, dict[str, Array]], tuple[Array, ...]]:
    moments = batch_moments(x)
    rstd = jax.lax.rsqrt(moments["var"] + epsilon)
    y = (x - channels(moments["mean"])) * channels(scale * rstd) + channels(bias)
    return (y, moments), (x, moments["mean"], rstd, scale)


def batch_norm_train_bwd(
    epsilon: float, residuals: tuple[Array, ...], cotangents: tuple[Array, dict[str, Array]]
) -> tuple[Array, Array, Array]:
    x, mean, rstd, scale = residuals
    dy, dmoments = cotangents
    m = x.size // x.shape[-1]  # elements per channel
    xhat = (x - channels(mean)) * channels(rstd)
    dbias = jnp.sum(dy, axis=(0, 1, 2))
    dscale = jnp.sum(dy * xhat, axis=(0, 1, 2))
    # d/dx of y: scale·rstd·(dy - mean(dy) - xhat·mean(dy·xhat)); of the moments: dmean/m
    # and dvar·2(x - mean)/m = dvar·2·xhat/(m·rstd).
    dx = channels(scale * rstd) * (dy - channels(dbias / m) - xhat * channels(dscale / m))
    dx = dx + channels(dmoments["mean"] / m) + xhat * channels(2.0 * dmoments["var"] / (m * rstd))
    return dx, dscale, dbias


batch_norm_train.defvjp(batch_norm_train_fwd, batch_norm_train_bwd)


def fold_moments(
    stats: dict[str, Array], moments: dict[str, Array], momentum: float = BN_MOMENTUM
) -> dict[str, Array]:
    """Running statistics after one training step: running ← momentum·running +
    (1 - momentum)·moments, for mean and var, leaf by leaf ((C,) or, per evaluation,
    (E, C)). Not differentiated: the statistics follow the forward pass only."""
    return jax.tree.map(
        lambda old, new: momentum * old + (1.0 - momentum) * new,
        stats,
        jax.lax.stop_gradient(moments),
    )


def stack_evaluations(moments: list[dict[str, Array]]) -> dict[str, Array]:
    """The moments of E evaluations, each {"mean", "var"}: (C,), as (E, C) arrays."""
    return jax.tree.map(lambda *rows: jnp.stack(rows), *moments)


def carry_rows(norm: dict[str, Array], weights: np.ndarray | None) -> dict[str, Array]:
    """``norm`` with each per-evaluation (E_old, C) leaf carried to (E_new, C) rows,
    ``weights`` (E_new, E_old) @ leaf (:func:`carry_matrix`); (C,) leaves, and every leaf
    when ``weights`` is None, pass unchanged."""
    if weights is None:
        return norm
    return {
        name: jnp.asarray(weights, v.dtype) @ v if v.ndim == 2 else v for name, v in norm.items()
    }


def at_evaluation(norm: dict[str, Array], k: int) -> dict[str, Array]:
    """A per-evaluation BatchNorm's variables for evaluation k: row k of each (E, C) leaf
    (running statistics, and scale/offset when they are per evaluation); (C,) leaves are
    shared and pass unchanged."""
    return {name: v[k] if v.ndim == 2 else v for name, v in norm.items()}


def evaluation_times(plan: solve_lib.Plan) -> tuple[list[Fraction], list[int]]:
    """The time t_k = (n + c_i)/Nz and stage i of each f evaluation k = n·stages + i."""
    cs = [Fraction(c).limit_denominator() for c in plan.tableau.c]
    times = [(n + c) / plan.num_z_steps for n in range(plan.num_z_steps) for c in cs]
    return times, [i for _ in range(plan.num_z_steps) for i in range(len(cs))]


def carry_matrix(old: solve_lib.Plan, new: solve_lib.Plan) -> np.ndarray:
    """(E_new, E_old) weights that carry per-evaluation rows from ``old``'s evaluations to
    ``new``'s: one-hot where an old evaluation has the same time and stage, else linear in t
    over the old rows (rows at equal times averaged; constant beyond the ends)."""
    old_times, old_stages = evaluation_times(old)
    new_times, new_stages = evaluation_times(new)
    grid = sorted(set(old_times))
    members = [[k for k, t in enumerate(old_times) if t == u] for u in grid]
    weights = np.zeros((len(new_times), len(old_times)))
    for row, (t, stage) in enumerate(zip(new_times, new_stages, strict=True)):
        pairs = zip(old_times, old_stages, strict=True)
        same = [k for k, (u, s) in enumerate(pairs) if (u, s) == (t, stage)]
        if same:
            weights[row, same[0]] = 1.0
            continue
        right = min(max(bisect.bisect_left(grid, t), 1), len(grid) - 1) if len(grid) > 1 else 0
        left = max(right - 1, 0)
        span = float(grid[right] - grid[left])
        share = 0.0 if span == 0 else min(max(float(t - grid[left]) / span, 0.0), 1.0)
        for group, w in ((left, 1.0 - share), (right, share)):
            for k in members[group]:
                weights[row, k] += w / len(members[group])
    return weights
