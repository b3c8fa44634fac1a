"""A trained run evaluated at other step counts, methods and weight grids: is it an ODE?

A neural ODE is an ODE only if its accuracy survives a change of discretization: with more
steps or a higher-order method it should converge to the same function, with fewer degrade
gracefully. :func:`evaluate_run` evaluates the last checkpoint of a run (every seed) with its
ODE blocks solved at another :class:`Setting` (Nz, Nw, method) on the test set.

The ODE blocks keep BatchNorm running statistics per f evaluation, evaluation k (z-step n,
stage i) sitting at time t_k = (n + c_i)/Nz. At another setting the evaluations sit at other
times, so the statistics are carried there (``bn_statistics``):

- ``"interpolate"``: each new evaluation takes the trained row of the evaluation at the same
  time and stage where there is one (so at the training setting, the trained statistics
  exactly), else the linear interpolation in t of the trained rows (rows at equal times
  averaged; constant beyond the first and last). The same for BatchNorm scale and offset when
  they are per evaluation.
- ``"recalibrate"``: every running statistic of the network (the ODE blocks' and the other
  layers') is recomputed with the new setting, as the mean of the batch moments of
  ``recalibration_batches`` training batches (augmented as in training, the run's data order).

The weight trajectory is a discretization too: at another Nw the RDA steps (with the
activation after each) give other θ_j. ``conf1`` ties Nw to Nz (Nw = Nz, or 2·Nz where an
RK method's stages need θ at half steps); ``conf2`` applies θ(0) on [0, 1/2) and θ(1) after,
so Nz and Nw vary apart (Euler only: its stages cannot read past θ(1)).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from anodev2_jax import solve as solve_lib
from anodev2_jax.nn import normalization as norm_lib
from anodev2_jax.training import checkpoints as checkpoints_lib
from anodev2_jax.training import data as data_lib
from anodev2_jax.training import evaluation, parallel
from anodev2_jax.training import seeds as seeds_lib
from anodev2_jax.training.config import (
    Setting,
    data_seed,
    make_optimizer,
    model_from_config,
    ode_overrides,
    run_config,
    seeds_of,
)
from anodev2_jax.training.steps import TrainState, create_state, make_eval_step, over_run

PyTree = Any
BN_STATISTICS = ("interpolate", "recalibrate")
_PER_EVALUATION = ("mean", "var", "scale", "bias")  # BatchNorm leaves that may be (E, C)


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A run's config, its last checkpoint (every seed) and its data, loaded once."""

    workdir: Path
    config: ml_collections.ConfigDict
    state: TrainState
    dataset: data_lib.CIFAR10
    mesh: jax.sharding.Mesh
    # By setting (sorted ODE overrides), built once whatever the statistics handling: the
    # eval step (one compile) and the FLOPs per image (one more).
    eval_steps: dict[tuple[Any, ...], Any] = dataclasses.field(default_factory=dict, repr=False)
    flops: dict[tuple[Any, ...], float] = dataclasses.field(default_factory=dict, repr=False)

    @functools.cached_property
    def plan(self) -> solve_lib.Plan | None:
        """The trained ODE blocks' plan; None for the baseline."""
        ode = model_from_config(self.config).ode
        return None if ode is None else ode.plan()


def load_run(workdir: str | Path, data_source: str | None = None) -> TrainedRun:
    """The last checkpoint of the run in ``workdir`` and its dataset (``data_source``: another
    copy of CIFAR-10 than the run's, e.g. "lossless"); ValueError naming the fix if it has
    none."""
    workdir = Path(workdir)
    config = run_config(workdir)
    if data_source is not None:
        if data_source not in data_lib.SOURCES:
            raise ValueError(
                f"data_source={data_source!r} is unknown; use one of {data_lib.SOURCES}"
            )
        config = copy.deepcopy(config)
        config.data_source = data_source
    mesh = parallel.make_mesh()
    state = checkpoints_lib.restore_run(workdir, config, parallel.replicated(mesh))
    sizes = {k: config[k] for k in ("num_train", "num_test") if config.get(k) is not None}
    dataset = data_lib.load_cifar10(
        config.data_source, data_dir=config.get("data_dir"), seed=data_seed(config), **sizes
    )
    return TrainedRun(workdir, config, state, dataset, mesh)


def carry_statistics(
    tree: PyTree, old: solve_lib.Plan, new: solve_lib.Plan, seed_axis: bool
) -> PyTree:
    """``tree`` (params or batch_stats) with every per-evaluation BatchNorm leaf ((E_old, C),
    or (k, E_old, C) with a seed axis) carried to ``new``'s evaluations by
    :func:`anodev2_jax.nn.normalization.carry_matrix`; other leaves
    unchanged. The identity at the training plan."""
    if old == new:
        return tree
    weights = norm_lib.carry_matrix(old, new)

    def carry(path: Any, leaf: jax.Array) -> jax.Array:
        name = getattr(path[-1], "key", None)
        if name not in _PER_EVALUATION or leaf.ndim != 2 + seed_axis:
            return leaf
        return jnp.einsum("ne,...ec->...nc", jnp.asarray(weights, leaf.dtype), leaf)

    return jax.tree_util.tree_map_with_path(carry, tree)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """A run's test accuracy and loss per seed at one setting and statistics handling.

    flops_per_image: XLA's FLOP count of the eval step (compiled with XLA's convolution, which
    it can count) over its batch size: the cost of one image's forward pass at this setting.
    """

    seeds: list[int]
    accuracy: list[float]
    loss: list[float]
    num_z_steps: int | None
    num_w_steps: int | None
    method: str | None
    bn_statistics: str
    flops_per_image: float


def _moments_step(model: Any, dtype: Any) -> Any:
    """(state, images) -> the batch moments every BatchNorm of ``model`` sees in training mode
    (its running statistics updated once from zero, divided by the update's weight)."""

    def step(state: TrainState, images: jax.Array) -> PyTree:
        zero = jax.tree.map(jnp.zeros_like, state.batch_stats)
        inputs = data_lib.normalize(images).astype(dtype)
        variables = {"params": state.params, "batch_stats": zero}
        _, updates = model.apply(variables, inputs, train=True, mutable=["batch_stats"])
        return jax.tree.map(lambda s: s / (1 - norm_lib.BN_MOMENTUM), updates["batch_stats"])

    return step


def recalibration_order(run: TrainedRun, num_batches: int) -> np.ndarray:
    """The rows of the first ``num_batches`` training batches of the run's first epoch;
    ValueError naming the fix when the training set has fewer."""
    config = run.config
    order = data_lib.epoch_batches(
        len(run.dataset.train_images), config.batch_size, data_seed(config), 0
    )
    if not 1 <= num_batches <= len(order):
        raise ValueError(
            f"recalibration_batches={num_batches}: the training set has {len(order)} batches "
            f"of {config.batch_size}; use 1 … {len(order)}"
        )
    return order[:num_batches]


def recalibrate(run: TrainedRun, model: Any, state: TrainState, num_batches: int) -> PyTree:
    """Every running statistic of ``model``, recomputed as the mean batch moments of the
    first ``num_batches`` training batches of the run's first epoch (augmented as in
    training, one fixed key per batch)."""
    config = run.config
    images = run.dataset.train_images
    order = recalibration_order(run, num_batches)
    step = over_run(_moments_step(model, jnp.dtype(config.dtype)), config, run.mesh, 1)
    local = parallel.process_slice(config.batch_size)
    total: PyTree = None
    for i, rows in enumerate(order):
        batch = data_lib.augment(jax.random.key(i), jnp.asarray(images[rows[local]]))
        moments = jax.device_get(step(state, parallel.global_batch(np.asarray(batch), run.mesh)))
        moments = jax.tree.map(lambda m: np.asarray(m, np.float64), moments)
        total = moments if total is None else jax.tree.map(np.add, total, moments)
    mean = jax.tree.map(lambda t, s: (t / num_batches).astype(s.dtype), total, state.batch_stats)
    return parallel.replicate(mean, run.mesh)


def flops_per_image(run: TrainedRun, overrides: dict[str, Any]) -> float:
    """XLA's FLOPs of one seed's eval step per image at the setting of ``overrides``
    (compiled once per setting and run)."""
    key = tuple(sorted(overrides.items()))
    if key not in run.flops:
        run.flops[key] = _count_flops(run, overrides)
    return run.flops[key]


def _count_flops(run: TrainedRun, overrides: dict[str, Any]) -> float:
    config = copy.deepcopy(run.config)
    config.conv_impl = "xla"
    config.num_seeds = 1
    model = model_from_config(config, **overrides)
    optimizer = make_optimizer(config, steps_per_epoch=1)
    state = jax.eval_shape(lambda: create_state(model, optimizer, config))
    batch = config.eval_batch_size
    images = jax.ShapeDtypeStruct((batch, *data_lib.IMAGE_SHAPE), jnp.uint8)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch,), jnp.bool_)
    step = jax.jit(make_eval_step(model, jnp.dtype(config.dtype)))
    cost = step.lower(state, images, labels, mask).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    if not cost or "flops" not in cost:
        raise RuntimeError("XLA gave no cost analysis of the eval step on this backend")
    return float(cost["flops"]) / batch


def evaluate_setting(
    run: TrainedRun,
    setting: Setting = Setting(),
    bn_statistics: str = "interpolate",
    recalibration_batches: int = 50,
) -> Evaluation:
    """The test accuracy and loss of every seed of ``run`` at ``setting``, the BatchNorm
    statistics carried there by ``bn_statistics`` (one of BN_STATISTICS)."""
    if bn_statistics not in BN_STATISTICS:
        raise ValueError(f"bn_statistics={bn_statistics!r} is unknown; use one of {BN_STATISTICS}")
    config = run.config
    overrides = ode_overrides(config, setting)
    if bn_statistics == "recalibrate":
        recalibration_order(run, recalibration_batches)
    model = model_from_config(config, **overrides)
    state = run.state
    trained, new = run.plan, model.ode and model.ode.plan()
    if trained is not None and new is not None:
        seed_axis = config.num_seeds > 1
        carried = {
            name: carry_statistics(getattr(state, name), trained, new, seed_axis)
            for name in ("params", "batch_stats")
        }
        state = state.replace(**carried)
    if bn_statistics == "recalibrate":
        state = state.replace(batch_stats=recalibrate(run, model, state, recalibration_batches))
    key = tuple(sorted(overrides.items()))
    if key not in run.eval_steps:
        step = make_eval_step(model, jnp.dtype(config.dtype))
        run.eval_steps[key] = over_run(step, config, run.mesh, 3)
    metrics = seeds_lib.per_seed(
        evaluation.evaluate(
            run.eval_steps[key],
            state,
            run.dataset.test_images,
            run.dataset.test_labels,
            config.eval_batch_size,
            run.mesh,
        ),
        config.num_seeds,
    )
    return Evaluation(
        seeds=seeds_of(config),
        accuracy=[m["accuracy"] for m in metrics],
        loss=[m["loss"] for m in metrics],
        num_z_steps=overrides.get("num_z_steps"),
        num_w_steps=overrides.get("num_w_steps"),
        method=overrides.get("method"),
        bn_statistics=bn_statistics,
        flops_per_image=flops_per_image(run, overrides),
    )


def evaluate_run(
    workdir: str | Path,
    setting: Setting = Setting(),
    bn_statistics: str = "interpolate",
    *,
    data_source: str | None = None,
    recalibration_batches: int = 50,
) -> Evaluation:
    """Evaluate the last checkpoint of the run in ``workdir`` at ``setting`` (for a notebook;
    see :func:`evaluate_setting`). With the defaults it reproduces the run's recorded final
    test accuracy and loss."""
    run = load_run(workdir, data_source)
    return evaluate_setting(run, setting, bn_statistics, recalibration_batches)
