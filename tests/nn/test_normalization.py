"""normalization: BatchNorm's closed-form training gradient, its offset, folding of the running
statistics, and the per-evaluation helpers of the ODE blocks (the C++ kernel:
tests/cpu/test_batch_norm.py)."""

from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tree_allclose, tree_relative_error
from jax.test_util import check_grads
from test_models import normal

from anodev2_jax import RDA
from anodev2_jax import solve as solve_lib
from anodev2_jax.nn import blocks, models
from anodev2_jax.nn import normalization as norm_lib


def test_training_batch_norm_gradient_is_autodiff_of_its_formula():
    x = normal((4, 3, 5, 6), 0) * 2.0 + 1.0
    scale, bias = normal((6,), 1), normal((6,), 2)

    def autodiff(x, scale, bias):  # the plain formula, differentiated by JAX
        moments = norm_lib.batch_moments(x)
        inv = scale * jax.lax.rsqrt(moments["var"] + norm_lib.BN_EPSILON)
        channels = lambda v: v.reshape(1, 1, 1, -1)
        return (x - channels(moments["mean"])) * channels(inv) + channels(bias), moments

    def loss(bn):
        def fn(x, scale, bias):
            y, moments = bn(x, scale, bias)
            moment_terms = jnp.sum(moments["mean"] ** 3) + jnp.sum(moments["var"] ** 2)
            return jnp.sum(jnp.sin(y)) + moment_terms

        return fn

    closed_form = lambda x, s, b: norm_lib.batch_norm(x, {"scale": s, "bias": b}, True)
    args = (x, scale, bias)
    assert tree_allclose(closed_form(*args), autodiff(*args), rtol=1e-14)
    for order in (jax.grad, jax.hessian):
        expected = order(loss(autodiff), (0, 1, 2))(*args)
        assert tree_relative_error(order(loss(closed_form), (0, 1, 2))(*args), expected) < 1e-12
    check_grads(loss(closed_form), args, order=2, modes=("rev",))


@pytest.mark.parametrize("impl", ["xla", "cpu"])
def test_batch_norm_offset_equals_normalizing_x_plus_offset(impl):
    """offset= (added to the mean, not to x) against BatchNorm of x + offset: output, moments
    and gradients in training mode, output in eval mode."""
    x = normal((3, 4, 5, 8), 0) + 1.0
    norm = {"scale": normal((8,), 1), "bias": normal((8,), 2)}
    offset = normal((8,), 3)
    running = {**norm, "mean": normal((8,), 4), "var": jnp.exp(normal((8,), 5))}

    def loss(fn):
        def value(x, offset):
            y, moments = fn(x, offset)
            return jnp.sum(jnp.sin(y)) + jnp.sum(moments["mean"] ** 2 + moments["var"] ** 2)

        return value

    folded = lambda x, o: norm_lib.batch_norm(x, norm, True, offset=o, relu=True, impl=impl)
    added = lambda x, o: norm_lib.batch_norm(
        x + o[None, None, None], norm, True, relu=True, impl=impl
    )
    assert tree_relative_error(folded(x, offset), added(x, offset)) < 1e-13
    grads = [jax.grad(loss(fn), (0, 1))(x, offset) for fn in (folded, added)]
    assert tree_relative_error(*grads) < 1e-13
    evals = [
        norm_lib.batch_norm(x, running, False, offset=offset)[0],
        norm_lib.batch_norm(x + offset[None, None, None], running, False)[0],
    ]
    assert tree_relative_error(*evals) < 1e-14


def test_fold_moments_applies_momentum_once_per_row():
    stats = {
        "mean": jnp.array([[1.0, 2.0], [0.0, 0.0]]),
        "var": jnp.array([[3.0, 4.0], [1.0, 1.0]]),
    }
    moments = norm_lib.stack_evaluations(
        [
            {"mean": jnp.array([0.0, 4.0]), "var": jnp.array([1.0, 1.0])},
            {"mean": jnp.array([2.0, 0.0]), "var": jnp.array([3.0, 5.0])},
        ]
    )
    new = norm_lib.fold_moments(stats, moments, momentum=0.75)
    expected = {
        "mean": jnp.array([[0.75, 2.5], [0.5, 0.0]]),
        "var": jnp.array([[2.5, 3.25], [1.5, 2.0]]),
    }
    assert tree_allclose(new, expected, rtol=1e-15)


def test_at_evaluation_takes_row_k_of_per_evaluation_leaves_only():
    norm = {"scale": jnp.ones(3), "bias": jnp.zeros(3), "mean": jnp.arange(6.0).reshape(2, 3)}
    row = norm_lib.at_evaluation(norm, 1)
    assert tree_allclose(
        row, {"scale": jnp.ones(3), "bias": jnp.zeros(3), "mean": jnp.arange(3.0, 6.0)}
    )


def test_interpolation_is_linear_in_time_and_constant_beyond_the_ends():
    old = solve_lib.make_plan(4, 8, "conf1", "rk2")  # times 0, 1/8, 1/4, ..., 7/8
    new = solve_lib.make_plan(5, 10, "conf1", "rk4")  # times k/10 and the stage times
    old_times, _ = norm_lib.evaluation_times(old)
    new_times, _ = norm_lib.evaluation_times(new)
    rows = np.array([[3.0 - 2.0 * float(t), float(t) ** 0] for t in old_times])
    carried = norm_lib.carry_matrix(old, new) @ rows
    for t, (value, one) in zip(new_times, carried, strict=True):
        expected = 3.0 - 2.0 * float(min(t, Fraction(7, 8)))
        assert value == pytest.approx(expected, abs=1e-12) and one == pytest.approx(1.0)


def test_rk4_rows_at_equal_times_are_averaged_where_no_stage_matches():
    old = solve_lib.make_plan(1, 2, "conf1", "rk4")  # stages at 0, 1/2, 1/2, 1
    new = solve_lib.make_plan(2, 2, "conf1", "euler")  # evaluations at 0 and 1/2, stage 0
    weights = norm_lib.carry_matrix(old, new)
    np.testing.assert_array_equal(weights, [[1, 0, 0, 0], [0, 0.5, 0.5, 0]])


def _block_variables(ode, x, stats=None):
    """An ODE block's variables for x, both BatchNorms' running statistics replaced by
    ``stats`` ({"mean", "var"}: (E, C)) where given."""
    block = blocks.ODEBlock(8, "resnet", ode, dtype=x.dtype)
    variables = block.init(jax.random.key(0), x, train=False)
    if stats is not None:
        variables = {**variables, "batch_stats": {"bn1": stats, "bn2": stats}}
    return block, variables


def test_a_block_solved_off_its_rows_grid_reads_and_updates_them_by_interpolation():
    """An ODE block solved at Nz = 4 with its BatchNorm rows on the Nz = 2 grid: in eval mode
    it is the Nz = 4 block with the rows carried by carry_matrix; in training its running
    statistics move by the Nz = 4 block's moments carried back to the two rows."""
    x = normal((2, 6, 6, 8), 0)
    rows = solve_lib.make_plan(2, 2, "conf1", "euler")
    solved = blocks.ODEConfig(num_z_steps=4, norm_plan=rows)
    plain = blocks.ODEConfig(num_z_steps=4)
    stats = {"mean": normal((2, 8), 1), "var": 1.0 + normal((2, 8), 2) ** 2}
    block, variables = _block_variables(solved, x, stats)
    assert variables["batch_stats"]["bn1"]["mean"].shape == (2, 8)
    read = norm_lib.carry_matrix(rows, plain.plan())
    carried = jax.tree.map(lambda rows: read @ rows, stats)
    reference, reference_variables = _block_variables(plain, x, carried)
    reference_variables = {**reference_variables, "params": variables["params"]}
    assert tree_allclose(
        block.apply(variables, x, train=False),
        reference.apply(reference_variables, x, train=False),
        rtol=1e-12,
    )

    zero = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
    _, updates = block.apply({**variables, "batch_stats": zero}, x, train=True, mutable=True)
    zero4 = jax.tree.map(jnp.zeros_like, reference_variables["batch_stats"])
    _, updates4 = reference.apply(
        {**reference_variables, "batch_stats": zero4}, x, train=True, mutable=True
    )
    write = norm_lib.carry_matrix(plain.plan(), rows)
    carried = jax.tree.map(lambda m: write @ m, updates4["batch_stats"])
    assert tree_allclose(updates["batch_stats"], carried, rtol=1e-12)


def test_a_block_on_its_own_rows_grid_is_unchanged():
    x = normal((2, 6, 6, 8), 0)
    ode = blocks.ODEConfig(num_z_steps=3)
    block, variables = _block_variables(
        ode, x, {"mean": normal((3, 8), 1), "var": jnp.ones((3, 8))}
    )
    same = blocks.ODEBlock(
        8, "resnet", blocks.ODEConfig(num_z_steps=3, norm_plan=ode.plan()), dtype=x.dtype
    )
    for train in (False, True):
        ours = same.apply(variables, x, train=train, mutable=["batch_stats"])
        assert tree_allclose(ours, block.apply(variables, x, train=train, mutable=["batch_stats"]))
    with pytest.raises(ValueError, match=r"norm_plan=3 is not a plan; pass another ODEConfig"):
        blocks.ODEConfig(norm_plan=3)


# -- the running statistics fit the trained network ------------------------------------------------
def gratings(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable synthetic images (n, 16, 16, 3) and labels: class c is a noisy grating at
    angle c·π/10 with 2 + c mod 3 periods per 16 pixels, random phase and per-channel gain."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int32)
    angle = labels * (np.pi / 10) + rng.normal(0, 0.05, n)
    wavenumber = 2 * np.pi * (2 + labels % 3) / 16
    y, x = np.mgrid[:16, :16]
    along = np.cos(angle)[:, None, None] * x + np.sin(angle)[:, None, None] * y
    phase = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    grating = np.sin(wavenumber[:, None, None] * along + phase)
    gain = rng.uniform(0.5, 1.5, (n, 1, 1, 3))
    return (grating[..., None] * gain + rng.normal(0, 1.5, (n, 16, 16, 3))).astype(
        np.float32
    ), labels


class SmallODENet(nn.Module):
    """Stem ConvBN 3→8, one ResNet ODE block, global mean pool, fc 8→10."""

    ode: blocks.ODEConfig

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = models.ConvBN(8, 3, padding=1, name="stem")(x, train)
        x = blocks.ODEBlock(8, "resnet", self.ode, name="block")(x, train)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "ode",
    [
        blocks.ODEConfig(num_z_steps=2),  # ANODE's block
        blocks.ODEConfig(num_z_steps=3, evolution=RDA()),  # ANODEV2 conf1's, Nz = Nw = 3
    ],
    ids=["anode", "anodev2"],
)
def test_eval_mode_accuracy_matches_batch_statistics_after_training(ode):
    """200 SGD steps on the gratings, then test accuracy in eval mode (running statistics)
    and with BatchNorm on batch statistics (random 256-image batches): within 2 points.

    With one set of running statistics shared by the block's evaluations (the layout before
    per-evaluation statistics) the same test scored 78.3 % against 99.4 % (anode) and 77.1 %
    against 99.5 % (anodev2): it fails there."""
    train_x, train_y = gratings(4096, 1)
    test_x, test_y = gratings(1024, 2)
    model = SmallODENet(ode)
    variables = model.init(jax.random.key(0), train_x[:2], train=False)
    optimizer = optax.sgd(optax.piecewise_constant_schedule(0.1, {160: 0.1}), momentum=0.9)

    @jax.jit
    def step(params, stats, opt_state, x, y):
        def loss(params):
            variables = {"params": params, "batch_stats": stats}
            logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
            cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return cross_entropy.mean(), updates["batch_stats"]

        (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state

    params, stats = variables["params"], variables["batch_stats"]
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(0)
    for _ in range(200):
        rows = rng.choice(len(train_y), 64, replace=False)
        params, stats, opt_state = step(params, stats, opt_state, train_x[rows], train_y[rows])

    trained = {"params": params, "batch_stats": stats}
    eval_accuracy = np.mean(np.argmax(model.apply(trained, test_x, train=False), -1) == test_y)
    batch_accuracies = []
    for rows in np.array_split(rng.permutation(len(test_y)), 4):
        logits, _ = model.apply(trained, test_x[rows], train=True, mutable=["batch_stats"])
        batch_accuracies.append(np.mean(np.argmax(logits, -1) == test_y[rows]))
    batch_accuracy = float(np.mean(batch_accuracies))
    assert batch_accuracy > 0.9  # learned, so that the comparison means something
    assert eval_accuracy >= batch_accuracy - 0.02, (eval_accuracy, batch_accuracy)
