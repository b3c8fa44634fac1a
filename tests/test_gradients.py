"""The gradient-verification suite: the discrete KKT recursion (adjoint.py) equals jax.grad of
the DTO solve, satisfies eq. 2.5a-e residual by residual, and matches central differences;
check_grads on the solve; the OTD gradient converges to DTO at first order. Each of these also
runs with a time kernel K coupling θ to the weight trajectory (eq. 2.3d; coupling.py), whose
own parameters c are differentiated too.

Everything runs eagerly (no jit) on tiny float64 problems, so the few primitive shapes compile
once and are shared by all cases. The whole-model gradient checks belong in
tests/nn/test_models_gradients.py, next to the models.
"""

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tree_relative_error
from jax.test_util import check_grads

from anodev2_jax import (
    MLP,
    RDA,
    DiracPlus,
    Exponential,
    Linear,
    Mixing,
    Smooth,
    Zero,
    coupled_solve,
    make_plan,
    stepping,
)
from anodev2_jax.kkt import KKTResult, kkt_gradients

pytestmark = pytest.mark.gradients


# -- the problem: conv + tanh fields with a scale and a bias in args -------------------------------
def conv(z, kernel):
    return jax.lax.conv_general_dilated(
        z, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def affine(x, args):
    return x * args["scale"] + args["bias"][None, None, None, :]


def f_one_kernel(z, theta, args):
    """tanh(scale·conv3x3(z, θ) + bias), θ one (3, 3, 2, 2) kernel."""
    return jnp.tanh(affine(conv(z, theta), args))


def f_two_kernels(z, theta, args):
    """tanh(conv3x3(tanh(scale·conv3x3(z, θ1) + bias), θ2)), θ a dict of two kernels."""
    return jnp.tanh(conv(jnp.tanh(affine(conv(z, theta["k1"]), args)), theta["k2"]))


@dataclasses.dataclass(frozen=True)
class Ramped(Linear):
    """q(t, w) = (1 + t)·a ⊙ w, stepped by Euler: time-dependent, so a wrong step time shows."""

    mode: str = "elementwise"
    scheme: str = "euler"

    def _field_leaf(self, t, w, p):
        return (1 + t) * super()._field_leaf(t, w, p)


EVOLUTIONS: dict[str, tuple[Any, Callable[..., Any]]] = {
    "rda_tanh": (RDA(), f_one_kernel),
    "rda_identity": (RDA(activation="identity", per_channel=True), f_two_kernels),
    "linear": (Linear(), f_two_kernels),
    "mlp": (MLP(hidden=3), f_two_kernels),
    "zero": (Zero(), f_one_kernel),
    "ramped": (Ramped(), f_one_kernel),
}

# Step counts per schedule and method, chosen so that every RK stage time is on the weight grid;
# conf2 applies w_Nw at the last step and so leaves no room for later stages: Euler only.
SCHEDULES: dict[str, dict[str, dict[str, Any]]] = {
    "conf1": {
        "euler": dict(num_z_steps=3, num_w_steps=3, schedule="conf1"),
        "rk2": dict(num_z_steps=2, num_w_steps=4, schedule="conf1"),
        "rk4": dict(num_z_steps=2, num_w_steps=4, schedule="conf1"),
    },
    "conf2": {"euler": dict(num_z_steps=2, num_w_steps=10, schedule="conf2")},
    "custom": {
        "euler": dict(num_z_steps=3, num_w_steps=4, schedule=[4, 1, 1]),
        "rk2": dict(num_z_steps=2, num_w_steps=4, schedule=[2, 0]),
        "rk4": dict(num_z_steps=2, num_w_steps=4, schedule=[2, 0]),
    },
    # One step with static weights: the residual block z0 + f(z0) (and its RK versions).
    "nz1": {
        "euler": dict(num_z_steps=1, num_w_steps=1, schedule="conf1"),
        "rk2": dict(num_z_steps=1, num_w_steps=2, schedule="conf1"),
        "rk4": dict(num_z_steps=1, num_w_steps=2, schedule="conf1"),
    },
}

CASES = [
    (schedule, evolution, method)
    for schedule, methods in SCHEDULES.items()
    for evolution in EVOLUTIONS
    for method in methods
    if schedule != "nz1" or evolution == "zero"
]


def gaussian_kernel(s, c):
    """A user's smooth kernel k(s) = A·exp(-B s²)."""
    return c["A"] * jnp.exp(-c["B"] * s**2)


def lower_triangular(size: int) -> np.ndarray:
    """A fixed causal mixing matrix with every allowed entry nonzero."""
    kappa = np.random.default_rng(0).uniform(0.2, 1.0, (size, size))
    return np.tril(kappa)


# Time kernels K of θ(t) = ∫_0^t K(t-τ) w(τ) dτ (None: the Dirac kernel, θ = w).
COUPLINGS: dict[str, Callable[[int], Any]] = {
    "exponential": lambda nw: Exponential(init_rate=2.0),
    "dirac_plus": lambda nw: DiracPlus(Exponential(init_rate=3.0), init_dirac=0.8),
    "smooth": lambda nw: Smooth(
        gaussian_kernel, lambda dtype: {"A": jnp.asarray(1.5, dtype), "B": jnp.asarray(2.0, dtype)}
    ),
    "mixing": lambda nw: Mixing(lower_triangular(nw + 1)),
}
# Euler, RK2 and RK4, every kernel, every schedule, with several evolutions.
COUPLED_CASES = [
    ("exponential", "conf1", "rda_tanh", "euler"),
    ("dirac_plus", "conf2", "mlp", "euler"),
    ("mixing", "custom", "linear", "euler"),
    ("smooth", "conf1", "ramped", "rk2"),
    ("dirac_plus", "custom", "rda_identity", "rk4"),
]


def perturbed(tree, key, scale):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    noise = [scale * jax.random.normal(k, jnp.shape(x)) for k, x in zip(keys, leaves, strict=False)]
    return jax.tree.unflatten(treedef, [x + e for x, e in zip(leaves, noise, strict=True)])


def make_problem(
    evolution_name: str,
    schedule: str = "conf1",
    method: str = "euler",
    coupling: str | None = None,
) -> dict:
    """f, inputs (z0, w0, p, args, coupling params), the cotangent c of J = <c, z1>, and the
    solve's kwargs (with the coupling object; None: Dirac, whose parameters are None)."""
    evolution, f = EVOLUTIONS[evolution_name]
    keys = jax.random.split(jax.random.key(3), 8)
    kernel = (3, 3, 2, 2)
    if f is f_two_kernels:
        w0 = {
            "k1": 0.4 * jax.random.normal(keys[0], kernel),
            "k2": jax.random.normal(keys[1], kernel),
        }
    else:
        w0 = 0.5 * jax.random.normal(keys[0], kernel)
    # Parameters away from their (often degenerate: zero velocity, zero MLP output) init.
    p = perturbed(evolution.init(w0, keys[2]), keys[3], 0.3)
    args = {"scale": jnp.asarray(1.3), "bias": 0.2 * jax.random.normal(keys[4], (2,))}
    steps = SCHEDULES[schedule][method]
    time_kernel = None if coupling is None else COUPLINGS[coupling](steps["num_w_steps"])
    # Kernel parameters away from their init too, so that a wrong c-gradient shows.
    c = None if time_kernel is None else perturbed(time_kernel.init(w0), keys[7], 0.2)
    return dict(
        f=f,
        inputs=(jax.random.normal(keys[5], (2, 5, 5, 2)), w0, p, args, c),
        c=jax.random.normal(keys[6], (2, 5, 5, 2)),
        kwargs=dict(evolution=evolution, coupling=time_kernel, method=method, **steps),
    )


def loss(problem: dict, gradient: str = "dto") -> Callable[..., jax.Array]:
    """J(z0, w0, p, args, coupling params) = <c, z1>."""

    def J(z0, w0, p, args, coupling_params):
        z1 = coupled_solve(
            problem["f"], z0, w0, p, args, coupling_params=coupling_params, gradient=gradient,
            **problem["kwargs"],
        )  # fmt: skip
        return jnp.sum(problem["c"] * z1)

    return J


def recursion(problem: dict) -> KKTResult:
    *inputs, coupling_params = problem["inputs"]
    return kkt_gradients(
        problem["f"], *inputs, problem["c"], coupling_params=coupling_params, **problem["kwargs"]
    )


def gradients(result: KKTResult) -> tuple:
    return result.grad_z0, result.grad_w0, result.grad_p, result.grad_args, result.grad_coupling


NAMES = ("z0", "w0", "p", "args", "coupling")


# -- the recursion is the gradient of the discrete map ---------------------------------------------
def check_recursion_equals_jax_grad(problem: dict) -> float:
    expected = jax.grad(loss(problem), (0, 1, 2, 3, 4))(*problem["inputs"])
    worst = 0.0
    for name, got, want in zip(NAMES, gradients(recursion(problem)), expected, strict=True):
        assert jax.tree.structure(got) == jax.tree.structure(want), name
        error = tree_relative_error(got, want)
        assert error <= 1e-12, name
        worst = max(worst, error)
    return worst


@pytest.mark.parametrize("schedule,evolution,method", CASES)
def test_recursion_equals_jax_grad_of_the_dto_solve(schedule, evolution, method):
    check_recursion_equals_jax_grad(make_problem(evolution, schedule, method))


@pytest.mark.parametrize("coupling,schedule,evolution,method", COUPLED_CASES)
def test_recursion_with_a_time_kernel_equals_jax_grad(coupling, schedule, evolution, method):
    """Each stage's γ reaches every b_m with weight κ_{j,m}; ∂J/∂c by the VJP of c ↦ κ."""
    problem = make_problem(evolution, schedule, method, coupling)
    worst = check_recursion_equals_jax_grad(problem)
    print(f"{coupling}, {schedule}, {evolution}, {method}: max relative error {worst:.1e}")
    assert jax.tree.leaves(recursion(problem).grad_coupling) or coupling == "mixing"


# -- the recursion satisfies each discrete KKT condition -------------------------------------------
def kkt_residuals(problem: dict, result: KKTResult) -> dict[str, float]:
    """Relative residual of each condition of eq. 2.5a-e, evaluated from the stored adjoints.

    The forward trajectory comes from coupled_solve; each condition is checked step by step
    from the stored a_{n+1}, b_{m+1} and g, so one wrong adjoint shows up in its own residual.
    Euler: the paper's formulas. RK: the same conditions for the whole step map
    z_{n+1} = S_n(z_n, θ_{m_1}, ..., θ_{m_s}), whose VJP gives a_n and each stage's g.
    """
    f, (z0, w0, p, args, cp), c, kwargs = (problem[k] for k in ("f", "inputs", "c", "kwargs"))
    evolution, coupling = kwargs["evolution"], kwargs["coupling"]
    plan = make_plan(
        kwargs["num_z_steps"], kwargs["num_w_steps"], kwargs["schedule"], kwargs["method"]
    )
    trajectory = coupled_solve(
        f, z0, w0, p, args, coupling_params=cp, return_trajectory=True, **kwargs
    )
    zs, ws, thetas = trajectory.z, trajectory.w, trajectory.theta
    h = 1.0 / plan.num_z_steps
    res = {"terminal": tree_relative_error(result.a[-1], c)}

    res_a, res_g, grad_args = [], [], jax.tree.map(jnp.zeros_like, args)
    gamma = [jax.tree.map(jnp.zeros_like, w0) for _ in range(plan.num_w_needed + 1)]
    for n, row in enumerate(plan.stage_indices):
        a_next = result.a[n + 1]
        if plan.method == "euler":
            _, vjp = jax.vjp(f, zs[n], thetas[row[0]], args)
            f_z, f_theta, f_args = vjp(a_next)
            a_n = jax.tree.map(lambda a, fz: a + h * fz, a_next, f_z)  # 2.5a
            g_n = (jax.tree.map(lambda x: h * x, f_theta),)  # 2.5b
            g_args = jax.tree.map(lambda x: h * x, f_args)
        else:

            def step(z, thetas, args):
                fields = [lambda y, th=th: f(y, th, args) for th in thetas]
                return stepping.rk_step(fields, z, h, plan.tableau)

            _, vjp = jax.vjp(step, zs[n], tuple(thetas[j] for j in row), args)
            a_n, g_n, g_args = vjp(a_next)
        res_a.append(tree_relative_error(result.a[n], a_n))
        res_g.append(tree_relative_error(result.g[n], g_n))
        grad_args = jax.tree.map(jnp.add, grad_args, g_args)
        for m, g in zip(row, result.g[n], strict=True):
            gamma[m] = jax.tree.map(jnp.add, gamma[m], g)
    res["2.5a"], res["2.5b"] = max(res_a), max(res_g)

    # The kernel's exchange: w_m receives Σ_{j ≥ m} κ_{j,m} γ_j (paper's ∫_t^1 Kᵀ(τ-t)γ(τ)dτ).
    size = plan.num_w_needed + 1
    if coupling is None:
        sources = gamma
    else:
        kappa = coupling.matrix(cp, plan.num_w_steps, plan.num_w_needed)
        sources = [
            jax.tree.map(lambda *gs, m=m: sum(kappa[j, m] * gs[j] for j in range(size)), *gamma)
            for m in range(size)
        ]
        # ∂J/∂c = (∂κ/∂c)ᵀ G with G_{j,m} = ⟨γ_j, w_m⟩.
        products = sum(
            jnp.einsum("j...,m...->jm", jnp.stack(gs), jnp.stack(xs))
            for gs, xs in zip(
                zip(*map(jax.tree.leaves, gamma), strict=True),
                zip(*map(jax.tree.leaves, ws[:size]), strict=True),
                strict=True,
            )
        )
        _, kappa_vjp = jax.vjp(lambda cp: coupling.matrix(cp, plan.num_w_steps, size - 1), cp)
        res["K"] = tree_relative_error(result.grad_coupling, kappa_vjp(products)[0])

    dt = 1.0 / plan.num_w_steps
    res_b = [tree_relative_error(result.b[-1], sources[-1])]
    grad_p = jax.tree.map(jnp.zeros_like, p)
    for m in range(plan.num_w_needed):
        _, vjp = jax.vjp(lambda w, p, m=m: evolution.step(w, m * dt, dt, p), ws[m], p)
        b_w, b_p = vjp(result.b[m + 1])
        res_b.append(tree_relative_error(result.b[m], jax.tree.map(jnp.add, b_w, sources[m])))
        grad_p = jax.tree.map(jnp.add, grad_p, b_p)
    res["2.5c"] = max(res_b)
    res["2.5d"] = tree_relative_error(result.grad_w0, result.b[0])
    res["2.5e"] = tree_relative_error(result.grad_p, grad_p)
    res["phi"] = tree_relative_error(result.grad_args, grad_args)
    res["z0"] = tree_relative_error(result.grad_z0, result.a[0])
    return res


RESIDUAL_CASES = [
    (None, "conf1", "rda_tanh", "euler"),
    (None, "conf2", "mlp", "euler"),
    (None, "custom", "linear", "euler"),
    (None, "conf1", "zero", "rk2"),
    (None, "custom", "rda_identity", "rk4"),
    ("dirac_plus", "conf1", "rda_tanh", "euler"),
    ("exponential", "custom", "rda_identity", "rk4"),
]


@pytest.mark.parametrize("coupling,schedule,evolution,method", RESIDUAL_CASES)
def test_recursion_satisfies_each_kkt_condition(coupling, schedule, evolution, method):
    problem = make_problem(evolution, schedule, method, coupling)
    residuals = kkt_residuals(problem, recursion(problem))
    assert ("K" in residuals) == (coupling is not None)
    assert max(residuals.values()) <= 1e-12, residuals


def scaled(tree, factor):
    return jax.tree.map(lambda x: x * factor, tree)


@pytest.mark.parametrize(
    "coupling,schedule,evolution,method",
    [(None, "custom", "linear", "euler"), ("exponential", "custom", "rda_identity", "rk4")],
)
def test_a_perturbed_adjoint_violates_its_kkt_condition(coupling, schedule, evolution, method):
    """One adjoint off by a relative 1e-6 shows up in its own residual, far above rounding."""
    problem = make_problem(evolution, schedule, method, coupling)
    result = recursion(problem)
    bump = 1 + 1e-6

    def residuals_with(**changes):
        return kkt_residuals(problem, result._replace(**changes))

    a = list(result.a)
    a[1] = scaled(a[1], bump)
    assert residuals_with(a=a)["2.5a"] > 1e-8
    a = list(result.a)
    a[-1] = scaled(a[-1], bump)
    assert residuals_with(a=a)["terminal"] > 1e-8
    g = [list(row) for row in result.g]
    g[-1][0] = scaled(g[-1][0], bump)
    assert residuals_with(g=tuple(map(tuple, g)))["2.5b"] > 1e-8
    b = list(result.b)
    b[2] = scaled(b[2], bump)
    assert residuals_with(b=b)["2.5c"] > 1e-8
    b = list(result.b)
    b[0] = scaled(b[0], bump)
    assert residuals_with(b=b)["2.5d"] > 1e-8
    assert residuals_with(grad_p=scaled(result.grad_p, bump))["2.5e"] > 1e-8
    assert residuals_with(grad_args=scaled(result.grad_args, bump))["phi"] > 1e-8
    if coupling is not None:
        assert residuals_with(grad_coupling=scaled(result.grad_coupling, bump))["K"] > 1e-8


# -- central finite differences --------------------------------------------------------------------
def tree_dot(x, y) -> float:
    return float(
        sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True))
    )


def shifted(inputs, direction, step):
    """inputs + step·direction, leaf by leaf."""
    return [
        jax.tree.map(lambda x, v: x + step * v, x, v)
        for x, v in zip(inputs, direction, strict=True)
    ]


@pytest.mark.parametrize(
    "coupling,schedule,evolution,method",
    [
        (None, "conf1", "rda_tanh", "euler"),
        (None, "conf2", "rda_tanh", "euler"),
        (None, "custom", "mlp", "rk4"),
        ("exponential", "conf1", "rda_tanh", "euler"),
        ("dirac_plus", "custom", "mlp", "rk4"),
    ],
)
def test_recursion_matches_central_differences(coupling, schedule, evolution, method):
    problem = make_problem(evolution, schedule, method, coupling)
    inputs = problem["inputs"]
    grads = gradients(recursion(problem))
    J = loss(problem)
    keys = jax.random.split(jax.random.key(11), 5)
    eps = 1e-5
    for i, key in enumerate(keys):
        if inputs[i] is None:  # the Dirac kernel has no parameters
            continue
        direction = [jax.tree.map(jnp.zeros_like, x) for x in inputs]
        direction[i] = perturbed(direction[i], key, 1.0)
        plus, minus = (J(*shifted(inputs, direction, step)) for step in (eps, -eps))
        finite_difference = float(plus - minus) / (2 * eps)
        directional = tree_dot(grads[i], direction[i])
        assert abs(finite_difference - directional) <= 1e-6 * abs(directional), i


# -- check_grads on the solve ----------------------------------------------------------------------
def test_check_grads_of_the_solve_to_second_order():
    """DTO: reverse mode to second order (a custom_vjp has no forward mode); backprop, the same
    discrete map, in both modes; and DTO's forward-over-reverse Hessian-vector product."""
    problem = make_problem("rda_tanh", "custom", "rk2")
    f, inputs, kwargs = problem["f"], problem["inputs"][:4], problem["kwargs"]

    def solve(gradient):
        return lambda *xs: coupled_solve(f, *xs, gradient=gradient, **kwargs)

    check_grads(solve("dto"), inputs, order=2, modes=("rev",))
    check_grads(solve("backprop"), inputs, order=2, modes=("fwd", "rev"))
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(solve("dto"), inputs, inputs)

    tangent = perturbed(jax.tree.map(jnp.zeros_like, inputs), jax.random.key(5), 1.0)

    def grad(gradient):
        return jax.grad(lambda *xs: loss(problem, gradient)(*xs, None), (0, 1, 2, 3))

    hvp = {
        gradient: jax.jvp(grad(gradient), inputs, tangent)[1] for gradient in ("dto", "backprop")
    }
    assert tree_relative_error(hvp["dto"], hvp["backprop"]) <= 1e-12


# -- OTD -------------------------------------------------------------------------------------------
def test_otd_gradient_converges_to_dto_at_first_order():
    """Euler with RDA(σ = identity)-evolved weights, a smooth coupled ODE whose weight steps
    compose exactly: the Neural ODE adjoint's error falls like 1/Nz. (With σ = tanh, B.4
    applies tanh once per weight step, so the discrete map itself changes with Nw.)"""

    def flat(tree):
        return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])

    errors = []
    for steps in (2, 4, 8, 16):
        problem = make_problem("rda_tanh")
        problem["kwargs"].update(
            num_z_steps=steps, num_w_steps=steps, evolution=RDA(activation="identity")
        )
        otd = flat(jax.grad(loss(problem, "otd"), (0, 1, 2, 3, 4))(*problem["inputs"]))
        dto = flat(gradients(recursion(problem)))
        errors.append(float(jnp.linalg.norm(otd - dto) / jnp.linalg.norm(dto)))
    print("OTD relative error vs DTO, Nz = 2, 4, 8, 16:", errors)
    assert errors[0] > 0.1
    assert all(1.6 < a / b < 2.4 for a, b in itertools.pairwise(errors))


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_otd_gradient_is_exact_through_a_time_kernel_when_f_ignores_z(method):
    """With ∂f/∂z = 0 the adjoint a is constant and the backward re-integration of z does not
    matter, so OTD is exact: what it sends through θ_j = Σ κ_{j,m} w_m to w0, p and the
    kernel's parameters must equal DTO's gradient to rounding."""
    problem = make_problem("rda_tanh", "custom", method, "dirac_plus")
    problem["f"] = lambda z, theta, args: f_one_kernel(jnp.ones_like(z), theta, args)
    otd, dto = (
        jax.grad(loss(problem, gradient), (0, 1, 2, 3, 4))(*problem["inputs"])
        for gradient in ("otd", "dto")
    )
    assert tree_relative_error(otd[1:], dto[1:]) <= 1e-12
    assert tree_relative_error(otd[4], dto[4]) <= 1e-12 and jax.tree.leaves(dto[4])


# -- what kkt_gradients takes ----------------------------------------------------------------------
def test_non_float_args_are_fixed_and_aux_is_dropped():
    problem = make_problem("rda_tanh")
    z0, w0, p, args, _ = problem["inputs"]

    def f_aux(z, theta, args):
        dz = f_one_kernel(jnp.roll(z, args["shift"], axis=1), theta, args)
        return dz, jnp.mean(dz)

    args_shift = args | {"shift": 1}
    result = kkt_gradients(f_aux, z0, w0, p, args_shift, problem["c"], has_aux=True, num_z_steps=3)
    assert result.grad_args["shift"].dtype == jax.dtypes.float0

    def J(z0, w0, p, args):
        z1, _ = coupled_solve(f_aux, z0, w0, p, args | {"shift": 1}, has_aux=True, num_z_steps=3)
        return jnp.sum(problem["c"] * z1)

    expected = jax.grad(J, (0, 1, 2, 3))(z0, w0, p, args)
    got = (result.grad_z0, result.grad_w0, result.grad_p, {k: result.grad_args[k] for k in args})
    assert tree_relative_error(got, expected) <= 1e-12


def never_called(z, theta, args):
    raise AssertionError("f was traced before the arguments were validated")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_z_steps=5, method="rk2"), "multiple of 10"),
        (dict(num_z_steps=2, num_w_steps=4, schedule="conf2", method="rk4"), "beyond num_w_steps"),
        (dict(num_z_steps=2, schedule=[0, 3]), "m\\(1\\)=3 is out of range"),
    ],
)
def test_bad_plans_fail_before_tracing(kwargs, message):
    z0, w0, p, args, _ = make_problem("rda_tanh")["inputs"]
    with pytest.raises(ValueError, match=message):
        kkt_gradients(never_called, z0, w0, p, args, z0, **kwargs)


def test_cotangent_of_the_wrong_shape_is_named():
    problem = make_problem("rda_tanh")
    z0, w0, p, args, _ = problem["inputs"]
    with pytest.raises(ValueError, match="ct_z1"):
        kkt_gradients(problem["f"], z0, w0, p, args, z0[:1])
