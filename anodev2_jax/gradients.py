"""The gradients of a coupled solve, each saying when to use it, and gradient="auto"'s choice.

``coupled_solve(gradient=...)`` differentiates the discrete map by one of :data:`METHODS`.
Each takes the static pieces of a solve (:class:`anodev2_jax.solve.Solver`) and returns a
function ``solve(z0, w0, p, c, phi) -> (z1, auxs)`` with that gradient:

- :func:`dto`: exact; keeps each block's inputs only and recomputes the block in the
  backward pass (O(1) activations per block); reverse mode only. The default.
- :func:`backprop`: exact; keeps every step's activations, no recomputation, the fastest
  when it fits; forward mode too.
- :func:`otd`: the Neural ODE adjoint; O(1) activations per block but inexact (not the
  discrete map's gradient); for comparison with the paper's ANODE argument, not training.

``gradient="auto"`` (the models' default): per ODE block, backprop where the train step fits
in memory, else DTO; both are exact and equal to rounding, and backprop's train steps run
faster on XLA:CPU for every model and variant (BENCHMARKS.md §6). :func:`choose` starts from
backprop in every block and, while XLA's peak memory of the compiled train step
(:func:`peak_bytes`) exceeds the budget, turns the block with the largest activations back
to DTO, recompiling each time; the compiled step of the choice is the one training runs, so
choosing costs no extra compile when backprop fits.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from anodev2_jax import stepping

if TYPE_CHECKING:  # solve.py imports this module: the solver is passed in, not imported
    from anodev2_jax.solve import Solver

PyTree = Any


# -- DTO: exact, recomputing the block in the backward pass ----------------------------------------
def _after(xs: PyTree, ct: PyTree) -> PyTree:
    """``xs`` unchanged in value, but made to depend on the cotangent ``ct``.

    XLA:CPU drops ``optimization_barrier`` before scheduling and computes every block's
    recomputation early, all live at once, so ``jax.checkpoint`` alone saves no memory there
    (``tests/test_solve.py::test_dto_memory_is_o_of_blocks_plus_steps`` checks the memory).
    Adding 0·ct[0] is a real data dependency that no scheduler can hoist over (floats: 0·x is
    not folded, x may be NaN).
    """
    first = jax.tree.leaves(ct)[0]
    zero = jnp.ravel(first)[0] * 0
    return jax.tree.map(lambda x: x + zero.astype(x.dtype), xs)


def dto(solver: Solver) -> Callable[..., Any]:
    """Discretize-then-optimize with recomputation: the exact gradient of the discrete map.

    Computes what ``jax.grad`` through the unrolled steps computes (:func:`backprop`), to
    rounding, and what the discrete KKT recursion computes (:mod:`anodev2_jax.kkt`). Memory:
    the forward pass keeps only the block's inputs (z0, w0, p, c, φ), O(1) activations per
    block instead of O(Nz·stages); compute: the backward pass runs the block's forward pass
    once more (ANODE's checkpoint) before differentiating it.

    Use it to train where memory is tight: the default of ``coupled_solve``, and of
    ``gradient="auto"`` in every block whose stored activations would not fit. Not for
    forward mode (``jax.jvp``): it is a custom VJP, reverse mode only (to any order); use
    :func:`backprop` there, and where memory allows, since it does not recompute.
    """
    forward = solver.forward

    @jax.custom_vjp
    def solve(z0: PyTree, w0: PyTree, p: PyTree, c: PyTree, args: Any) -> Any:
        return forward(z0, w0, p, c, args)

    def solve_fwd(z0: PyTree, w0: PyTree, p: PyTree, c: PyTree, args: Any) -> Any:
        # Keep only the block's inputs: O(1) per block instead of O(Nz) activations.
        return forward(z0, w0, p, c, args), (z0, w0, p, c, args)

    def solve_bwd(inputs: Any, cts: Any) -> Any:
        ct_z1 = cts[0]
        inputs = _after(inputs, ct_z1)
        _, vjp = jax.vjp(lambda *xs: forward(*xs)[0], *inputs)
        return vjp(ct_z1)

    solve.defvjp(solve_fwd, solve_bwd)
    return solve


# -- OTD: the Neural ODE adjoint of Chen et al. ----------------------------------------------------
def otd(solver: Solver) -> Callable[..., Any]:
    """Optimize-then-discretize: the continuous adjoint of Neural ODEs (Chen et al. 2018).

    Keeps only z(1); the backward pass integrates (z, a) from t = 1 to 0 with the same RK
    method and step, z backwards in time, accumulating ∫ (∂f/∂θ)ᵀa and ∫ (∂f/∂φ)ᵀa. Stage i
    of the backward step over [t_n, t_{n+1}] uses the θ of forward stage i (exact when θ is
    static); the θ_j are a function of (w0, p, c), whose VJP takes the accumulated ∂J/∂θ_j
    back to them. Memory: O(1) activations per block, as :func:`dto`; compute: about one
    forward and one backward pass of the block.

    Inexact: this is the discretized gradient of the continuous problem, not the gradient of
    the discrete map the forward pass computes. The backward integration does not retrace
    the forward steps, so the error vanishes only as h → 0 (at first order for Euler) and
    grows where f is unstable backwards in time (the paper's ANODE argument, and its
    "NeuralODE" rows). Use it to compare with that
    argument (``variant="node"``); not for training, where :func:`dto` gives the exact
    gradient for the same memory. Reverse mode only.
    """
    f, plan, has_aux, forward = solver.f, solver.plan, solver.has_aux, solver.forward
    tableau = plan.tableau
    h = 1.0 / plan.num_z_steps

    def field(z: PyTree, theta: PyTree, args: Any, k: int) -> PyTree:
        out = f(z, theta, args, k)
        return out[0] if has_aux else out

    @jax.custom_vjp
    def solve(z0: PyTree, w0: PyTree, p: PyTree, c: PyTree, args: Any) -> Any:
        return forward(z0, w0, p, c, args)

    def solve_fwd(z0: PyTree, w0: PyTree, p: PyTree, c: PyTree, args: Any) -> Any:
        out = forward(z0, w0, p, c, args)
        return out, (out[0], w0, p, c, args)

    def solve_bwd(residuals: Any, cts: Any) -> Any:
        z, w0, p, c, args = residuals
        a = cts[0]
        thetas, thetas_vjp = jax.vjp(solver.thetas, w0, p, c)
        g_thetas = [jax.tree.map(jnp.zeros_like, theta) for theta in thetas]
        g_args = jax.tree.map(jnp.zeros_like, args)
        num_stages = len(tableau.b)
        for n in reversed(range(plan.num_z_steps)):
            ks: list[tuple[PyTree, PyTree]] = []
            for i, (a_row, b_i) in enumerate(zip(tableau.a, tableau.b, strict=True)):
                j = plan.stage_indices[n][i]
                z_i, a_i = stepping.axpy((z, a), -h, list(zip(a_row, ks, strict=False)))
                dz, vjp = jax.vjp(
                    functools.partial(field, k=n * num_stages + i), z_i, thetas[j], args
                )
                gz, gtheta, gargs = vjp(a_i)
                ks.append((dz, jax.tree.map(jnp.negative, gz)))
                if b_i:
                    g_thetas[j] = stepping.axpy(g_thetas[j], h * b_i, [(1.0, gtheta)])
                    g_args = stepping.axpy(g_args, h * b_i, [(1.0, gargs)])
            z, a = stepping.axpy((z, a), -h, list(zip(tableau.b, ks, strict=True)))
        g_w0, g_p, g_c = thetas_vjp(g_thetas)
        return a, g_w0, g_p, g_c, g_args

    solve.defvjp(solve_fwd, solve_bwd)
    return solve


# -- backprop: exact, storing every step -----------------------------------------------------------
def backprop(solver: Solver) -> Callable[..., Any]:
    """Plain autodiff through the unrolled steps: the exact gradient of the discrete map.

    Memory: every step's activations (and each f evaluation's intermediates) stay live until
    the backward pass, O(Nz·stages) per block; compute: no recomputation, the fastest exact
    gradient where it fits. Supports every JAX transformation: forward mode (``jax.jvp``),
    reverse mode, and their compositions.

    Use it where memory allows (``gradient="auto"`` picks it in each block for which the
    compiled train step fits the memory budget, :func:`choose`) and for forward-mode
    derivatives. Not where many steps, stages or large activations would exceed the memory:
    :func:`dto` gives the same gradient with O(1) activations per block.
    """
    return solver.forward


# gradient name -> the builder of a solve with that gradient, as coupled_solve(gradient=) takes
METHODS: dict[str, Callable[[Solver], Callable[..., Any]]] = {
    "dto": dto,
    "otd": otd,
    "backprop": backprop,
}
GRADIENTS = tuple(METHODS)


# -- gradient="auto": the choice per ODE block -----------------------------------------------------
GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Choice:
    """``gradients``: block name -> "backprop" | "dto"; ``peak_bytes``: XLA's peak memory of
    the compiled step with them, per device; ``budget_bytes``; ``compiled``: that step."""

    gradients: dict[str, str]
    peak_bytes: int
    budget_bytes: int
    compiled: Any

    def describe(self) -> str:
        """One line for the user: what was chosen and why."""
        backprop = [b for b, g in self.gradients.items() if g == "backprop"]
        dto = [b for b, g in self.gradients.items() if g == "dto"]
        parts = [f"backprop in {', '.join(backprop)}"] if backprop else []
        parts += [f"dto (recomputing) in {', '.join(dto)}"] if dto else []
        fits = "within" if self.peak_bytes <= self.budget_bytes else "over (even with dto)"
        return (
            f"gradient auto: {'; '.join(parts)}: the train step's peak memory is "
            f"{self.peak_bytes / GIB:.2f} GiB per device (XLA's memory_analysis), {fits} the "
            f"budget of {self.budget_bytes / GIB:.2f} GiB (config.memory_budget_gb; "
            "--config.gradient=dto or backprop to choose yourself)"
        )


def peak_bytes(compiled: Any) -> int:
    """XLA's estimate of a compiled program's peak memory per device: its arguments, outputs
    (less the donated buffers they reuse) and temporaries."""
    m = compiled.memory_analysis()
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def default_budget_bytes(device: jax.Device | None = None) -> int:
    """Half of one device's memory: an accelerator's allocator limit, or on the CPU the host's
    physical memory shared by its local CPU devices."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats()
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) // 2
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // jax.local_device_count() // 2


def choose(
    blocks: Sequence[str],
    compile_with: Callable[[Mapping[str, str]], Any],
    budget_bytes: int,
    measure: Callable[[Any], int] = peak_bytes,
) -> Choice:
    """Backprop in as many blocks as the budget allows.

    blocks: the ODE blocks, largest activations first (turned to DTO in this order);
    compile_with: {block: gradient} -> the compiled train step; measure: its peak bytes.
    With DTO in every block and still over the budget, that choice is returned (describe()
    says so): it is the least memory these gradients need.
    """
    gradients = {block: "backprop" for block in blocks}
    while True:
        compiled = compile_with(gradients)
        peak = measure(compiled)
        remaining = [block for block in blocks if gradients[block] == "backprop"]
        if peak <= budget_bytes or not remaining:
            return Choice(dict(gradients), peak, budget_bytes, compiled)
        gradients[remaining[0]] = "dto"
