"""coupled_solve: the discrete coupled map (docs/math.md §2), its plan, trajectories, diffrax field.

    w_{m+1} = Φ_δ(w_m; p),            m = 0..Nw-1,   δ = 1/Nw
    θ_j     = Σ_{m ≤ j} κ_{j,m} w_m   (the coupling, eq. 2.3d; Dirac: θ_j = w_j)
    z_{n+1} = RK step of f(·, θ) from z_n, step h = 1/Nz, stage i using θ_j, j = m(n) + c_i Nw/Nz

All loops are Python-unrolled over the few fixed steps: on XLA:CPU the backward pass of a
``lax.scan`` is many times slower. The gradients (dto, backprop, otd) are built in
:mod:`anodev2_jax.gradients` from the :class:`Solver` of a solve.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from anodev2_jax import coupling as coupling_lib
from anodev2_jax import evolution as evolution_lib
from anodev2_jax import stepping
from anodev2_jax.gradients import GRADIENTS, METHODS

PyTree = Any
SCHEDULES = ("conf1", "conf2")


# -- the plan: step counts, schedule and method, validated once ------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of one coupled solve.

    ``stage_indices[n][i]`` is the weight index j whose θ_j stage i of z-step n uses (θ_j = w_j
    for the Dirac coupling).
    """

    num_z_steps: int
    num_w_steps: int
    method: str
    stage_indices: tuple[tuple[int, ...], ...]

    @property
    def tableau(self) -> stepping.Tableau:
        return stepping.TABLEAUS[self.method]

    @property
    def num_evaluations(self) -> int:
        """Nz·stages: how many times a z-solve evaluates f (indices k = n·stages + i)."""
        return len(self.stage_indices) * len(self.tableau.b)

    @property
    def num_w_needed(self) -> int:
        """How many weight steps the z-solve uses (w_0 .. w_{num_w_needed})."""
        return max(max(row) for row in self.stage_indices)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer (a number of time steps)")
    return value


def make_plan(
    num_z_steps: int,
    num_w_steps: int | None = None,
    schedule: str | Sequence[int] = "conf1",
    method: str = "euler",
) -> Plan:
    """Validate step counts, schedule and method; raise ValueError naming the fix.

    Schedules: ``"conf1"`` applies w at the z-step times, m(n) = n·Nw/Nz (Nw a multiple of
    Nz; the paper's configuration 1 is Nz = Nw = 5); ``"conf2"`` applies only the first and
    last weights, m = (0, Nw) with Nz = 2 (the paper's configuration 2); or an explicit
    sequence m(0..Nz-1) of weight indices in 0..Nw. ``num_w_steps`` defaults to Nz.
    """
    nz = _positive_int("num_z_steps", num_z_steps)
    nw = nz if num_w_steps is None else _positive_int("num_w_steps", num_w_steps)
    tableau = stepping.check_method(method)
    if isinstance(schedule, str):
        if schedule == "conf1":
            if nw % nz:
                raise ValueError(
                    f"schedule='conf1' applies w at the z-step times and needs num_w_steps a "
                    f"multiple of num_z_steps; got num_z_steps={nz}, num_w_steps={nw}. Use "
                    f"num_w_steps={nz * max(1, round(nw / nz))} or an explicit index map."
                )
            m = tuple(n * (nw // nz) for n in range(nz))
        elif schedule == "conf2":
            if nz != 2:
                raise ValueError(
                    f"schedule='conf2' applies w_0 then w_Nw and needs num_z_steps=2; got "
                    f"num_z_steps={nz}. Use num_z_steps=2 or an explicit index map."
                )
            m = (0, nw)
        else:
            raise ValueError(
                f"schedule={schedule!r} is unknown; use one of {SCHEDULES} or a sequence of "
                f"{nz} weight indices in 0..{nw}"
            )
    else:
        m = tuple(schedule)
        if len(m) != nz:
            raise ValueError(
                f"schedule {list(m)} has {len(m)} entries; it needs one weight index per z-step, "
                f"num_z_steps={nz}"
            )
        for n, mn in enumerate(m):
            if isinstance(mn, bool) or not isinstance(mn, int) or not 0 <= mn <= nw:
                raise ValueError(
                    f"schedule entry m({n})={mn!r} is out of range; weight indices must be "
                    f"integers in 0..num_w_steps={nw}"
                )
    stage_indices = []
    for n, mn in enumerate(m):
        row = []
        for c in tableau.c:
            index = mn + Fraction(c) * Fraction(nw, nz)
            if index.denominator != 1:
                need = Fraction(nz, 1) / Fraction(c).limit_denominator()
                raise ValueError(
                    f"method={method!r} needs θ at stage time t_{n} + {c}·h, weight index "
                    f"{float(index):g}, which is not on the weight grid of num_w_steps={nw}; "
                    f"use num_w_steps a multiple of {need.numerator} (= num_z_steps/{c}), or "
                    "method='euler'"
                )
            if index > nw:
                raise ValueError(
                    f"method={method!r} needs θ at weight index {int(index)} for z-step {n}, "
                    f"beyond num_w_steps={nw}: the schedule {list(m)} leaves no room for the "
                    "stage times; use method='euler' with this schedule"
                )
            row.append(int(index))
        stage_indices.append(tuple(row))
    return Plan(nz, nw, method, tuple(stage_indices))


# -- the forward map -------------------------------------------------------------------------------
def weight_trajectory(
    evolution: evolution_lib.Evolution, w0: PyTree, p: PyTree, num_w_steps: int, count: int
) -> list[PyTree]:
    """[w_0, ..., w_count] with w_{m+1} = Φ_δ(w_m; p), δ = 1/num_w_steps."""
    dt = 1.0 / num_w_steps
    ws = [w0]
    for m in range(count):
        ws.append(evolution.step(ws[-1], m * dt, dt, p))
    return ws


def theta_trajectory(
    coupling: coupling_lib.Coupling,
    evolution: evolution_lib.Evolution,
    w0: PyTree,
    p: PyTree,
    c: PyTree,
    num_w_steps: int,
    count: int,
) -> tuple[list[PyTree], list[PyTree]]:
    """([θ_0, ..., θ_count], [w_0, ..., w_count]): the weights and the coupling's θ_j of them
    (for the one-hot Dirac coupling the θ list holds the w_m themselves)."""
    ws = weight_trajectory(evolution, w0, p, num_w_steps, count)
    return coupling.theta_trajectory(ws, c, num_w_steps), ws


def _z_trajectory(
    f: Callable[..., Any],
    z0: PyTree,
    thetas: Sequence[PyTree],
    args: Any,
    plan: Plan,
    has_aux: bool,
) -> tuple[list[PyTree], list[Any]]:
    """[z_0, ..., z_Nz] and the aux output of every f evaluation (in order of evaluation).

    Stage i of z-step n uses θ_j = ``thetas[j]``, j = plan.stage_indices[n][i].
    ``f(z, theta, args, k)`` takes the evaluation index k (see :func:`coupled_solve`).
    """
    h = 1.0 / plan.num_z_steps
    zs, auxs = [z0], []

    def field(theta: PyTree, k: int) -> Callable[[PyTree], PyTree]:
        def stage(z: PyTree) -> PyTree:
            out = f(z, theta, args, k)
            if has_aux:
                out, aux = out
                auxs.append(aux)
            return out

        return stage

    num_stages = len(plan.tableau.b)
    for n, row in enumerate(plan.stage_indices):
        fields = [field(thetas[j], n * num_stages + i) for i, j in enumerate(row)]
        zs.append(stepping.rk_step(fields, zs[-1], h, plan.tableau))
    return zs, auxs


class Solver(NamedTuple):
    """The static pieces of one coupled solve (hashable: f(z, theta, phi, k), operators,
    plan, flags), from which :mod:`anodev2_jax.gradients` builds it with each gradient."""

    f: Callable[..., Any]
    evolution: evolution_lib.Evolution
    coupling: coupling_lib.Coupling
    plan: Plan
    has_aux: bool

    def thetas(self, w0: PyTree, p: PyTree, c: PyTree) -> list[PyTree]:
        """[θ_0, ..., θ_M], M = plan.num_w_needed."""
        plan = self.plan
        return theta_trajectory(
            self.coupling, self.evolution, w0, p, c, plan.num_w_steps, plan.num_w_needed
        )[0]

    def forward(
        self, z0: PyTree, w0: PyTree, p: PyTree, c: PyTree, args: Any
    ) -> tuple[PyTree, tuple[Any, ...]]:
        zs, auxs = _z_trajectory(self.f, z0, self.thetas(w0, p, c), args, self.plan, self.has_aux)
        return zs[-1], tuple(auxs)


# -- public API ------------------------------------------------------------------------------------
class Trajectory(NamedTuple):
    """z: [z_0, ..., z_Nz]; w: [w_0, ..., w_Nw]; stage_indices: θ's weight index per stage;
    theta: [θ_0, ..., θ_Nw], θ_j = Σ_{m ≤ j} κ_{j,m} w_m (for Dirac, the w_m themselves)."""

    z: list[PyTree]
    w: list[PyTree]
    stage_indices: tuple[tuple[int, ...], ...]
    theta: list[PyTree]


def split_float_leaves(args: Any) -> tuple[list[Any], Callable[..., Any]]:
    """The float leaves φ of ``args`` (the ones differentiated) and a function rebuilding args.

    ``rebuild(phi, fill=None)`` puts new float leaves back; the other leaves stay as they
    are, or become ``fill(leaf)`` when given (e.g. float0 zeros for a cotangent).
    """
    leaves, treedef = jax.tree.flatten(args)
    is_float = [bool(jnp.issubdtype(jnp.result_type(x), jnp.inexact)) for x in leaves]

    def rebuild(phi: list[Any], fill: Callable[[Any], Any] | None = None) -> Any:
        it = iter(phi)
        return jax.tree.unflatten(
            treedef,
            [
                next(it) if flt else (x if fill is None else fill(x))
                for x, flt in zip(leaves, is_float, strict=True)
            ],
        )

    return [x for x, flt in zip(leaves, is_float, strict=True) if flt], rebuild


def indexed_field(f: Callable[..., Any], indexed: bool) -> Callable[..., Any]:
    """f in the form ``f(z, theta, args, k)`` the solvers call (k: the evaluation index)."""
    if not callable(f):
        raise ValueError(f"f must be a callable f(z, theta, args) -> dz/dt; got {type(f).__name__}")
    if indexed:
        return f
    return lambda z, theta, args, k: f(z, theta, args)


def check_coupling(coupling: Any) -> coupling_lib.Coupling:
    """``coupling``, or Dirac() for None; ValueError naming the choices if it is not one."""
    if coupling is None:
        return coupling_lib.Dirac()
    if not isinstance(coupling, coupling_lib.Coupling):
        raise ValueError(
            f"coupling={coupling!r} is not a coupling; pass anodev2_jax.Dirac() (θ = w, the "
            "default), Mixing(weights), Exponential(), DiracPlus(...) or Smooth(fn)"
        )
    return coupling


def check_inputs(
    f: Callable[..., Any],
    z0: PyTree,
    w0: PyTree,
    p: PyTree,
    args: Any,
    evolution: evolution_lib.Evolution,
    has_aux: bool,
    coupling: coupling_lib.Coupling | None = None,
    coupling_params: PyTree = None,
    num_w_steps: int = 1,
) -> None:
    """Validate a coupled solve's inputs (evolution and coupling, f's output) before tracing.

    ``f``: the field in the form ``f(z, theta, args, k)`` (see :func:`indexed_field`).
    """
    for name, tree in (("z0", z0), ("w0", w0)):
        leaves = jax.tree.leaves(tree)
        if not leaves:
            raise ValueError(f"{name} has no arrays; pass a pytree of float arrays")
        for leaf in leaves:
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
                raise ValueError(
                    f"{name} has a leaf of dtype {jnp.result_type(leaf)}; the coupled solve "
                    "needs float32 or float64 arrays"
                )
    evolution.check(w0, p)
    check_coupling(coupling).check(coupling_params, w0, num_w_steps)
    out = jax.eval_shape(lambda z, theta, args: f(z, theta, args, 0), z0, w0, args)
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError("has_aux=True needs f to return a pair (dz/dt, aux)")
        out = out[0]
    shapes = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), z0)
    out_shapes = jax.tree.map(lambda x: (x.shape, x.dtype), out)
    if shapes != out_shapes:
        raise ValueError(
            f"f(z, theta, args) must return dz/dt with z's structure, shapes and dtypes "
            f"{shapes}; it returned {out_shapes}"
        )


def coupled_solve(
    f: Callable[..., Any],
    z0: PyTree,
    w0: PyTree,
    p: PyTree = None,
    args: Any = None,
    *,
    evolution: evolution_lib.Evolution | None = None,
    coupling: coupling_lib.Coupling | None = None,
    coupling_params: PyTree = None,
    num_z_steps: int = 5,
    num_w_steps: int | None = None,
    schedule: str | Sequence[int] = "conf1",
    method: str = "euler",
    gradient: str = "dto",
    has_aux: bool = False,
    indexed: bool = False,
    return_trajectory: bool = False,
) -> Any:
    """Solve dz/dt = f(z, θ(t), args), dw/dt = q(w; p), θ(t) = ∫_0^t K(t-τ) w(τ) dτ on [0, 1].

    (docs/math.md §1-2, paper eq. 2.3; θ = w for the default Dirac kernel.) On the weight grid the
    coupling is θ_j = Σ_{m ≤ j} κ_{j,m} w_m, and a stage at schedule index j uses θ_j.

    Args:
      f: the activation field ``f(z, theta, args) -> dz/dt`` (or ``(dz/dt, aux)`` with
        ``has_aux``); z and theta are any pytrees.
      z0: initial activations, a pytree of float arrays.
      w0: initial weights (e.g. a (kh, kw, cin, cout) conv kernel or a pytree of them).
      p: parameters of the evolution, as built by ``evolution.init(w0)`` (None for Zero).
      args: static parameters φ of f (BatchNorm scale and offset, ...); differentiated too.
      evolution: the weight evolution q and its step Φ; default ``RDA()`` (paper eq. B.4).
      coupling: θ from the weight trajectory (:mod:`anodev2_jax.coupling`): ``Dirac()``
        (default, θ_j = w_j, bit for bit the solve of the paper's configurations),
        ``Mixing(κ)`` (fixed weights), or a kernel K: ``Exponential()``, ``DiracPlus(...)``,
        ``Smooth(fn)``, by the trapezoid rule. A kernel without a Dirac part gives θ(0) = 0.
      coupling_params: the kernel's parameters c, as built by ``coupling.init(w0)`` (None for
        Dirac and Mixing); differentiated like p.
      num_z_steps: Nz, activation steps of size h = 1/Nz.
      num_w_steps: Nw, weight steps of size δ = 1/Nw; default Nz.
      schedule: ``"conf1"``, ``"conf2"`` or explicit indices m(n) (see :func:`make_plan`).
      method: ``"euler"``, ``"rk2"`` (midpoint) or ``"rk4"`` for the activation steps.
      gradient: ``"dto"`` (exact, stores only the inputs and recomputes the block in the
        backward pass; reverse mode only), ``"otd"`` (Neural ODE adjoint, inexact), or
        ``"backprop"`` (exact, stores every step; supports forward mode too); when to use
        which: :mod:`anodev2_jax.gradients`.
      has_aux: f returns ``(dz/dt, aux)``; the solve then returns ``(result, auxs)`` with
        the aux of every f evaluation in order of evaluation (forward pass only).
      indexed: f takes a fourth argument, ``f(z, theta, args, k)``: the index
        k = n·stages + i (a Python int, 0 ≤ k < Nz·stages) of the evaluation at stage i of
        z-step n, the same in the forward pass and in DTO's and OTD's backward passes. A
        field whose static parameters differ per evaluation (e.g. per-step BatchNorm
        statistics) takes its slice k of them.
      return_trajectory: return a :class:`Trajectory` (all z_n, w_m and θ_j) instead of
        z(1); it is differentiated by plain backprop.

    Returns:
      z(1), with z0's structure, shapes and dtypes (or a Trajectory; paired with the auxs).
    """
    evolution = evolution_lib.RDA() if evolution is None else evolution
    plan = make_plan(num_z_steps, num_w_steps, schedule, method)
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient={gradient!r} is unknown; use one of {GRADIENTS}")
    coupling = check_coupling(coupling)
    f = indexed_field(f, indexed)
    check_inputs(
        f, z0, w0, p, args, evolution, has_aux, coupling, coupling_params, plan.num_w_steps
    )

    if return_trajectory:
        thetas, ws = theta_trajectory(
            coupling, evolution, w0, p, coupling_params, plan.num_w_steps, plan.num_w_steps
        )
        zs, auxs = _z_trajectory(f, z0, thetas, args, plan, has_aux)
        trajectory = Trajectory(zs, ws, plan.stage_indices, thetas)
        return (trajectory, tuple(auxs)) if has_aux else trajectory

    phi, with_phi = split_float_leaves(args)

    def f_split(z: PyTree, theta: PyTree, phi: list[Any], k: int) -> Any:
        return f(z, theta, with_phi(phi), k)

    solver = Solver(f_split, evolution, coupling, plan, has_aux)
    z1, auxs = METHODS[gradient](solver)(z0, w0, p, coupling_params, phi)
    return (z1, auxs) if has_aux else z1


def vector_field(
    f: Callable[..., Any],
    evolution: evolution_lib.Evolution,
    coupling: coupling_lib.Coupling | None = None,
) -> Callable[[float, tuple[PyTree, ...], tuple[Any, ...]], tuple[PyTree, ...]]:
    """The continuous coupled system (eq. 2.3) as a diffrax vector field.

    Dirac coupling (θ = w, the default): ``field(t, (z, w), (args, p)) -> (f(z, w, args),
    q(t, w; p))``, for ``diffrax.ODETerm(field)`` with ``y0=(z0, w0)`` and ``args=(args, p)``.

    A kernel K(s) = a·δ(s) + k(s) whose memory u(t) = ∫_0^t k(t-τ) w(τ) dτ obeys an ODE
    (``Exponential``: du/dt = λ(w - u); ``DiracPlus`` of it) gives the augmented system of
    (z, w, u), θ = a·w + u: ``field(t, (z, w, u), (args, p, c)) -> (f(z, θ, args), q(t, w; p),
    du/dt)``, with ``y0=(z0, w0, zeros like w0)`` (u(0) = 0) and ``args=(args, p, c)``, c the
    kernel's parameters. For the pure exponential kernel u is θ itself: dθ/dt = λ(w - θ),
    θ(0) = 0. Any diffrax solver integrates either form.
    """
    coupling = check_coupling(coupling)
    if coupling.one_hot:

        def field(t: float, y: tuple[PyTree, ...], field_args: tuple[Any, ...]) -> Any:
            z, w = y
            args, p = field_args
            return f(z, w, args), evolution.vector_field(t, w, p)

        return field

    if not isinstance(coupling, coupling_lib.Kernel):
        raise ValueError(
            f"{coupling!r} is defined on the weight grid only and has no continuous form for "
            "diffrax; use coupled_solve, or a kernel with an ODE form, e.g. Exponential()"
        )
    coupling.check_memory_form()
    kernel = coupling

    def augmented(t: float, y: tuple[PyTree, ...], field_args: tuple[Any, ...]) -> Any:
        z, w, u = y
        args, p, c = field_args
        theta = kernel.theta_from_memory(w, u, c)
        return f(z, theta, args), evolution.vector_field(t, w, p), kernel.memory_field(t, u, w, c)

    return augmented
