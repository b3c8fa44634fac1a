"""Evolution operators: the RDA step's exactness and conventions, Linear, MLP, Zero."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from conftest import tree_allclose
from jax.test_util import check_grads

from anodev2_jax import MLP, RDA, Linear, Zero

IDENTITY = RDA(activation="identity")


def rda_params(diffusion=0.3, vx=0.7, vy=-0.4, rho=0.2):
    """RDA parameters with the physical diffusion d (not its softplus-raw value)."""
    raw = -1e3 if diffusion == 0 else float(np.log(np.expm1(diffusion)))
    return {k: jnp.asarray(v) for k, v in dict(diffusion=raw, vx=vx, vy=vy, rho=rho).items()}


def random_kernel(shape=(5, 5, 2, 3), seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def spectral_derivative(n: int) -> np.ndarray:
    """Periodic spectral d/dx on n (odd) unit-spaced points, in closed form (no FFT)."""
    j = np.arange(n)
    diff = j[:, None] - j[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(diff == 0, 0.0, (np.pi / n) * (-1.0) ** diff / np.sin(np.pi * diff / n))


def dense_rda(kh, kw, d, vx, vy, rho) -> np.ndarray:
    """The linear RDA operator d Δ + v·∇ + ρ on a row-major (kh, kw) grid, as a matrix."""
    dy = np.kron(spectral_derivative(kh), np.eye(kw))
    dx = np.kron(np.eye(kh), spectral_derivative(kw))
    return d * (dx @ dx + dy @ dy) + vx * dx + vy * dy + rho * np.eye(kh * kw)


def test_rda_identity_steps_compose_exactly():
    w, p = random_kernel(), rda_params()
    two_steps = IDENTITY.step(IDENTITY.step(w, 0.0, 0.3, p), 0.3, 0.45, p)
    assert tree_allclose(two_steps, IDENTITY.step(w, 0.0, 0.75, p), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("shape", [(5, 5, 2, 3), (3, 7, 1, 2)])
def test_rda_identity_matches_dense_matrix_exponential(shape):
    w, p = random_kernel(shape), rda_params()
    kh, kw = shape[:2]
    propagator = scipy.linalg.expm(0.6 * dense_rda(kh, kw, 0.3, 0.7, -0.4, 0.2))
    expected = np.einsum("ij,jab->iab", propagator, np.asarray(w).reshape(kh * kw, *shape[2:]))
    np.testing.assert_allclose(
        IDENTITY.step(w, 0.0, 0.6, p), expected.reshape(shape), rtol=1e-11, atol=1e-12
    )


def test_rda_vector_field_is_the_dense_operator():
    w, p = random_kernel(), rda_params()
    flat = np.asarray(w).reshape(25, -1)
    expected = (dense_rda(5, 5, 0.3, 0.7, -0.4, 0.2) @ flat).reshape(w.shape)
    np.testing.assert_allclose(IDENTITY.vector_field(0.0, w, p), expected, atol=1e-12)
    np.testing.assert_allclose(RDA().vector_field(0.0, w, p), np.tanh(expected), atol=1e-12)


def test_diffusion_keeps_the_kernel_mean():
    w = random_kernel()
    out = IDENTITY.step(w, 0.0, 1.0, rda_params(diffusion=0.8, vx=0.0, vy=0.0, rho=0.0))
    np.testing.assert_allclose(out.mean(axis=(0, 1)), w.mean(axis=(0, 1)), atol=1e-13)
    assert not np.allclose(out, w)  # it did diffuse


@pytest.mark.parametrize("shape", [(3, 3, 2, 2), (4, 4, 1, 2), (5, 5, 2, 1)])
def test_unit_advection_is_a_periodic_roll(shape):
    w = random_kernel(shape)
    along_x = IDENTITY.step(w, 0.0, 1.0, rda_params(diffusion=0, vx=1.0, vy=0.0, rho=0.0))
    np.testing.assert_allclose(along_x, jnp.roll(w, -1, axis=1), atol=1e-12)
    along_y = IDENTITY.step(w, 0.0, 1.0, rda_params(diffusion=0, vx=0.0, vy=1.0, rho=0.0))
    np.testing.assert_allclose(along_y, jnp.roll(w, -1, axis=0), atol=1e-12)


def test_pure_reaction_scales_by_exp_rho_delta():
    w = random_kernel()
    out = IDENTITY.step(w, 0.0, 0.35, rda_params(diffusion=0, vx=0.0, vy=0.0, rho=-1.3))
    np.testing.assert_allclose(out, w * np.exp(-1.3 * 0.35), rtol=1e-13, atol=1e-14)


def test_paper_step_applies_tanh_to_the_linear_solution():
    w, p = random_kernel(), rda_params()
    np.testing.assert_allclose(
        RDA().step(w, 0.0, 0.2, p), np.tanh(IDENTITY.step(w, 0.0, 0.2, p)), atol=1e-14
    )


def test_rda_gradients_wrt_kernel_and_parameters():
    w = random_kernel((3, 3, 1, 2))
    p = rda_params()
    check_grads(lambda w, p: RDA().step(w, 0.0, 0.4, p), (w, p), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", [(5, 5, 2, 3), (3, 4, 2, 3), (1, 1, 2, 3)])
def test_rda_matrix_transform_equals_the_fft(shape, per_channel):
    """transform="matrix" (the CPU's default up to 64 taps) is jnp.fft's DFT: values, and gradients
    with respect to the kernel and the parameters."""
    w = random_kernel(shape)
    p = {k: v + 0.1 * jnp.arange(shape[3]) for k, v in rda_params().items()}
    if not per_channel:
        p = rda_params()
    by = {t: RDA(per_channel=per_channel, transform=t) for t in ("fft", "matrix", "auto")}
    outs = {t: evo.step(w, 0.0, 0.7, p) for t, evo in by.items()}
    fields = {t: evo.vector_field(0.0, w, p) for t, evo in by.items()}
    for t in ("matrix", "auto"):
        np.testing.assert_allclose(outs[t], outs["fft"], rtol=0, atol=1e-13)
        np.testing.assert_allclose(fields[t], fields["fft"], rtol=0, atol=1e-13)

    def loss(evo):
        return jax.grad(lambda w, p: jnp.sum(jnp.sin(evo.step(w, 0.0, 0.7, p))), (0, 1))(w, p)

    assert tree_allclose(loss(by["matrix"]), loss(by["fft"]), rtol=1e-12, atol=1e-13)


def test_rda_auto_transform_uses_the_fft_for_large_kernels():
    w = random_kernel((9, 9, 1, 2))
    jaxpr = str(jax.make_jaxpr(lambda w: RDA().step(w, 0.0, 0.5, rda_params()))(w))
    assert "fft" in jaxpr
    small = str(jax.make_jaxpr(lambda w: RDA().step(w, 0.0, 0.5, rda_params()))(w[:8, :8]))
    assert "fft" not in small


def test_rda_auto_transform_is_the_fft_without_the_cpu_speedups(monkeypatch):
    """ANODEV2_CPU_SPEEDUPS=0: "auto" is the FFT for every kernel, as on a GPU or TPU."""
    monkeypatch.setenv("ANODEV2_CPU_SPEEDUPS", "0")
    w = random_kernel((3, 3, 1, 2))
    assert "fft" in str(jax.make_jaxpr(lambda w: RDA().step(w, 0.0, 0.5, rda_params()))(w))


def test_per_channel_parameters_act_on_their_output_channel():
    w = random_kernel((5, 5, 2, 3))
    evo = RDA(per_channel=True)
    p = {k: jnp.asarray([0.1, 0.5, -0.3]) for k in ("diffusion", "vx", "vy", "rho")}
    out = evo.step(w, 0.0, 0.5, p)
    for c in range(3):
        p_c = {k: v[c] for k, v in p.items()}
        np.testing.assert_allclose(
            out[..., c], RDA().step(w[..., c : c + 1], 0.0, 0.5, p_c)[..., 0]
        )


def test_pytree_of_kernels_has_one_parameter_set_per_leaf():
    ws = {"conv1": random_kernel((3, 3, 2, 2), 1), "conv2": random_kernel((5, 5, 2, 2), 2)}
    params = {"conv1": rda_params(rho=0.5), "conv2": rda_params(vx=-1.0)}
    out = RDA().step(ws, 0.0, 0.3, params)
    for name in ws:
        assert tree_allclose(out[name], RDA().step(ws[name], 0.0, 0.3, params[name]))
    init = RDA().init(ws)
    assert jax.tree.structure(init) == jax.tree.structure(params)


@pytest.mark.parametrize("scheme,order", [("euler", 1), ("rk2", 2), ("rk4", 4)])
def test_rda_vector_field_schemes_converge_to_the_exact_step(scheme, order):
    """With σ = identity, eq. 2.6 integrated by RK converges to B.4 at the method's order."""
    w, p = random_kernel(), rda_params()
    exact = IDENTITY.step(w, 0.0, 1.0, p)
    evo = RDA(activation="identity", scheme=scheme)

    def error(steps):
        y = w
        for m in range(steps):
            y = evo.step(y, m / steps, 1.0 / steps, p)
        return float(jnp.max(jnp.abs(y - exact)))

    observed = np.log2(error(16) / error(32))
    assert abs(observed - order) < 0.3


def test_linear_spatial_with_the_rda_matrix_equals_rda_identity():
    w, p = random_kernel(), rda_params()
    matrix = jnp.asarray(dense_rda(5, 5, 0.3, 0.7, -0.4, 0.2))
    out = Linear().step(w, 0.0, 0.4, {"matrix": matrix})
    np.testing.assert_allclose(out, IDENTITY.step(w, 0.0, 0.4, p), atol=1e-11)


def test_linear_elementwise_is_exponential_growth():
    w = random_kernel()
    rate = random_kernel(seed=3)
    out = Linear(mode="elementwise").step(w, 0.0, 0.25, {"rate": rate})
    np.testing.assert_allclose(out, np.exp(0.25 * rate) * w, rtol=1e-13)
    np.testing.assert_allclose(
        Linear(mode="elementwise").vector_field(0.0, w, {"rate": rate}), rate * w
    )


def test_mlp_starts_static_and_steps_by_euler(key):
    w = random_kernel((3, 3, 2, 2))
    evo = MLP(hidden=4)
    p = evo.init(w, key)
    assert tree_allclose(evo.step(w, 0.0, 0.5, p), w)  # W2 = 0 at init
    p = jax.tree.map(lambda x: x + 0.1, p)
    dw = evo.vector_field(0.0, w, p)
    assert dw.shape == w.shape and not np.allclose(dw, 0)
    np.testing.assert_allclose(evo.step(w, 0.0, 0.5, p), w + 0.5 * dw, atol=1e-14)


def test_zero_evolution_keeps_the_weights():
    w = random_kernel()
    assert Zero().step(w, 0.0, 0.5, None) is w
    assert Zero().init(w) is None
    np.testing.assert_array_equal(Zero().vector_field(0.0, w, None), 0.0)


@pytest.mark.parametrize(
    "evo",
    [RDA(), IDENTITY, Linear(), Linear(mode="elementwise"), MLP(hidden=3), Zero()],
    ids=lambda e: repr(e),
)
def test_float32_stays_float32(evo):
    w = random_kernel((3, 3, 2, 2)).astype(jnp.float32)
    p = jax.tree.map(lambda x: x + 0.1, evo.init(w, jax.random.key(0)))
    assert evo.step(w, 0.0, 0.3, p).dtype == jnp.float32
    assert evo.vector_field(0.0, w, p).dtype == jnp.float32


@pytest.mark.parametrize(
    "evo,w,p,message",
    [
        (RDA(), jnp.ones((3, 3, 2)), None, "shape \\(kh, kw, cin, cout\\)"),
        (RDA(), jnp.ones((3, 3, 2, 2)), {"diffusion": 0.0}, "must be a dict with keys"),
        (
            RDA(),
            jnp.ones((3, 3, 2, 2)),
            rda_params() | {"vx": jnp.ones(2)},
            "'vx'.*expected \\(\\)",
        ),
        (RDA(per_channel=True), jnp.ones((3, 3, 2, 4)), rda_params(), "expected \\(4,\\)"),
        (RDA(activation="relu"), jnp.ones((3, 3, 2, 2)), rda_params(), "activation='relu'"),
        (RDA(transform="dft"), jnp.ones((3, 3, 2, 2)), rda_params(), "transform='dft'"),
        (RDA(scheme="rk3"), jnp.ones((3, 3, 2, 2)), rda_params(), "scheme='rk3'"),
        (MLP(scheme="exact"), jnp.ones((3, 3, 2, 2)), None, "no closed-form step"),
        (Linear(), {"a": jnp.ones((3, 3, 1, 1))}, {"b": None}, "one entry per kernel"),
        (Zero(), jnp.ones((3, 3, 1, 1)), rda_params(), "takes no parameters"),
        (RDA(), jnp.ones((3, 3, 1, 1), jnp.int32), rda_params(), "dtype int32"),
    ],
)
def test_bad_kernels_and_parameters_are_named(evo, w, p, message):
    if p is None and not isinstance(evo, (Zero, MLP)):
        p = evo.init(jnp.ones((3, 3, 2, 2)))
    with pytest.raises(ValueError, match=message):
        evo.check(w, p)
