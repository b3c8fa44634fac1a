"""The gradient-verification suite on whole models: ResNet-4 anodev2 conf1 and conf2 with their
softmax cross-entropy loss, BatchNorm in training mode, float64.

DTO equals backprop; the KKT recursion on the ODE block, fed the cotangent of the rest of the
network, reproduces jax.grad of the whole loss; central differences and check_grads agree.
Everything runs eagerly on a batch of 4 images, so each primitive shape compiles once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tree_relative_error
from jax.test_util import check_grads
from test_models import random_variables

from anodev2_jax import coupled_solve, training
from anodev2_jax.kkt import kkt_gradients
from anodev2_jax.nn import blocks, models
from anodev2_jax.nn import normalization as norm_lib

pytestmark = pytest.mark.gradients

F64 = jnp.float64
VARIANTS = ("anodev2_conf1", "anodev2_conf2")


@functools.cache
def problem(variant: str, gradient: str = "dto", norm_params: str = "shared") -> dict:
    """The model, its random variables, a batch of 4 images and labels, and its loss J(params)."""
    model = models.create_model(
        "resnet4", variant, dtype=F64, gradient=gradient, norm_params=norm_params
    )
    # RDA parameters, BatchNorm scales and offsets away from their init (see random_variables).
    variables = random_variables(model, 2)
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((4, 32, 32, 3)), F64)
    labels = jnp.asarray(rng.integers(0, models.NUM_CLASSES, 4))

    def loss(params):
        """Mean cross-entropy in training mode (batch statistics; running ones discarded)."""
        variables_ = {**variables, "params": params}
        logits, _ = model.apply(variables_, x, train=True, mutable=["batch_stats"])
        return jnp.mean(training.cross_entropy(logits, labels))

    return dict(model=model, params=variables["params"], x=x, loss=loss)


@functools.cache
def model_gradient(variant: str, gradient: str = "dto", norm_params: str = "shared") -> dict:
    p = problem(variant, gradient, norm_params)
    return jax.grad(p["loss"])(p["params"])


def cut_at_block(loss):
    """The loss as J(params, z1) with the ODE block's output replaced by its final ReLU(z1),
    returned together with the block's input z0(params)."""

    def split(params, z1):
        with blocks.ode_block_replaced(z1) as block_inputs:
            value = loss(params)
        return value, block_inputs[0]

    return split


def tree_add(*trees):
    return jax.tree.map(lambda *xs: sum(xs), *trees)


# -- DTO is the exact gradient of the discrete model -----------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_dto_gradient_of_the_model_loss_equals_backprop(variant):
    dto, backprop = model_gradient(variant, "dto"), model_gradient(variant, "backprop")
    assert tree_relative_error(dto, backprop) <= 1e-12
    assert all(float(jnp.max(jnp.abs(g))) > 1e-8 for g in jax.tree.leaves(dto))


# -- the KKT recursion on the block, with the stem's and head's VJPs, is jax.grad ------------------
@pytest.mark.parametrize(
    "variant, norm_params",
    [*((v, "shared") for v in VARIANTS), ("anodev2_conf2", "per_evaluation")],
)
def test_kkt_recursion_on_the_block_gives_the_model_gradient(variant, norm_params):
    p = problem(variant, norm_params=norm_params)
    model, params, loss = p["model"], p["params"], p["loss"]
    block, ode = params["layer1_1"], model.ode

    def f(z, theta, norms, k):
        """The block's field at evaluation k (per-evaluation scale and offset: row k)."""
        norms = {name: norm_lib.at_evaluation(norm, k) for name, norm in norms.items()}
        return blocks.resnet_field(z, theta, norms, train=True, conv_impl=model.conv_impl)

    solve_kwargs = dict(
        evolution=ode.evolution,
        num_z_steps=ode.num_z_steps,
        num_w_steps=ode.num_w_steps,
        schedule=ode.schedule,
        method=ode.method,
        has_aux=True,
        indexed=True,
    )
    norms = {name: block[name] for name in ("bn1", "bn2")}

    split = cut_at_block(loss)
    # The stem only (the block's output is replaced, by zeros here): z0 = ReLU(BN(conv(x))).
    block_shape = (*p["x"].shape[:-1], block["w0"]["conv1"].shape[-1])  # (4, 32, 32, 16)
    _, z0 = split(params, jnp.zeros(block_shape, F64))
    z1, _ = coupled_solve(f, z0, block["w0"], block["p"], norms, **solve_kwargs)
    (value, _), split_vjp = jax.vjp(split, params, z1)
    assert abs(float(value - loss(params))) <= 1e-13 * abs(float(value))

    # ∂J/∂z1 from the head (ReLU, pool, fc, loss); the recursion turns it into ∂J/∂z0 and the
    # block's gradients; the stem's VJP turns ∂J/∂z0 into the stem's gradients.
    head_grads, ct_z1 = split_vjp((jnp.ones_like(value), jnp.zeros_like(z0)))
    result = kkt_gradients(f, z0, block["w0"], block["p"], norms, ct_z1, **solve_kwargs)
    stem_grads, _ = split_vjp((jnp.zeros_like(value), result.grad_z0))
    block_grads = {"w0": result.grad_w0, "p": result.grad_p, **result.grad_args}
    # each part reaches its own layers only (the replaced block reads none of its parameters)
    for grads, others in ((head_grads, ("conv1", "layer1_1")), (stem_grads, ("fc", "layer1_1"))):
        assert not any(jnp.any(g != 0) for name in others for g in jax.tree.leaves(grads[name]))

    got = tree_add(head_grads, stem_grads) | {"layer1_1": block_grads}
    expected = model_gradient(variant, norm_params=norm_params)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    assert tree_relative_error(got, expected) <= 1e-12


# -- central differences and check_grads on the whole loss -----------------------------------------
def unit_direction(tree, seed):
    """A random direction of norm 1 in the space of ``tree``."""
    rng = np.random.default_rng(seed)
    direction = jax.tree.map(lambda x: rng.standard_normal(x.shape), tree)
    norm = np.sqrt(sum(np.sum(v**2) for v in jax.tree.leaves(direction)))
    return jax.tree.map(lambda v: jnp.asarray(v / norm, F64), direction)


def tree_dot(x, y) -> float:
    return float(
        sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True))
    )


# The loss is only piecewise smooth: a ReLU or max-pool kink within ±eps of the point bends the
# difference quotient (at eps = 1e-5 along unit directions, by up to 1e-3 relative, measured).
# The chance of one falls with eps, and float64 rounding stays at ~1e-9 relative at eps = 1e-6.
EPS = 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_gradient_matches_central_differences(variant):
    p = problem(variant)
    params, loss = p["params"], p["loss"]
    grads = model_gradient(variant)
    for seed in range(3):
        direction = unit_direction(params, seed)
        plus, minus = (
            loss(jax.tree.map(lambda x, v, s=step: x + s * v, params, direction))
            for step in (EPS, -EPS)
        )
        finite_difference = float(plus - minus) / (2 * EPS)
        directional = tree_dot(grads, direction)
        assert abs(finite_difference - directional) <= 1e-6 * abs(directional), seed


@pytest.mark.parametrize("variant", VARIANTS)
def test_check_grads_of_the_dto_model_to_second_order(variant):
    """Reverse mode only: DTO is a custom_vjp (order 2 is reverse-over-reverse)."""
    p = problem(variant)
    # check_grads draws a standard normal tangent, of norm ~sqrt(#params) ≈ 90 here: a step of
    # 1e-8 moves the parameters by ~EPS, for the reason above.
    check_grads(p["loss"], (p["params"],), order=2, modes=("rev",), eps=1e-8)
