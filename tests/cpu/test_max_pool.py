"""max_pool: the C++ gradient of the max pool equals XLA's derivative."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anodev2_jax.cpu import native
from anodev2_jax.nn import pooling


def normal(shape, seed, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_max_pool_cpu_gradient_equals_xla_with_ties(dtype):
    """impl="cpu" (the C++ gradient) equals XLA's derivative, first and second order, where
    ReLU zeros and a copied value tie in windows of 2 and 8."""
    assert native.available(), "the C++ kernels did not build; see the warning"
    x = jnp.maximum(normal((3, 16, 16, 20), 5), 0).astype(dtype)
    x = x.at[0, 0, 1, 0].set(x[0, 0, 0, 0])
    for size in (2, 8):
        g = normal((3, 16 // size, 16 // size, 20), 6).astype(dtype)

        def grads(impl, size=size, g=g):
            def penalty(x):
                _, vjp = jax.vjp(lambda x: pooling.max_pool(x, size, impl) ** 2, x)
                return jnp.sum(jnp.sin(vjp(g)[0]))

            dx = jax.vjp(lambda x: pooling.max_pool(x, size, impl), x)[1](g)[0]
            return dx, jax.grad(penalty)(x)

        cpu, xla = grads("cpu"), grads("xla")
        jaxpr = str(jax.make_jaxpr(lambda x, size=size: grads("cpu", size))(x))
        assert "anodev2_max_pool_grad" in jaxpr
        for ours, theirs in zip(cpu, xla, strict=True):
            np.testing.assert_array_equal(ours, theirs)
