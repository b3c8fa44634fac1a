"""Explicit Runge-Kutta steps on pytrees: orders of accuracy and the stage form."""

import jax.numpy as jnp
import numpy as np
import pytest

from anodev2_jax import stepping


def field(t, y, args):
    """dy/dt for a pytree state: a linear rotation plus a time-dependent forcing."""
    return {"u": args * y["v"] + jnp.cos(t), "v": -args * y["u"]}


def solve(step, steps):
    y = {"u": jnp.asarray(1.0), "v": jnp.asarray(0.5)}
    for n in range(steps):
        y = step(field, y, n / steps, 1.0 / steps, 2.0)
    return y


@pytest.mark.parametrize("method,order", [("euler", 1), ("rk2", 2), ("rk4", 4)])
def test_methods_converge_at_their_order(method, order):
    step = stepping.STEPS[method]
    reference = solve(stepping.rk4, 2048)

    def error(steps):
        y = solve(step, steps)
        return max(float(abs(y[k] - reference[k])) for k in y)

    assert abs(np.log2(error(20) / error(40)) - order) < 0.25


def test_stage_fields_see_their_stage_times():
    """rk_step calls stage i's field at y_i; the public steps pass t + c_i·dt."""
    seen = []

    def f(t, y, args):
        seen.append(t)
        return y

    stepping.rk4(f, jnp.ones(2), 1.0, 0.5)
    assert seen == [1.0, 1.25, 1.25, 1.5]


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="method='rk3' is unknown"):
        stepping.check_method("rk3")
