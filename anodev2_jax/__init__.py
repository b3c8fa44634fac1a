"""ANODEV2 in JAX: coupled neural ODEs whose conv weights evolve by an RDA PDE."""

from anodev2_jax.adjoint import KKTResult, kkt_gradients
from anodev2_jax.evolution import MLP, RDA, Evolution, Linear, Zero
from anodev2_jax.solve import Plan, Trajectory, coupled_solve, make_plan, vector_field
from anodev2_jax.stepping import euler, rk2, rk4

__all__ = [
    "MLP",
    "RDA",
    "Evolution",
    "KKTResult",
    "Linear",
    "Plan",
    "Trajectory",
    "Zero",
    "coupled_solve",
    "euler",
    "kkt_gradients",
    "make_plan",
    "rk2",
    "rk4",
    "vector_field",
]
