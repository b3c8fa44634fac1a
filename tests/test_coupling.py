"""Couplings θ_j = Σ_{m ≤ j} κ_{j,m} w_m (eq. 2.3d): the one-hot case is the uncoupled solve bit
for bit, the trapezoid rule has its order, the kernels their closed forms, diffrax's augmented
system (z, w, u) is the continuous limit, and bad couplings fail before tracing. (Their
gradients are in tests/test_gradients.py.)"""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_solve
from conftest import tree_relative_error

from anodev2_jax import (
    RDA,
    Dirac,
    DiracPlus,
    Exponential,
    Mixing,
    Smooth,
    Zero,
    coupled_solve,
    make_coupling,
    make_plan,
    stepping,
    vector_field,
)
from anodev2_jax.solve import weight_trajectory

f = test_solve.f
problem = test_solve.problem  # the same fixture: z0, w0, RDA parameters p, args

PLANS = {
    "conf1": dict(num_z_steps=5),
    "conf2": dict(num_z_steps=2, num_w_steps=10, schedule="conf2"),
    "custom": dict(num_z_steps=3, num_w_steps=4, schedule=[4, 1, 1]),
    "rk4": dict(num_z_steps=2, num_w_steps=4, method="rk4"),
}


# -- the one-hot case ------------------------------------------------------------------------------
def uncoupled_reference(z0, w0, p, args, num_z_steps, num_w_steps=None, schedule="conf1",
                        method="euler"):  # fmt: skip
    """The solve as it was before couplings existed: stage i of z-step n applies w_m itself."""
    plan = make_plan(num_z_steps, num_w_steps, schedule, method)
    ws = weight_trajectory(RDA(), w0, p, plan.num_w_steps, plan.num_w_needed)
    z = z0
    for row in plan.stage_indices:
        fields = [lambda y, m=m: f(y, ws[m], args) for m in row]
        z = stepping.rk_step(fields, z, 1.0 / plan.num_z_steps, plan.tableau)
    return z


@pytest.mark.parametrize("plan", PLANS)
def test_the_dirac_coupling_is_the_uncoupled_solve_bit_for_bit(problem, plan):
    kwargs = PLANS[plan]
    expected = uncoupled_reference(*problem, **kwargs)
    for gradient in ("dto", "otd", "backprop"):
        default = coupled_solve(f, *problem, gradient=gradient, **kwargs)
        dirac = coupled_solve(f, *problem, coupling=Dirac(), gradient=gradient, **kwargs)
        np.testing.assert_array_equal(default, expected)
        np.testing.assert_array_equal(dirac, expected)


def test_one_hot_mixing_weights_take_the_general_path_and_agree(problem):
    """Rows e_{m(j)} of κ under conf1 are the explicit schedule m, computed by mixing."""
    picks = [0, 0, 2, 1, 3]  # causal: m(j) ≤ j
    kappa = np.eye(6)[[*picks, 5]]

    def J(**kwargs):
        def loss(z0, w0, p, args):
            return jnp.sum(coupled_solve(f, z0, w0, p, args, num_z_steps=5, **kwargs) ** 2)

        return jax.value_and_grad(loss, (0, 1, 2, 3))(*problem)

    (by_schedule, grad_schedule), (by_mixing, grad_mixing) = (
        J(schedule=picks),
        J(coupling=Mixing(kappa)),
    )
    assert abs(float(by_mixing - by_schedule)) <= 1e-15 * float(by_schedule)
    assert tree_relative_error(grad_mixing, grad_schedule) <= 1e-14
    identity = coupled_solve(f, *problem, coupling=Mixing(np.eye(6)), num_z_steps=5)
    np.testing.assert_allclose(identity, coupled_solve(f, *problem, num_z_steps=5), rtol=1e-15)


# -- the quadrature and the kernels ----------------------------------------------------------------
def exponential_memory(rate, a, t):
    """∫_0^t λ e^{-λ(t-τ)} e^{aτ} dτ = λ (e^{at} - e^{-λt}) / (a + λ)."""
    return rate * (np.exp(a * t) - np.exp(-rate * t)) / (a + rate)


def test_trapezoid_rule_is_second_order_against_a_closed_form():
    """θ_j = Σ_m κ_{j,m} w(t_m) for w(τ) = e^{aτ} (a = 0.7 and -1.3) and K = δ/2 + 3e^{-3s}:
    the error of the trapezoid rule over all j falls as δ², and θ_0 is the Dirac part alone."""
    kernel = DiracPlus(Exponential(init_rate=3.0), init_dirac=0.5)
    c = kernel.init(jnp.zeros(()))
    errors = []
    for num_w_steps in (8, 16, 32, 64):
        t = np.arange(num_w_steps + 1) / num_w_steps
        kappa = np.asarray(kernel.matrix(c, num_w_steps, num_w_steps))
        error = 0.0
        for a in (0.7, -1.3):
            theta = kappa @ np.exp(a * t)
            assert theta[0] == 0.5
            exact = 0.5 * np.exp(a * t) + exponential_memory(3.0, a, t)
            error = max(error, float(np.max(np.abs(theta - exact))))
        errors.append(error)
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    print("trapezoid errors, Nw = 8..64:", errors, "observed orders:", orders)
    assert np.all((orders > 1.9) & (orders < 2.1)), orders


def test_kernel_weights_are_causal_and_a_kernel_without_dirac_part_starts_at_zero(problem):
    _, w0, p, _ = problem
    ws = weight_trajectory(RDA(), w0, p, 4, 4)
    for kernel in (Exponential(), Smooth(lambda s, c: jnp.cos(s))):
        c = kernel.init(w0)
        kappa = np.asarray(kernel.matrix(c, 4, 4))
        assert np.all(np.triu(kappa, 1) == 0) and np.all(kappa[0] == 0)
        thetas = kernel.theta_trajectory(ws, c, 4)
        assert not np.any(thetas[0])  # θ(0) = 0
        expected = sum(kappa[4, m] * ws[m] for m in range(5))
        np.testing.assert_allclose(thetas[4], expected, rtol=1e-14)
    # A constant weight under the exponential memory: θ(t) → (1 - e^{-λt}) w0 as δ → 0.
    kernel = Exponential(init_rate=2.0)
    row = np.asarray(kernel.matrix(kernel.init(w0), 64, 64))[-1]
    np.testing.assert_allclose(row.sum(), 1 - np.exp(-2.0), rtol=1e-4)


def test_kernel_parameters_are_used_as_given(problem):
    """The rate in c, not init_rate, sets λ; it is softplus of the stored value."""
    _, w0, _, _ = problem
    kernel = Exponential(init_rate=1.0)
    c = {"rate": jnp.asarray(np.log(np.expm1(4.0)))}  # λ = 4
    lags = jnp.linspace(0.0, 1.0, 5)
    np.testing.assert_allclose(kernel.smooth_values(lags, c), 4.0 * np.exp(-4.0 * lags))
    np.testing.assert_allclose(float(kernel.rate(kernel.init(w0))), 1.0, rtol=1e-14)


# -- diffrax: the augmented system (z, w, u) -------------------------------------------------------
def test_fine_coupled_solve_converges_to_the_augmented_diffrax_solve(problem):
    """θ = a·w + u, du/dt = λ(w - u), u(0) = 0, integrated adaptively, vs coupled_solve with RK4
    z-steps and the trapezoid rule: second order (the quadrature's)."""
    z0, w0, p, args = problem
    kernel = DiracPlus(Exponential(init_rate=2.0), init_dirac=0.5)
    c = kernel.init(w0)
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field(f, RDA(scheme="rk4"), kernel)), diffrax.Tsit5(),
        t0=0.0, t1=1.0, dt0=0.1, y0=(z0, w0, jnp.zeros_like(w0)), args=(args, p, c),
        stepsize_controller=diffrax.PIDController(rtol=1e-9, atol=1e-9),
    )  # fmt: skip
    reference = solution.ys[0][-1]
    errors = [
        tree_relative_error(
            coupled_solve(
                f, z0, w0, p, args, evolution=RDA(scheme="rk4"), coupling=kernel,
                coupling_params=c, method="rk4", num_z_steps=n, num_w_steps=2 * n,
            ),
            reference,
        )
        for n in (2, 4, 8)
    ]  # fmt: skip
    print(f"{kernel}: relative error vs diffrax, Nz = 2, 4, 8:", errors)
    assert errors[-1] < 1e-3
    assert errors[1] < errors[0] / 3 and errors[2] < errors[1] / 3


def test_the_pure_exponential_field_is_the_moving_average_ode():
    """Exponential, no Dirac part: f sees θ = u, and du/dt = λ(w - u)."""
    kernel = Exponential(init_rate=3.0)
    w, u = jnp.full((1, 1, 1, 2), 2.0), jnp.full((1, 1, 1, 2), 0.5)
    field = vector_field(lambda z, theta, args: theta, Zero(), kernel)
    dz, dw, du = field(0.0, (u, w, u), (None, None, kernel.init(w)))
    np.testing.assert_allclose(dz, u)
    np.testing.assert_allclose(du, 3.0 * (w - u), rtol=1e-14)
    assert not np.any(dw)


# -- validation at the boundary --------------------------------------------------------------------
def never_called(z, theta, args):
    raise AssertionError("f was traced before the arguments were validated")


@pytest.mark.parametrize(
    "weights,message",
    [
        (np.ones((3, 4)), r"square \(Nw\+1, Nw\+1\) matrix.*got shape \(3, 4\)"),
        (np.ones(3), r"got shape \(3,\)"),
        (np.triu(np.ones((3, 3))), r"not causal: κ\[0, 1\] = 1 mixes w_1 into θ_0"),
        (np.diag([1.0, np.nan, 1.0]), r"κ\[1, 1\] = nan is not finite"),
        ([[1, 0], ["a", 1]], "square matrix of numbers"),
    ],
)
def test_bad_mixing_weights_are_named(weights, message):
    with pytest.raises(ValueError, match=message):
        Mixing(weights)


def test_traced_mixing_weights_are_refused():
    with pytest.raises(ValueError, match="must be concrete numbers"):
        jax.jit(lambda k: Mixing(k).weights)(jnp.eye(3))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(coupling=Mixing(np.eye(4)), num_z_steps=5), r"for num_w_steps=3.*\(6, 6\) matrix"),
        (dict(coupling=Exponential()), r"coupling_params=.*Exponential\(init_rate=1.0\).init"),
        (dict(coupling=Exponential(), coupling_params={"lam": 1.0}), r"keys \['rate'\]"),
        (dict(coupling=Exponential(), coupling_params={"rate": jnp.ones(2)}), "float scalar"),
        (dict(coupling=DiracPlus(), coupling_params={"dirac": 1.0}), "'dirac', 'smooth'"),
        (dict(coupling=Dirac(), coupling_params={"rate": 1.0}), "Pass coupling_params=None"),
        (dict(coupling=Smooth(lambda s, c: s[:2]), coupling_params=None), "shape of s"),
        (dict(coupling=Smooth(lambda s, c: c["a"] * s)), "pass the parameters fn expects"),
        (dict(coupling="exponential"), "is not a coupling"),
    ],
)
def test_bad_couplings_fail_before_tracing(problem, kwargs, message):
    with pytest.raises(ValueError, match=message):
        coupled_solve(never_called, *problem, **kwargs)


def test_couplings_without_an_ode_form_are_refused_by_vector_field():
    with pytest.raises(ValueError, match="no continuous form"):
        vector_field(f, RDA(), Mixing(np.eye(3)))
    with pytest.raises(ValueError, match="no ODE form"):
        vector_field(f, RDA(), DiracPlus(Smooth(lambda s, c: jnp.exp(-s))))


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: Exponential(init_rate=0.0), "init_rate=0.0 must be a positive"),
        (lambda: DiracPlus(smooth=RDA()), "is not a Kernel"),
        (lambda: make_coupling("gauss"), r"kernel='gauss' is unknown; use one of \('dirac'"),
        (lambda: make_coupling("exponential", -1.0), "kernel_rate=-1.0 must be a positive"),
    ],
)
def test_bad_kernel_settings_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_make_coupling_names():
    assert make_coupling("dirac") == Dirac()
    assert make_coupling("exponential", 2.0) == Exponential(init_rate=2.0)
    assert make_coupling("dirac+exponential", 2.0) == DiracPlus(Exponential(init_rate=2.0))
    assert hash(Mixing(np.eye(3))) == hash(Mixing(np.eye(3).tolist()))  # static configs
