"""The discrete KKT conditions (docs/math.md §6, paper eq. 2.5a-e), from per-step VJPs.

Given a_Nz = ∂J/∂z_Nz, :func:`kkt_gradients` runs the adjoint recursion backwards through the
discrete map that :func:`anodev2_jax.coupled_solve` computes, with the sign chosen so that
every adjoint is a plain gradient (a_n = ∂J/∂z_n ↔ -α(t_n), b_m = ∂J/∂w_m ↔ -β(t_m),
g_n ↔ -h γ(t_n) in the paper's continuous notation):

    a_n    = a_{n+1} + h (∂f/∂z (z_n, θ_n))ᵀ a_{n+1}                 (2.5a)
    g_n    = h (∂f/∂θ (z_n, θ_n))ᵀ a_{n+1}                            (2.5b, γ)
    γ_j    = Σ_{n: m(n)=j} g_n        (the γ applied at schedule index j)
    s_m    = Σ_{j ≥ m} κ_{j,m} γ_j    (≈ ∫_t^1 Kᵀ(τ-t) γ(τ) dτ, the H(τ-t)K(t-τ) exchange)
    b_m    = (∂Φ/∂w (w_m))ᵀ b_{m+1} + s_m,   b_{m>M} = 0              (2.5c, β)
    ∂J/∂w0 = b_0                                                     (2.5d)
    ∂J/∂p  = Σ_m (∂Φ/∂p (w_m))ᵀ b_{m+1}                              (2.5e)
    ∂J/∂φ  = Σ_n h (∂f/∂φ (z_n, θ_n))ᵀ a_{n+1}
    ∂J/∂c  = (∂κ/∂c)ᵀ G,   G_{j,m} = ⟨γ_j, w_m⟩   (the kernel's own parameters c)

(Euler shown; M is the last weight index the z-solve uses; θ_j = Σ_{m ≤ j} κ_{j,m} w_m is the
coupling of :mod:`anodev2_jax.coupling`, eq. 2.3d). For the Dirac kernel κ = I: s_m = γ_m, the
paper's experiments, computed without κ. For an explicit Runge-Kutta step
with stages y_i = z_n + h Σ_{j<i} a_ij k_j, k_i = f(y_i, θ_{m_i}), the recursion runs through
the stages in reverse, with κ_i = ∂J/∂k_i:

    κ_i = h (b_i a_{n+1} + Σ_{j>i} a_ji λ_j),
    (λ_i, g_{n,i}, φ_{n,i}) = (∂f/∂(z, θ, φ) (y_{n,i}, θ_{m_i}))ᵀ κ_i,
    a_n = a_{n+1} + Σ_i λ_i,

and each stage's g_{n,i} is added to γ at its own schedule index m_i, and so reaches every b_m
with weight κ_{m_i,m}. Euler is the one-stage case κ_0 = h a_{n+1}. Only single f evaluations,
single weight steps Φ_δ and the quadrature c ↦ κ are differentiated (``jax.vjp``), never the
solve. The result must equal ``jax.grad`` of
``coupled_solve(..., gradient="dto")`` to rounding; tests/test_gradients.py checks it.

There is no regulariser R here: for J + R(w0, p), add ∂R/∂w0 and ∂R/∂p to ``grad_w0`` and
``grad_p`` (eq. 2.5d-e).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from anodev2_jax import coupling as coupling_lib
from anodev2_jax import evolution as evolution_lib
from anodev2_jax import stepping
from anodev2_jax.solve import (
    Plan,
    check_coupling,
    check_inputs,
    indexed_field,
    make_plan,
    split_float_leaves,
    weight_trajectory,
)

PyTree = Any


class KKTResult(NamedTuple):
    """Gradients of J and the adjoint trajectories of the discrete KKT recursion.

    grad_z0, grad_w0, grad_p, grad_args: ∂J/∂z0 (= a_0), ∂J/∂w0 (= b_0, eq. 2.5d), ∂J/∂p
      (eq. 2.5e) and ∂J/∂φ, shaped like z0, w0, p and args (float0 zeros for args' non-float
      leaves, which are not differentiated, as in coupled_solve).
    grad_coupling: ∂J/∂c for the kernel's parameters c, shaped like them (None without).
    a: [a_0, ..., a_Nz], a_n = ∂J/∂z_n, each shaped like z0 (eq. 2.5a).
    g: g[n][i] = (∂f/∂θ (y_{n,i}, θ_{m_i}))ᵀ κ_i, the γ contribution of stage i of z-step n,
      shaped like w0 (eq. 2.5b; Euler: g[n][0] = g_n).
    b: [b_0, ..., b_M], b_m = ∂J/∂w_m with M = plan.num_w_needed, shaped like w0 (eq. 2.5c).
    z: [z_0, ..., z_Nz], the forward activations.
    stage_z: stage_z[n][i] = y_{n,i}, the state at which stage i of z-step n evaluates f.
    w: [w_0, ..., w_M], the forward weights.
    stage_indices: stage_indices[n][i] = m_i, the schedule index j whose θ_j that stage uses.
    theta: [θ_0, ..., θ_M], θ_j = Σ_{m ≤ j} κ_{j,m} w_m (for Dirac, the w_m themselves).
    coupling_weights: κ, (M+1, M+1), lower triangular (the identity for Dirac).
    """

    grad_z0: PyTree
    grad_w0: PyTree
    grad_p: PyTree
    grad_args: Any
    grad_coupling: PyTree
    a: list[PyTree]
    g: tuple[tuple[PyTree, ...], ...]
    b: list[PyTree]
    z: list[PyTree]
    stage_z: tuple[tuple[PyTree, ...], ...]
    w: list[PyTree]
    stage_indices: tuple[tuple[int, ...], ...]
    theta: list[PyTree]
    coupling_weights: jax.Array


def _zeros(tree: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, tree)


def _add(x: PyTree, y: PyTree) -> PyTree:
    return stepping.axpy(x, 1.0, [(1.0, y)])


def _gram(xs: Sequence[PyTree], ys: Sequence[PyTree]) -> jax.Array:
    """G_{j,m} = ⟨xs[j], ys[m]⟩ summed over the leaves: (len(xs), len(ys))."""

    def leaf_gram(*leaves: jax.Array) -> jax.Array:
        x, y = jnp.stack(leaves[: len(xs)]), jnp.stack(leaves[len(xs) :])
        axes = tuple(range(1, x.ndim))
        return jnp.tensordot(x, y, axes=(axes, axes))

    grams: list[jax.Array] = jax.tree.leaves(jax.tree.map(leaf_gram, *xs, *ys))
    return functools.reduce(jnp.add, grams)


def _kernel_sources(mixing: jax.Array, gamma: list[PyTree]) -> list[PyTree]:
    """s_m = Σ_{j ≥ m} κ_{j,m} γ_j: the γ of every θ_j, sent back to each w_m it mixes in.

    ``mixing``: κ, (M+1, M+1); ``gamma``: [γ_0, ..., γ_M], each shaped like w."""
    return coupling_lib.mix(mixing.T, gamma)


def _recording(
    field: Callable[..., PyTree],
    theta: PyTree,
    phi: list[Any],
    index: int,
    states: list[PyTree],
    vjps: list[Callable[..., Any]],
) -> Callable[[PyTree], PyTree]:
    """The stage field y -> f(y, θ, φ, index) that appends y and the VJP of this evaluation."""

    def stage(y: PyTree) -> PyTree:
        rate, vjp = jax.vjp(lambda y, theta, phi: field(y, theta, phi, index), y, theta, phi)
        states.append(y)
        vjps.append(vjp)
        return rate

    return stage


def _forward(
    field: Callable[..., PyTree], z0: PyTree, thetas: list[PyTree], phi: list[Any], plan: Plan
) -> tuple[list[PyTree], tuple[tuple[PyTree, ...], ...], list[list[Callable[..., Any]]]]:
    """The z-steps through the same rk_step as coupled_solve, recording each stage's state
    and the VJP of its one f evaluation: ([z_0, ..., z_Nz], stage states, stage VJPs)."""
    h = 1.0 / plan.num_z_steps
    num_stages = len(plan.tableau.b)
    zs = [z0]
    stage_z: list[tuple[PyTree, ...]] = []
    stage_vjps: list[list[Callable[..., Any]]] = []
    for n, row in enumerate(plan.stage_indices):
        states: list[PyTree] = []
        vjps: list[Callable[..., Any]] = []
        fields = [
            _recording(field, thetas[j], phi, n * num_stages + i, states, vjps)
            for i, j in enumerate(row)
        ]
        zs.append(stepping.rk_step(fields, zs[-1], h, plan.tableau))
        stage_z.append(tuple(states))
        stage_vjps.append(vjps)
    return zs, tuple(stage_z), stage_vjps


def _z_adjoints(
    ct_z1: PyTree,
    stage_vjps: list[list[Callable[..., Any]]],
    gamma: list[PyTree],
    phi: list[Any],
    plan: Plan,
) -> tuple[list[PyTree], list[tuple[PyTree, ...]], list[PyTree], list[Any]]:
    """Backward over the z-steps: ([a_0, ..., a_Nz] (2.5a), g per step and stage (2.5b),
    γ_j summed per schedule index j onto the zeros ``gamma``, ∂J/∂φ)."""
    h = 1.0 / plan.num_z_steps
    tableau = plan.tableau
    num_stages = len(tableau.b)
    a = [ct_z1]
    g: list[tuple[PyTree, ...]] = []
    grad_phi = _zeros(phi)
    for n in reversed(range(plan.num_z_steps)):
        a_next = a[0]
        lam: list[PyTree] = [None] * num_stages
        g_n: list[PyTree] = [None] * num_stages
        for i in reversed(range(num_stages)):
            later = [(tableau.a[j][i], lam[j]) for j in range(i + 1, num_stages)]
            kappa = stepping.axpy(_zeros(a_next), h, [(tableau.b[i], a_next), *later])
            lam[i], g_n[i], phi_i = stage_vjps[n][i](kappa)
            j = plan.stage_indices[n][i]
            gamma[j] = _add(gamma[j], g_n[i])
            grad_phi = _add(grad_phi, phi_i)
        a.insert(0, stepping.axpy(a_next, 1.0, [(1.0, lam_i) for lam_i in lam]))
        g.insert(0, tuple(g_n))
    return a, g, gamma, grad_phi


def _w_adjoints(
    evolution: evolution_lib.Evolution,
    ws: list[PyTree],
    p: PyTree,
    sources: list[PyTree],
    plan: Plan,
) -> tuple[list[PyTree], PyTree]:
    """Backward over the weight steps: ([b_0, ..., b_M] (2.5c), ∂J/∂p (2.5e)), with s_m the
    coupling's sources."""
    dt = 1.0 / plan.num_w_steps
    b = [sources[-1]]
    grad_p = _zeros(p)
    for m in reversed(range(plan.num_w_needed)):
        # The step weight_trajectory takes from w_m: Φ_δ at time m·δ.
        _, step_vjp = jax.vjp(lambda w, p, m=m: evolution.step(w, m * dt, dt, p), ws[m], p)
        ct_w, ct_p = step_vjp(b[0])
        b.insert(0, _add(ct_w, sources[m]))
        grad_p = _add(grad_p, ct_p)
    return b, grad_p


def kkt_gradients(
    f: Callable[..., Any],
    z0: PyTree,
    w0: PyTree,
    p: PyTree,
    args: Any,
    ct_z1: PyTree,
    *,
    evolution: evolution_lib.Evolution | None = None,
    coupling: coupling_lib.Coupling | None = None,
    coupling_params: PyTree = None,
    num_z_steps: int = 5,
    num_w_steps: int | None = None,
    schedule: str | Sequence[int] = "conf1",
    method: str = "euler",
    has_aux: bool = False,
    indexed: bool = False,
) -> KKTResult:
    """∂J/∂(z0, w0, p, φ) of the coupled solve by the discrete KKT recursion (eq. 2.5a-e).

    Takes the arguments of :func:`anodev2_jax.coupled_solve` (same defaults, same
    validation), plus the cotangent of its output.

    Args:
      f: the activation field ``f(z, theta, args) -> dz/dt`` (``(dz/dt, aux)`` with
        ``has_aux``; the aux is dropped).
      z0: initial activations, a pytree of float arrays, e.g. (N, H, W, C).
      w0: initial weights, e.g. a (kh, kw, cin, cout) kernel or a pytree of them.
      p: parameters of the evolution (None for Zero).
      args: the static parameters φ of f; its float leaves are differentiated.
      ct_z1: a_Nz = ∂J/∂z_Nz, shaped like z0.
      evolution, coupling, coupling_params, num_z_steps, num_w_steps, schedule, method,
        indexed: as in ``coupled_solve``.

    Returns:
      A :class:`KKTResult`: the five gradients and the trajectories a_n, g, b_m, z_n, w_m, θ_j.
    """
    evolution = evolution_lib.RDA() if evolution is None else evolution
    plan = make_plan(num_z_steps, num_w_steps, schedule, method)
    coupling = check_coupling(coupling)
    f = indexed_field(f, indexed)
    check_inputs(
        f, z0, w0, p, args, evolution, has_aux, coupling, coupling_params, plan.num_w_steps
    )
    shapes = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), z0)
    ct_shapes = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), ct_z1)
    if shapes != ct_shapes:
        raise ValueError(
            f"ct_z1 = ∂J/∂z1 must have z0's structure, shapes and dtypes {shapes}; got {ct_shapes}"
        )

    # Only float leaves of args are differentiated (as in coupled_solve); the rest are fixed.
    phi, with_phi = split_float_leaves(args)

    def field(z: PyTree, theta: PyTree, phi: list[Any], k: int) -> PyTree:
        out = f(z, theta, with_phi(phi), k)
        return out[0] if has_aux else out

    ws = weight_trajectory(evolution, w0, p, plan.num_w_steps, plan.num_w_needed)
    count = plan.num_w_needed
    if coupling.one_hot:
        mixing = jnp.eye(count + 1, dtype=jnp.result_type(jax.tree.leaves(w0)[0]))
        thetas = ws
    else:
        mixing, mixing_vjp = jax.vjp(
            lambda c: coupling.matrix(c, plan.num_w_steps, count), coupling_params
        )
        thetas = coupling.theta_trajectory(ws, coupling_params, plan.num_w_steps)
    zs, stage_z, stage_vjps = _forward(field, z0, thetas, phi, plan)
    a, g, gamma, grad_phi = _z_adjoints(ct_z1, stage_vjps, [_zeros(w) for w in ws], phi, plan)

    # The coupling: each θ_j's γ_j reaches every w_m it mixes in, with weight κ_{j,m} (the
    # discrete ∫_t^1 Kᵀ(τ-t) γ(τ) dτ of 2.5c), and the kernel's parameters get (∂κ/∂c)ᵀ G.
    if coupling.one_hot:
        sources, grad_coupling = gamma, None
    else:
        sources = _kernel_sources(mixing, gamma)
        (grad_coupling,) = mixing_vjp(_gram(gamma, ws).astype(mixing.dtype))
    b, grad_p = _w_adjoints(evolution, ws, p, sources, plan)

    grad_args = with_phi(grad_phi, fill=lambda x: np.zeros(np.shape(x), jax.dtypes.float0))
    return KKTResult(
        grad_z0=a[0],
        grad_w0=b[0],
        grad_p=grad_p,
        grad_args=grad_args,
        grad_coupling=grad_coupling,
        a=a,
        g=tuple(g),
        b=b,
        z=zs,
        stage_z=stage_z,
        w=ws,
        stage_indices=plan.stage_indices,
        theta=thetas,
        coupling_weights=mixing,
    )
