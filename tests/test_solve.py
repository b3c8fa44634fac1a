"""coupled_solve: schedules, reductions, DTO/OTD gradients and memory, diffrax, validation."""

import functools
import itertools

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tree_relative_error

from anodev2_jax import (
    MLP,
    RDA,
    DiracPlus,
    Exponential,
    Linear,
    Zero,
    coupled_solve,
    make_plan,
    vector_field,
)


def conv(z, kernel):
    return jax.lax.conv_general_dilated(
        z, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def f(z, theta, args):
    """A small conv field: tanh(conv3x3(z, θ) + b)."""
    return jnp.tanh(conv(z, theta) + args["bias"][None, None, None, :])


@pytest.fixture
def problem():
    keys = jax.random.split(jax.random.key(1), 3)
    z0 = jax.random.normal(keys[0], (2, 5, 5, 2))
    w0 = 0.5 * jax.random.normal(keys[1], (3, 3, 2, 2))
    p = {"diffusion": jnp.asarray(-1.0), "vx": jnp.asarray(0.4), "vy": 0.3, "rho": -0.2}
    p = jax.tree.map(jnp.asarray, p)
    args = {"bias": 0.1 * jax.random.normal(keys[2], (2,))}
    return z0, w0, p, args


def loss_fn(**solve_kwargs):
    probe = jax.random.normal(jax.random.key(7), (2, 5, 5, 2))

    def loss(z0, w0, p, args, coupling_params=None):
        z1 = coupled_solve(f, z0, w0, p, args, coupling_params=coupling_params, **solve_kwargs)
        return jnp.sum(probe * z1)

    return loss


def test_zero_evolution_is_a_neural_ode_with_static_weights(problem):
    z0, w0, _, args = problem
    z = z0
    for _ in range(3):
        z = z + f(z, w0, args) / 3
    out = coupled_solve(f, z0, w0, None, args, evolution=Zero(), num_z_steps=3)
    np.testing.assert_allclose(out, z, rtol=1e-14)


def test_one_step_with_zero_evolution_is_exactly_the_residual_block(problem):
    z0, w0, _, args = problem
    out = coupled_solve(f, z0, w0, None, args, evolution=Zero(), num_z_steps=1)
    np.testing.assert_array_equal(out, z0 + f(z0, w0, args))


def indexed_f(z, theta, args, k):
    """f with a bias per evaluation k: args["bias"] is (evaluations, channels)."""
    return f(z, theta, {"bias": args["bias"][k]})


@pytest.mark.parametrize("method, num_z_steps", [("euler", 3), ("rk2", 2), ("rk4", 1)])
def test_an_indexed_field_gets_each_evaluation_index_once_in_order(problem, method, num_z_steps):
    z0, w0, p, args = problem
    seen = []

    def recording_f(z, theta, args, k):
        seen.append(k)
        return f(z, theta, args)

    nw = 4 * num_z_steps
    coupled_solve(recording_f, z0, w0, p, args, num_z_steps=num_z_steps, num_w_steps=nw,
                  method=method, indexed=True)  # fmt: skip
    evaluations = make_plan(num_z_steps, nw, method=method).num_evaluations
    assert seen == [0, *range(evaluations)]  # check_inputs' abstract call, then the solve


def indexed_gradients(problem, gradient, num_z_steps, method, bias, static=False):
    """∂/∂(z0, w0, bias) of a probe of the solve with one bias row per evaluation (θ static
    with ``static``, else RDA-evolved)."""
    z0, w0, p, _ = problem
    kwargs = dict(num_z_steps=num_z_steps, num_w_steps=2 * num_z_steps, method=method)
    if static:
        kwargs.update(evolution=Zero())
        p = None
    probe = jax.random.normal(jax.random.key(7), z0.shape)

    def loss(z0, w0, bias):
        z1 = coupled_solve(
            indexed_f, z0, w0, p, {"bias": bias}, gradient=gradient, indexed=True, **kwargs
        )
        return jnp.sum(probe * z1)

    return jax.grad(loss, (0, 1, 2))(z0, w0, bias)


def test_indexed_fields_have_the_exact_dto_gradient(problem):
    bias = 0.3 * jax.random.normal(jax.random.key(3), (4, 2))  # Nz = 2, RK2: 4 evaluations
    dto = indexed_gradients(problem, "dto", 2, "rk2", bias)
    assert tree_relative_error(dto, indexed_gradients(problem, "backprop", 2, "rk2", bias)) < 1e-12
    assert float(jnp.min(jnp.abs(dto[2]).sum(axis=1))) > 0  # every evaluation's row is used


def test_otd_with_an_indexed_field_converges_to_the_exact_gradient(problem):
    """OTD's backward stage i uses forward evaluation i's parameters: the error is O(h)."""
    errors = []
    for num_z_steps in (16, 64):
        bias = jnp.linspace(0.0, 1.0, num_z_steps)[:, None] * jnp.array([[0.2, -0.1]])
        otd = indexed_gradients(problem, "otd", num_z_steps, "euler", bias, static=True)
        exact = indexed_gradients(problem, "backprop", num_z_steps, "euler", bias, static=True)
        errors.append(tree_relative_error(otd, exact))
    assert errors[1] < errors[0] / 3, errors


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        (dict(num_z_steps=5, schedule="conf1"), [0, 1, 2, 3, 4]),
        (dict(num_z_steps=2, num_w_steps=10, schedule="conf2"), [0, 10]),
        (dict(num_z_steps=3, num_w_steps=6, schedule="conf1"), [0, 2, 4]),
        (dict(num_z_steps=3, num_w_steps=4, schedule=[4, 0, 2]), [4, 0, 2]),
        (dict(num_z_steps=2, num_w_steps=4, method="rk2"), [0, 1, 2, 3]),
        (dict(num_z_steps=1, num_w_steps=2, method="rk4"), [0, 1, 1, 2]),
    ],
)
def test_schedules_apply_the_weights_of_the_spec(problem, kwargs, expected):
    """θ seen by f, recorded; the evolution w_m = exp(mδ) w0 reveals the index m."""
    z0, w0, _, args = problem
    seen = []

    def recording_f(z, theta, args):
        seen.append(theta)
        return f(z, theta, args)

    rate = {"rate": jnp.ones_like(w0)}
    evolution = Linear(mode="elementwise")
    coupled_solve(recording_f, z0, w0, rate, args, evolution=evolution, **kwargs)
    seen = seen[1:]  # the first call is the shape check (jax.eval_shape)
    num_w = kwargs.get("num_w_steps", kwargs["num_z_steps"])
    indices = [round(float(np.log(theta[0, 0, 0, 0] / w0[0, 0, 0, 0])) * num_w) for theta in seen]
    assert indices == expected


@pytest.mark.parametrize(
    "evolution,kwargs",
    [
        (RDA(), dict(num_z_steps=5)),
        (RDA(), dict(num_z_steps=2, num_w_steps=10, schedule="conf2")),
        (MLP(hidden=3), dict(num_z_steps=2, num_w_steps=4, method="rk4")),
        (RDA(), dict(num_z_steps=2, num_w_steps=10, schedule="conf2", coupling=Exponential())),
    ],
)
def test_dto_gradient_equals_backprop(problem, evolution, kwargs):
    z0, w0, p, args = problem
    if isinstance(evolution, MLP):
        p = jax.tree.map(lambda x: x + 0.2, evolution.init(w0, jax.random.key(0)))
    c = kwargs["coupling"].init(w0) if "coupling" in kwargs else None
    argnums = (0, 1, 2, 3, 4)
    dto = jax.grad(loss_fn(evolution=evolution, gradient="dto", **kwargs), argnums)
    plain = jax.grad(loss_fn(evolution=evolution, gradient="backprop", **kwargs), argnums)
    assert tree_relative_error(dto(z0, w0, p, args, c), plain(z0, w0, p, args, c)) < 1e-12


def test_otd_gradient_converges_to_dto_and_differs_when_coarse(problem):
    z0, w0, _, args = problem
    kwargs = dict(evolution=Zero(), method="rk2")
    errors = []
    for steps in (2, 4, 8, 16):
        kwargs.update(num_z_steps=steps, num_w_steps=2 * steps)
        dto = jax.grad(loss_fn(gradient="dto", **kwargs), (0, 1, 3))
        otd = jax.grad(loss_fn(gradient="otd", **kwargs), (0, 1, 3))
        errors.append(tree_relative_error(otd(z0, w0, None, args), dto(z0, w0, None, args)))
    assert errors[0] > 1e-3  # measurably wrong at coarse steps
    assert all(b < a / 3 for a, b in itertools.pairwise(errors))  # ~ h² for rk2


def test_trajectory_and_aux(problem):
    z0, w0, p, args = problem

    def f_aux(z, theta, args):
        dz = f(z, theta, args)
        return dz, jnp.mean(dz)

    traj, auxs = coupled_solve(
        f_aux, z0, w0, p, args, num_z_steps=2, num_w_steps=10, schedule="conf2",
        has_aux=True, return_trajectory=True,
    )  # fmt: skip
    assert len(traj.z) == 3 and len(traj.w) == 11 and len(auxs) == 2
    assert traj.theta == traj.w  # the Dirac coupling: θ_j is w_j itself
    z1, auxs1 = coupled_solve(
        f_aux, z0, w0, p, args, num_z_steps=2, num_w_steps=10, schedule="conf2", has_aux=True
    )
    np.testing.assert_allclose(traj.z[-1], z1, rtol=1e-14)
    np.testing.assert_allclose(auxs, auxs1, rtol=1e-14)
    np.testing.assert_allclose(traj.w[1], RDA().step(w0, 0.0, 0.1, p), rtol=1e-14)


@pytest.mark.parametrize("gradient", ["dto", "otd", "backprop"])
def test_float32_in_float32_out(problem, gradient):
    z0, w0, p, args = jax.tree.map(lambda x: x.astype(jnp.float32), problem)
    coupling = DiracPlus() if gradient == "dto" else None  # a kernel's κ in float32 too
    c = None if coupling is None else coupling.init(w0)
    loss = jax.jit(loss_fn(num_z_steps=2, gradient=gradient, coupling=coupling))
    grads = jax.grad(loss, (0, 1, 2, 3, 4))(z0, w0, p, args, c)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    assert coupled_solve(f, z0, w0, p, args, num_z_steps=2).dtype == jnp.float32


def test_diffrax_euler_equals_coupled_solve_with_the_vector_field_evolution(problem):
    z0, w0, p, args = problem
    evolution = RDA(scheme="euler")
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field(f, evolution)), diffrax.Euler(),
        t0=0.0, t1=1.0, dt0=0.25, y0=(z0, w0), args=(args, p),
    )  # fmt: skip
    z1 = coupled_solve(f, z0, w0, p, args, evolution=evolution, num_z_steps=4)
    assert tree_relative_error(solution.ys[0][-1], z1) < 1e-13


def test_fine_coupled_solve_converges_to_an_adaptive_diffrax_solve(problem):
    z0, w0, p, args = problem
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field(f, RDA())), diffrax.Tsit5(),
        t0=0.0, t1=1.0, dt0=0.1, y0=(z0, w0), args=(args, p),
        stepsize_controller=diffrax.PIDController(rtol=1e-11, atol=1e-11),
    )  # fmt: skip
    reference = solution.ys[0][-1]
    errors = [
        tree_relative_error(
            coupled_solve(
                f, z0, w0, p, args, evolution=RDA(scheme="rk4"), method="rk4",
                num_z_steps=n, num_w_steps=2 * n,
            ),
            reference,
        )
        for n in (2, 4, 8)
    ]  # fmt: skip
    assert errors[-1] < 1e-5
    assert errors[1] < errors[0] / 8 and errors[2] < errors[1] / 8


# -- memory: ANODE's O(L) + O(Nt) claim, on the compiled program -----------------------------------
def gradient_temp_bytes(num_blocks: int, num_steps: int, gradient: str, kernel=None) -> int:
    """Temp bytes of the compiled gradient of a stack of ODE blocks (conv f, float32), with
    θ = w or, given a ``kernel``, θ_j = Σ_m κ_{j,m} w_m (its parameters differentiated too)."""
    z0 = jax.ShapeDtypeStruct((8, 16, 16, 8), jnp.float32)
    ws = [jax.ShapeDtypeStruct((3, 3, 8, 8), jnp.float32)] * num_blocks
    cs = [None if kernel is None else kernel.init(w) for w in ws]
    block = functools.partial(
        coupled_solve, evolution=Zero(), coupling=kernel, num_z_steps=num_steps, gradient=gradient
    )

    def loss(params, z):
        for w, c in zip(*params, strict=True):
            z = block(lambda z, theta, _: jnp.tanh(conv(z, theta)), z, w, coupling_params=c)
        return jnp.sum(z)

    compiled = jax.jit(jax.grad(loss)).lower((ws, cs), z0).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_dto_memory_is_o_of_blocks_plus_steps():
    """Also with the exponential kernel, whose θ_j mix all earlier w_m: still O(L) + O(Nt).
    (Its grid stops at Nt = 10: XLA:CPU takes seconds to compile the mixing of 21 kernels.)"""
    grid = ((1, 10), (4, 10), (4, 2), (4, 20))
    plain = {(L, nt): gradient_temp_bytes(L, nt, "backprop") for L, nt in grid}
    dto = {(L, nt): gradient_temp_bytes(L, nt, "dto") for L, nt in grid}
    print(f"temp bytes at (L, Nt) = {grid}: dto {dto}, backprop {plain}")
    assert dto[4, 10] <= 1.5 * dto[1, 10]
    assert plain[4, 10] >= 3 * plain[1, 10]
    assert dto[4, 20] - dto[4, 2] <= (plain[4, 20] - plain[4, 2]) / 3
    kernel = {(L, nt): gradient_temp_bytes(L, nt, "dto", Exponential()) for L, nt in grid[:3]}
    print(f"exponential kernel, dto: {kernel}")
    assert kernel[4, 10] <= 1.5 * kernel[1, 10]
    assert kernel[4, 10] - kernel[4, 2] <= (plain[4, 10] - plain[4, 2]) / 3
    assert kernel[4, 10] <= 1.2 * dto[4, 10]  # the θ_j cost little beside the activations


# -- validation at the boundary --------------------------------------------------------------------
def never_called(z, theta, args):
    raise AssertionError("f was traced before the arguments were validated")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_z_steps=0), "num_z_steps=0 must be a positive integer"),
        (dict(num_z_steps=2.5), "num_z_steps=2.5 must be a positive integer"),
        (dict(num_z_steps=2, num_w_steps=-1), "num_w_steps=-1"),
        (dict(num_z_steps=2, schedule="conf3"), "schedule='conf3' is unknown"),
        (dict(num_z_steps=3, num_w_steps=4), "multiple of num_z_steps"),
        (dict(num_z_steps=5, schedule="conf2"), "needs num_z_steps=2"),
        (dict(num_z_steps=3, schedule=[0, 1]), "has 2 entries"),
        (dict(num_z_steps=2, num_w_steps=4, schedule=[0, 5]), "m\\(1\\)=5 is out of range"),
        (dict(num_z_steps=5, method="rk2"), "multiple of 10"),
        (dict(num_z_steps=2, num_w_steps=4, schedule="conf2", method="rk4"), "beyond num_w_steps"),
        (dict(num_z_steps=2, method="heun"), "method='heun' is unknown"),
        (dict(num_z_steps=2, gradient="adjoint"), "gradient='adjoint' is unknown"),
    ],
)
def test_bad_solver_arguments_fail_before_tracing(problem, kwargs, message):
    z0, w0, p, args = problem
    with pytest.raises(ValueError, match=message):
        coupled_solve(never_called, z0, w0, p, args, **kwargs)


def test_bad_kernels_and_parameters_fail_before_tracing(problem):
    z0, w0, p, args = problem
    with pytest.raises(ValueError, match=r"shape \(kh, kw, cin, cout\)"):
        coupled_solve(never_called, z0, w0[0], p, args)
    with pytest.raises(ValueError, match=r"'rho'.*expected \(\)"):
        coupled_solve(never_called, z0, w0, p | {"rho": jnp.ones(2)}, args)
    with pytest.raises(ValueError, match=r"RDA\(per_channel=False\).init"):
        coupled_solve(never_called, z0, w0, None, args)


def test_field_with_wrong_output_is_named(problem):
    z0, w0, p, args = problem
    with pytest.raises(ValueError, match="must return dz/dt with z's structure"):
        coupled_solve(lambda z, theta, args: z[..., :1], z0, w0, p, args)


def test_plan_exposes_stage_indices():
    assert make_plan(2, 4, "conf1", "rk4").stage_indices == ((0, 1, 1, 2), (2, 3, 3, 4))
