"""batch_norm: the C++ BatchNorm (and ReLU) equals the jnp formula, to second order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tree_relative_error

from anodev2_jax.cpu import native
from anodev2_jax.nn import normalization as norm_lib


def normal(shape, seed, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_cpu_batch_norm_equals_the_formula_to_second_order(dtype, relu):
    """impl="cpu" (csrc/batch_norm.cc) against impl="xla": output, moments, gradient and a
    Hessian-vector product, float64 ≤ 1e-12, float32 ≤ 1e-5; 20 channels (a vector and a
    tail), a mean 30 standard deviations from zero."""
    assert native.available(), "the C++ kernels did not build; see the warning"
    x = (normal((3, 4, 5, 20), 0) * 0.1 + 3.0).astype(dtype)
    scale, bias = normal((20,), 1).astype(dtype), normal((20,), 2).astype(dtype)
    v = normal(x.shape, 3).astype(dtype)
    weights = jnp.cos(jnp.arange(x.size, dtype=dtype)).reshape(x.shape)

    def run(impl):
        def bn(x, scale, bias):
            norm = {"scale": scale, "bias": bias}
            return norm_lib.batch_norm(x, norm, True, relu=relu, impl=impl)

        def loss(x, scale, bias):
            y, moments = bn(x, scale, bias)
            return jnp.sum(weights * y**2) + jnp.sum(jnp.sin(moments["mean"]) + moments["var"] ** 2)

        hvp = jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x, scale, bias), v))
        return jax.jit(lambda *a: (bn(*a), jax.grad(loss, (0, 1, 2))(*a), hvp(a[0])))

    cpu, xla = run("cpu"), run("xla")
    assert "anodev2_batch_norm_grad" in str(jax.make_jaxpr(cpu)(x, scale, bias))
    tol = 1e-12 if dtype == jnp.float64 else 1e-5
    for ours, theirs in zip(cpu(x, scale, bias), xla(x, scale, bias), strict=True):
        assert tree_relative_error(ours, theirs) < tol


def test_cpu_batch_norm_relu_keeps_nan():
    """A NaN input stays NaN through the fused ReLU (as through jax.nn.relu), so that the
    training loop's NaN guard sees it."""
    assert native.available(), "the C++ kernels did not build; see the warning"
    x = normal((2, 2, 2, 16), 0).astype(jnp.float32).at[0, 0, 0, 3].set(jnp.nan)
    norm = {"scale": jnp.ones(16, jnp.float32), "bias": jnp.zeros(16, jnp.float32)}
    bn = lambda x: norm_lib.batch_norm(x, norm, True, relu=True, impl="cpu")
    assert "anodev2_batch_norm" in str(jax.make_jaxpr(bn)(x))
    y, moments = bn(x)
    assert np.isnan(y[..., 3]).all() and np.isnan(moments["mean"][3])
    assert not np.isnan(np.delete(np.asarray(y), 3, axis=-1)).any()
