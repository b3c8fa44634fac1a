"""max_pool: oneDNN's max pool and its gradient equal XLA's, but where a window's maximum ties."""

import jax
import jax.numpy as jnp
import numpy as np

from anodev2_jax.cpu import onednn
from anodev2_jax.nn import pooling


def normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def pool_grads(x, g, size, impl):
    """The pool, its dx for cotangent g, and the gradient of a function of that dx."""

    def penalty(x):
        _, vjp = jax.vjp(lambda x: pooling.max_pool(x, size, impl) ** 2, x)
        return jnp.sum(jnp.sin(vjp(g)[0]))

    y, vjp = jax.vjp(lambda x: pooling.max_pool(x, size, impl), x)
    return y, vjp(g)[0], jax.grad(penalty)(x)


def test_max_pool_cpu_equals_xla_to_second_order():
    """impl="cpu" (oneDNN) equals XLA's pool, first and second derivative to the last bit, in
    windows of 2 and 8 without ties."""
    assert onednn.available(), "oneDNN's calls did not build; see the warning"
    x = normal((3, 16, 16, 20), 5)
    for size in (2, 8):
        g = normal((3, 16 // size, 16 // size, 20), 6)
        cpu = jax.jit(lambda x, g, size=size: pool_grads(x, g, size, "cpu"))
        assert "anodev2_onednn_max_pool_grad" in str(jax.make_jaxpr(cpu)(x, g))
        for ours, theirs in zip(cpu(x, g), pool_grads(x, g, size, "xla"), strict=True):
            np.testing.assert_array_equal(ours, theirs)


def test_max_pool_cpu_ties_go_to_one_element():
    """Where a window's maximum ties (a copied value; ReLU zeros), oneDNN gives the window's
    gradient to one tied element where XLA shares it: the window sums agree, and the input
    gradient through a ReLU before the pool (as in the models) equals XLA's exactly."""
    assert onednn.available(), "oneDNN's calls did not build; see the warning"
    tied = jnp.array([[0.5, 0.5], [0.1, -0.2]], jnp.float32)  # the maximum in row 0, twice
    x = normal((3, 16, 16, 20), 5).at[0, :2, :2, 0].set(tied)
    x = x.at[1, :2, :2, 3].set(-1.0)  # a window of ReLU zeros
    g = normal((3, 8, 8, 20), 6)
    dx = {
        impl: jax.vjp(lambda x, impl=impl: pooling.max_pool(x, 2, impl), x)[1](g)[0]
        for impl in ("cpu", "xla")
    }
    window_sums = {impl: d.reshape(3, 8, 2, 8, 2, 20).sum((2, 4)) for impl, d in dx.items()}
    np.testing.assert_allclose(window_sums["cpu"], window_sums["xla"], rtol=1e-6)
    assert sorted(np.asarray(dx["cpu"][0, :2, :2, 0]).ravel().tolist()).count(0.0) == 3
    np.testing.assert_array_equal(dx["xla"][0, 0, :2, 0], g[0, 0, 0, 0] / 2)

    def relu_pool(x, impl):
        return jax.vjp(lambda x: pooling.max_pool(jax.nn.relu(x), 2, impl), x)[1](g)[0]

    np.testing.assert_array_equal(
        relu_pool(x.at[0, 0, 1, 0].set(0.4), "cpu"), relu_pool(x.at[0, 0, 1, 0].set(0.4), "xla")
    )
