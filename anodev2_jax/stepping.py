"""Explicit Runge-Kutta steps (Euler, RK2 midpoint, RK4) on pytrees.

A vector field has diffrax's form ``f(t, y, args) -> dy/dt``; a step has the form
``step(f, y, t, dt, args) -> y_next``. The coupled solver needs the vector field at each
stage separately (the weights θ differ between stages), so the core routine
:func:`rk_step` takes one callable per stage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
VectorField = Callable[[float, PyTree, Any], PyTree]


class Tableau(NamedTuple):
    """Butcher tableau of an explicit method: stage i is at time t + c[i]·dt."""

    a: tuple[tuple[float, ...], ...]  # a[i][j], j < i
    b: tuple[float, ...]
    c: tuple[float, ...]


TABLEAUS: dict[str, Tableau] = {
    "euler": Tableau(a=((),), b=(1.0,), c=(0.0,)),
    "rk2": Tableau(a=((), (0.5,)), b=(0.0, 1.0), c=(0.0, 0.5)),
    "rk4": Tableau(
        a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
        b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
        c=(0.0, 0.5, 0.5, 1.0),
    ),
}
METHODS = tuple(TABLEAUS)


def check_method(method: str) -> Tableau:
    """The tableau of ``method``; ValueError naming the choices if it is unknown."""
    if method not in TABLEAUS:
        raise ValueError(f"method={method!r} is unknown; use one of {METHODS}")
    return TABLEAUS[method]


def axpy(y: PyTree, dt: float, terms: Sequence[tuple[float, PyTree]]) -> PyTree:
    """y + dt·Σ coeff·k over the (coeff, k) pairs with nonzero coeff, leaf by leaf."""
    terms = [(coeff, k) for coeff, k in terms if coeff != 0.0]
    if not terms:
        return y

    def combine(y_leaf: jax.Array, *k_leaves: jax.Array) -> jax.Array:
        total = sum(coeff * k for (coeff, _), k in zip(terms, k_leaves, strict=True))
        return y_leaf + jnp.asarray(dt * total, y_leaf.dtype)

    return jax.tree.map(combine, y, *(k for _, k in terms))


def rk_step(
    stage_fields: Sequence[Callable[[PyTree], PyTree]],
    y: PyTree,
    dt: float,
    tableau: Tableau,
) -> PyTree:
    """One explicit RK step; ``stage_fields[i](y_i)`` is the field at stage i's time.

    y_{i} = y + dt Σ_j a[i][j] k_j,  k_i = stage_fields[i](y_i),  y_next = y + dt Σ_i b[i] k_i.
    """
    ks: list[PyTree] = []
    for field, a_row in zip(stage_fields, tableau.a, strict=True):
        y_stage = axpy(y, dt, list(zip(a_row, ks, strict=False)))
        ks.append(field(y_stage))
    return axpy(y, dt, list(zip(tableau.b, ks, strict=True)))


def _step_with(tableau: Tableau) -> Callable[..., PyTree]:
    def step(f: VectorField, y: PyTree, t: float, dt: float, args: Any = None) -> PyTree:
        fields = [lambda y_i, c=c: f(t + c * dt, y_i, args) for c in tableau.c]
        return rk_step(fields, y, dt, tableau)

    return step


euler = _step_with(TABLEAUS["euler"])
euler.__doc__ = "Explicit Euler: y + dt·f(t, y)."
rk2 = _step_with(TABLEAUS["rk2"])
rk2.__doc__ = "Explicit midpoint: y + dt·f(t + dt/2, y + dt/2·f(t, y))."
rk4 = _step_with(TABLEAUS["rk4"])
rk4.__doc__ = "Classical fourth-order Runge-Kutta."

STEPS: dict[str, Callable[..., PyTree]] = {"euler": euler, "rk2": rk2, "rk4": rk4}
