"""pooling: the max pool equals Flax's, value and gradient."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest
from test_models import normal

from anodev2_jax.nn import pooling


def test_max_pool_equals_flax_max_pool_and_its_gradient_without_ties():
    x = normal((2, 8, 8, 3), 3)
    for size in (2, 4, 8):
        flax_pool = lambda x: nn.max_pool(x, (size, size), strides=(size, size))  # noqa: B023
        pool = functools.partial(pooling.max_pool, size=size)
        np.testing.assert_array_equal(pool(x), flax_pool(x))
        cotangent = normal(pool(x).shape, 4)
        grads = [jax.vjp(p, x)[1](cotangent)[0] for p in (pool, flax_pool)]
        np.testing.assert_array_equal(*grads)
    with pytest.raises(ValueError, match="window 3 does not divide the input's 8x8"):
        pooling.max_pool(x, 3)
