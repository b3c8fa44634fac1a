"""The train and eval steps of a run, wrapped for its seeds and devices in one place.

A step is a pure function of a :class:`TrainState` and a batch. :func:`build_steps` wraps
each once: over the run's seeds (:func:`anodev2_jax.training.seeds.over_seeds`, a leading
seed axis on every leaf of the state) and data-parallel over the device mesh
(:func:`anodev2_jax.training.parallel.jit_data_parallel`), and compiles the train step,
resolving ``gradient="auto"`` per ODE block (:func:`anodev2_jax.gradients.choose`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from anodev2_jax import gradients as gradients_lib
from anodev2_jax.nn import blocks as blocks_lib
from anodev2_jax.nn import models
from anodev2_jax.training import data as data_lib
from anodev2_jax.training import parallel
from anodev2_jax.training import seeds as seeds_lib
from anodev2_jax.training.config import seeds_of, train_draws

PyTree = Any


class TrainState(struct.PyTreeNode):
    """Everything a resumed run needs: the data order and augmentation follow from step.

    With ``config.num_seeds = k > 1`` every leaf has a leading seed axis of size k
    (:mod:`anodev2_jax.training.seeds`); use :func:`state_step` for the step.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    key: jax.Array  # raw uint32 PRNG key data, so orbax can store it


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy, (B, 10) logits and (B,) int labels -> (B,)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def step_key(state: TrainState) -> jax.Array:
    """The PRNG key of the train step at ``state.step`` (augmentation; a drawn step count)."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)


def loss_and_gradient(
    model: Any, state: TrainState, images: jax.Array, labels: jax.Array, dtype: Any
) -> tuple[tuple[jax.Array, tuple[jax.Array, PyTree]], PyTree]:
    """((loss, (logits, new batch_stats)), ∂loss/∂params) of the train step at ``state`` on a
    (B, 32, 32, 3) uint8 batch, augmented on the device with the step's key."""
    inputs = data_lib.normalize(data_lib.augment(step_key(state), images)).astype(dtype)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, updates = model.apply(variables, inputs, train=True, mutable=["batch_stats"])
        return jnp.mean(cross_entropy(logits, labels)), (logits, updates["batch_stats"])

    return jax.value_and_grad(loss_fn, has_aux=True)(state.params)


def make_train_step(
    model: Any,
    optimizer: optax.GradientTransformation,
    dtype: Any,
    draws: Sequence[Mapping[str, Any]] = (),
) -> Callable:
    """``(state, images, labels) -> (state, metrics)``: one SGD step of ``model``.

    draws: ODEConfig overrides (:func:`anodev2_jax.training.config.train_draws`); each step
    then solves the ODE blocks with one of them, drawn uniformly from the step's key, their
    BatchNorm rows staying on ``model``'s grid (``ODEConfig.norm_plan``), and the metrics
    hold the drawn ``num_z_steps``. One branch per draw is compiled (``lax.switch``; under
    vmapped seeds every branch runs).
    """
    solved = [
        model.clone(ode=dataclasses.replace(model.ode, **draw, norm_plan=model.ode.plan()))
        for draw in draws
    ]

    def train_step(state: TrainState, images: jax.Array, labels: jax.Array):
        """One SGD step on a (B, 32, 32, 3) uint8 batch, augmented on device."""
        if solved:
            index = jax.random.randint(jax.random.fold_in(step_key(state), 1), (), 0, len(solved))
            branches = [
                lambda m=m: loss_and_gradient(m, state, images, labels, dtype) for m in solved
            ]
            (loss, (logits, batch_stats)), grads = jax.lax.switch(index, branches)
        else:
            (loss, (logits, batch_stats)), grads = loss_and_gradient(
                model, state, images, labels, dtype
            )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "grad_norm": optax.tree.norm(grads),
        }
        if solved:
            steps = jnp.asarray([m.ode.num_z_steps for m in solved], jnp.float32)
            metrics["num_z_steps"] = steps[index]
        return new_state, metrics

    return train_step


def make_eval_step(model: Any, dtype: Any, batch_statistics: bool = False) -> Callable:
    """The eval step; with ``batch_statistics``, BatchNorm normalizes with the moments of
    the evaluated batch (training mode, updates discarded) instead of the running ones: a
    check of the running statistics, meaningful on batches in random class order."""

    def eval_step(state: TrainState, images: jax.Array, labels: jax.Array, mask: jax.Array):
        """Summed loss and correct count over the rows where ``mask`` is true."""
        inputs = data_lib.normalize(images).astype(dtype)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        if batch_statistics:
            logits, _ = model.apply(variables, inputs, train=True, mutable=["batch_stats"])
        else:
            logits = model.apply(variables, inputs, train=False)
        loss = jnp.sum(jnp.where(mask, cross_entropy(logits, labels), 0.0))
        correct = jnp.sum(jnp.where(mask, jnp.argmax(logits, -1) == labels, False))
        return {"loss": loss, "correct": correct, "count": jnp.sum(mask)}

    return eval_step


def create_state(model: Any, optimizer: optax.GradientTransformation, config) -> TrainState:
    """The initial state of seed ``config.seed``; with ``num_seeds = k`` > 1, the initial
    states of the k seeds of :func:`seeds_of`, stacked on a leading seed axis."""
    states = [_initial_state(model, optimizer, seed, config.dtype) for seed in seeds_of(config)]
    return states[0] if len(states) == 1 else seeds_lib.stack(states)


def _initial_state(
    model: Any, optimizer: optax.GradientTransformation, seed: int, dtype: str
) -> TrainState:
    init_key, train_key = jax.random.split(jax.random.key(seed))
    dummy = jnp.zeros((1, 32, 32, 3), jnp.dtype(dtype))
    variables = model.init(init_key, dummy, train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.asarray(0, jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=optimizer.init(params),
        key=jax.random.key_data(train_key),
    )


def state_step(state: TrainState) -> int:
    """The number of steps taken (the same for every seed of a state with a seed axis)."""
    return int(np.asarray(state.step).reshape(-1)[0])


def over_run(
    step: Callable,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    num_batch_args: int,
    *,
    donate_state: bool = False,
) -> jax.stages.Wrapped:
    """``step(state, *batch)`` over the run's seeds, jitted data-parallel over ``mesh``: the
    one wrapping every step of a run gets (``num_batch_args`` batch arguments split over
    the devices; the state, with a seed axis when ``config.num_seeds > 1``, replicated)."""
    per_seeds = seeds_lib.over_seeds(step, config.num_seeds, config.seed_batching)
    return parallel.jit_data_parallel(
        per_seeds, mesh, num_batch_args=num_batch_args, donate_state=donate_state
    )


def compile_train_step(
    config: ml_collections.ConfigDict,
    model: Any,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    mesh: jax.sharding.Mesh,
    needed: bool = True,
) -> tuple[Any, Any, dict[str, str]]:
    """(compiled, model, gradients): the data-parallel train step compiled for ``state``
    (donated) and a uint8 batch, the model it runs (gradient "auto" resolved) and the
    gradient each ODE block uses (block name -> "dto" | "backprop" | "otd").

    With gradient "auto" (every ODE variant's default but node's) each block's exact gradient
    is chosen from the compiled step's memory against ``config.memory_budget_gb``
    (:func:`anodev2_jax.gradients.choose`), and the choice is printed. With ``needed=False``
    (the caller runs another program, e.g. the device input pipeline's) compiled is None
    unless auto had to compile the step to choose.
    """
    dtype = jnp.dtype(config.dtype)
    batch = parallel.batch_sharded(mesh)
    images = jax.ShapeDtypeStruct(
        (config.batch_size, *models.IMAGE_SHAPE), jnp.uint8, sharding=batch
    )
    labels = jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch)

    def resolved(gradients: Mapping[str, str]) -> Any:
        return blocks_lib.with_block_gradients(model, gradients) if gradients else model

    def compile_with(gradients: Mapping[str, str]) -> Any:
        step = make_train_step(resolved(gradients), optimizer, dtype, train_draws(config))
        jitted = over_run(step, config, mesh, num_batch_args=2, donate_state=True)
        return jitted.lower(state, images, labels).compile()

    blocks = models.ode_block_inputs(model)
    if model.ode is None or model.ode.gradient != "auto":
        compiled = compile_with({}) if needed else None
        return compiled, model, {block: model.ode.gradient_of(block) for block in blocks}
    largest_first = sorted(blocks, key=lambda block: -math.prod(blocks[block].shape))
    budget = (
        gradients_lib.default_budget_bytes()
        if config.memory_budget_gb is None
        else int(config.memory_budget_gb * gradients_lib.GIB)
    )
    choice = gradients_lib.choose(largest_first, compile_with, budget)
    if jax.process_index() == 0:
        print(choice.describe(), flush=True)
    return choice.compiled, resolved(choice.gradients), choice.gradients


@dataclasses.dataclass(frozen=True)
class Steps:
    """A run's steps, each wrapped once for its seeds and devices (:func:`build_steps`).

    train: ``(state, images, labels) -> (state, metrics)`` over the seeds, not jitted (the
    device input pipeline jits it inside its multi-step loop); compiled_train: the same,
    jitted data-parallel and compiled (None when not needed); evaluate and
    evaluate_batch_statistics: ``(state, images, labels, mask) -> sums``, jitted, BatchNorm
    on running or on batch statistics; model: the model they run (gradient "auto"
    resolved); gradients: ODE block -> the gradient it uses.
    """

    train: Callable
    compiled_train: Any
    evaluate: Callable
    evaluate_batch_statistics: Callable
    model: Any
    gradients: dict[str, str]


def build_steps(
    config: ml_collections.ConfigDict,
    model: Any,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    mesh: jax.sharding.Mesh,
    needed: bool = True,
) -> Steps:
    """The run's :class:`Steps`; the train step compiled unless ``needed`` is False (see
    :func:`compile_train_step`)."""
    compiled, model, gradients = compile_train_step(config, model, optimizer, state, mesh, needed)
    dtype = jnp.dtype(config.dtype)
    train = seeds_lib.over_seeds(
        make_train_step(model, optimizer, dtype, train_draws(config)),
        config.num_seeds,
        config.seed_batching,
    )
    evaluate, evaluate_batch_statistics = (
        over_run(make_eval_step(model, dtype, statistics), config, mesh, num_batch_args=3)
        for statistics in (False, True)
    )
    return Steps(train, compiled, evaluate, evaluate_batch_statistics, model, gradients)
