"""ANODEV2 in JAX: coupled neural ODEs whose conv weights evolve by an RDA PDE."""

from anodev2_jax.coupling import (
    Coupling,
    Dirac,
    DiracPlus,
    Exponential,
    Kernel,
    Mixing,
    Smooth,
    make_coupling,
)
from anodev2_jax.evolution import MLP, RDA, Evolution, Linear, Zero
from anodev2_jax.kkt import KKTResult, kkt_gradients
from anodev2_jax.solve import Plan, Trajectory, coupled_solve, make_plan, vector_field
from anodev2_jax.stepping import euler, rk2, rk4

__all__ = [
    "MLP",
    "RDA",
    "Coupling",
    "Dirac",
    "DiracPlus",
    "Evolution",
    "Exponential",
    "KKTResult",
    "Kernel",
    "Linear",
    "Mixing",
    "Plan",
    "Smooth",
    "Trajectory",
    "Zero",
    "coupled_solve",
    "euler",
    "kkt_gradients",
    "make_coupling",
    "make_plan",
    "rk2",
    "rk4",
    "vector_field",
]
