"""Training: train state, jitted train/eval steps, and train_and_evaluate(config, workdir).

Everything a run writes goes to ``workdir``: ``checkpoints/`` (orbax, every epoch and on
SIGTERM/SIGINT; a restart with the same workdir resumes), ``metrics.jsonl``, TensorBoard
event files under ``tensorboard/`` and, at the end, ``results.json``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from flax import struct

from anodev2_jax import coupling as coupling_lib
from anodev2_jax import gradients as gradient_choice
from anodev2_jax.cpu import host_malloc
from anodev2_jax.nn import models
from anodev2_jax.training import data as data_lib
from anodev2_jax.training import input_pipeline as input_lib
from anodev2_jax.training import parallel
from anodev2_jax.training import seeds as seeds_lib

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


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or Inf loss."""


# -- configuration ---------------------------------------------------------------------------------
def check_config(config: ml_collections.ConfigDict) -> None:
    """Fail fast, before any data loading or compilation, naming the bad field."""
    if config.model not in models.MODELS:
        raise ValueError(f"config.model={config.model!r} is unknown; use one of {models.MODELS}")
    if config.variant not in models.VARIANTS:
        raise ValueError(
            f"config.variant={config.variant!r} is unknown; use one of {models.VARIANTS}"
        )
    if config.data_source not in data_lib.SOURCES:
        raise ValueError(
            f"config.data_source={config.data_source!r} is unknown; use one of {data_lib.SOURCES}"
        )
    if config.cpu_malloc not in host_malloc.MODES:
        raise ValueError(
            f"config.cpu_malloc={config.cpu_malloc!r} is unknown; use one of {host_malloc.MODES}"
        )
    if config.dtype not in ("float32", "float64"):
        raise ValueError(f"config.dtype={config.dtype!r} must be 'float32' or 'float64'")
    for name in ("batch_size", "eval_batch_size", "num_epochs", "log_every_steps", "num_seeds"):
        value = config[name]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{name}={value!r} must be a positive integer")
    for name in ("seed", "data_seed"):
        value = config[name]
        if not (value is None and name == "data_seed") and (
            not isinstance(value, int) or value < 0
        ):
            raise ValueError(f"config.{name}={value!r} must be a non-negative integer")
    if config.seed_batching not in seeds_lib.BATCHINGS:
        raise ValueError(
            f"config.seed_batching={config.seed_batching!r} is unknown; use one of "
            f"{seeds_lib.BATCHINGS}"
        )
    if config.input_pipeline not in input_lib.PIPELINES:
        raise ValueError(
            f"config.input_pipeline={config.input_pipeline!r} is unknown; use one of "
            f"{input_lib.PIPELINES}"
        )
    per_dispatch = config.steps_per_dispatch
    if not isinstance(per_dispatch, int) or not 0 <= per_dispatch <= config.log_every_steps:
        raise ValueError(
            f"config.steps_per_dispatch={per_dispatch!r} must be an integer from 1 to "
            f"config.log_every_steps={config.log_every_steps} (a dispatch ends at every log "
            "boundary), or 0 for log_every_steps"
        )
    if config.input_pipeline == "host" and per_dispatch > 1:
        raise ValueError(
            f"config.steps_per_dispatch={per_dispatch} is read by the device input pipeline "
            "only; config.input_pipeline='host' dispatches every step. Use "
            "--config.input_pipeline=device, or leave steps_per_dispatch at 0"
        )
    if config.learning_rate <= 0:
        raise ValueError(f"config.learning_rate={config.learning_rate} must be positive")
    if config.memory_budget_gb is not None and not config.memory_budget_gb > 0:
        raise ValueError(
            f"config.memory_budget_gb={config.memory_budget_gb} must be positive (or None: half "
            "of one device's memory)"
        )
    if config.grad_clip_norm is not None and not config.grad_clip_norm > 0:
        raise ValueError(
            f"config.grad_clip_norm={config.grad_clip_norm} must be positive (or None: no clipping)"
        )
    if config.warmup_epochs < 0:
        raise ValueError(f"config.warmup_epochs={config.warmup_epochs} must be ≥ 0")
    decay_epochs = list(config.lr_decay_epochs)
    if not all(isinstance(e, int | float) and e >= 0 for e in decay_epochs):
        raise ValueError(
            f"config.lr_decay_epochs={config.lr_decay_epochs} must hold epochs ≥ 0 (fractions "
            "allowed, e.g. (6.43, 12.86))"
        )
    if decay_epochs != sorted(decay_epochs):
        raise ValueError(f"config.lr_decay_epochs={config.lr_decay_epochs} must be increasing")
    # Builds the ODE plan, which validates step counts, schedule and method.
    model_from_config(config)


def model_from_config(config: ml_collections.ConfigDict) -> Any:
    """The Flax model of ``config``: model, variant, ODE overrides, conv impl and dtype.

    conv_impl "auto" is XLA's convolution when the seeds of a run are vmapped: under vmap the
    conditionals of the CPU formulations (anodev2_jax.nn.conv) run both branches.
    """
    overrides = {
        name: config[name]
        for name in ("num_z_steps", "num_w_steps", "method", "gradient", "norm_params")
        if config[name] is not None
    }
    conv_impl = config.conv_impl
    vmapped = config.num_seeds > 1 and seeds_lib.resolve_batching(config.seed_batching) == "vmap"
    if conv_impl == "auto" and vmapped:
        conv_impl = "xla"
    # The time kernel K of θ = ∫ K(t-τ) w(τ) dτ; "dirac" (θ = w) is every variant's own.
    if config.kernel == "dirac" and config.kernel_rate is not None:
        raise ValueError(
            f"config.kernel_rate={config.kernel_rate} is set, but config.kernel='dirac' has no "
            "rate; use --config.kernel=exponential (or dirac+exponential), or drop kernel_rate"
        )
    if config.kernel != "dirac":
        rate = 1.0 if config.kernel_rate is None else config.kernel_rate
        try:
            overrides["coupling"] = coupling_lib.make_coupling(config.kernel, rate)
        except ValueError as e:
            raise ValueError(f"config.{e}") from e
    return models.create_model(
        config.model,
        config.variant,
        conv_impl=conv_impl,
        dtype=jnp.dtype(config.dtype),
        **overrides,
    )


def seeds_of(config: ml_collections.ConfigDict) -> list[int]:
    """The seeds a run trains: config.seed, …, config.seed + config.num_seeds - 1."""
    return seeds_lib.seed_list(config.seed, config.num_seeds)


def data_seed(config: ml_collections.ConfigDict) -> int:
    """The seed of the data order (and of the synthetic data): config.data_seed or config.seed."""
    return config.seed if config.data_seed is None else config.data_seed


def learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
    """Linear warm-up from 0, then the paper's step decay at ``lr_decay_epochs``.

    Epochs may be fractional (a compressed schedule): a boundary falls on the step
    int(epoch · steps_per_epoch).
    """
    warmup_steps = int(config.warmup_epochs * steps_per_epoch)
    # join_schedules hands the second schedule steps counted from the end of the warm-up.
    boundaries: dict[int, float] = {}
    for epoch in config.lr_decay_epochs:
        step = max(int(epoch * steps_per_epoch) - warmup_steps, 0)
        boundaries[step] = boundaries.get(step, 1.0) * config.lr_decay_factor
    decay = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
    warmup = optax.linear_schedule(0.0, config.learning_rate, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
    """SGD with momentum and (PyTorch-style, coupled) weight decay on every parameter; the
    loss gradient first clipped to global norm ``config.grad_clip_norm`` when it is set."""
    clip = (
        [] if config.grad_clip_norm is None else [optax.clip_by_global_norm(config.grad_clip_norm)]
    )
    return optax.chain(
        *clip,
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=config.momentum),
    )


# -- steps -----------------------------------------------------------------------------------------
def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy, (B, 10) logits and (B,) int labels -> (B,)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def loss_and_gradient(
    model: Any, state: TrainState, images: jax.Array, labels: jax.Array, dtype: Any
) -> tuple[tuple[jax.Array, tuple[jax.Array, PyTree]], PyTree]:
    """((loss, (logits, new batch_stats)), ∂loss/∂params) of the train step at ``state`` on a
    (B, 32, 32, 3) uint8 batch, augmented on the device with the step's key."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    inputs = data_lib.normalize(data_lib.augment(key, images)).astype(dtype)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, updates = model.apply(variables, inputs, train=True, mutable=["batch_stats"])
        return jnp.mean(cross_entropy(logits, labels)), (logits, updates["batch_stats"])

    return jax.value_and_grad(loss_fn, has_aux=True)(state.params)


def make_train_step(model: Any, optimizer: optax.GradientTransformation, dtype: Any) -> Callable:
    def train_step(state: TrainState, images: jax.Array, labels: jax.Array):
        """One SGD step on a (B, 32, 32, 3) uint8 batch, augmented on device."""
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
        return new_state, metrics

    return train_step


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
    (:mod:`anodev2_jax.gradients`), and the choice is printed. With ``needed=False``
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
        return models.with_block_gradients(model, gradients) if gradients else model

    def compile_with(gradients: Mapping[str, str]) -> Any:
        step = seeds_lib.over_seeds(
            make_train_step(resolved(gradients), optimizer, dtype),
            config.num_seeds,
            config.seed_batching,
        )
        jitted = parallel.jit_data_parallel(step, mesh, num_batch_args=2, donate_state=True)
        return jitted.lower(state, images, labels).compile()

    blocks = models.ode_block_inputs(model)
    if model.ode is None or model.ode.gradient != "auto":
        compiled = compile_with({}) if needed else None
        return compiled, model, {block: model.ode.gradient_of(block) for block in blocks}
    largest_first = sorted(blocks, key=lambda block: -math.prod(blocks[block].shape))
    budget = (
        gradient_choice.default_budget_bytes()
        if config.memory_budget_gb is None
        else int(config.memory_budget_gb * gradient_choice.GIB)
    )
    choice = gradient_choice.choose(largest_first, compile_with, budget)
    if jax.process_index() == 0:
        print(choice.describe(), flush=True)
    return choice.compiled, resolved(choice.gradients), choice.gradients


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


# -- checkpoints -----------------------------------------------------------------------------------
def checkpoint_manager(directory: Path, **options: Any) -> ocp.CheckpointManager:
    """An orbax manager of TrainState checkpoints in ``directory`` (synchronous saves; a
    relative path is taken from the working directory, orbax wants absolute ones)."""
    return ocp.CheckpointManager(
        Path(directory).absolute(),
        item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, **options),
    )


def restore_checkpoint(
    manager: ocp.CheckpointManager, template: TrainState, sharding: Any = None
) -> TrainState:
    """The latest checkpoint of ``manager``, restored into ``template``'s structure.

    A checkpoint written before the ODE blocks kept per-evaluation BatchNorm statistics
    (one shared (C,) running mean and variance where the model now has (E, C), one row per
    f evaluation) is converted: each evaluation starts from the old shared statistics, which
    training then re-estimates per evaluation. A warning says so. Any other mismatch between
    the checkpoint and the model raises ValueError.
    """
    step = manager.latest_step()
    saved_tree = manager.item_metadata(step).tree
    saved_stats = saved_tree["batch_stats"]
    is_array = lambda x: hasattr(x, "shape")

    def leaf_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
        leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_array)
        return {jax.tree_util.keystr(path): tuple(x.shape) for path, x in leaves}

    saved_shapes = leaf_shapes({"params": saved_tree["params"], "batch_stats": saved_stats})
    shapes = leaf_shapes({"params": template.params, "batch_stats": template.batch_stats})

    def fits(path: str) -> bool:
        saved, now = saved_shapes.get(path), shapes.get(path)
        if saved == now:
            return True
        # The one difference a conversion mends: (C,) statistics where the model has (E, C).
        return (
            path.startswith("['batch_stats']")
            and now is not None
            and saved == now[1:]
            and len(now) == 2
        )

    differ = sorted(path for path in saved_shapes.keys() | shapes.keys() if not fits(path))
    if differ:
        num_seeds = template.step.shape[0] if template.step.ndim else 1
        described = [f"{path}: {saved_shapes.get(path)} -> {shapes.get(path)}" for path in differ]
        raise ValueError(
            f"the checkpoint at step {step} in {manager.directory} does not fit this run's "
            f"model (checkpoint -> model, None where absent: {'; '.join(described[:4])}"
            f"{' …' if len(described) > 4 else ''}): it was written by a different "
            f"config.model, variant or num_seeds (this run: num_seeds={num_seeds}); resume it "
            "with that config, or use a new workdir"
        )
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), template
    )
    template_leaves, treedef = jax.tree.flatten(template.batch_stats)
    saved_stats_shapes = [tuple(m.shape) for m in jax.tree.leaves(saved_stats, is_leaf=is_array)]
    legacy = [
        shape != t.shape for shape, t in zip(saved_stats_shapes, template_leaves, strict=True)
    ]
    if not any(legacy):
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))
    stats = jax.tree.unflatten(
        treedef,
        [
            jax.ShapeDtypeStruct(shape, t.dtype, sharding=sharding)
            for shape, t in zip(saved_stats_shapes, template_leaves, strict=True)
        ],
    )
    state = manager.restore(
        step, args=ocp.args.StandardRestore(abstract.replace(batch_stats=stats))
    )
    warnings.warn(
        f"the checkpoint at step {step} in {manager.directory} has one shared set of BatchNorm "
        "running statistics per ODE block (the layout before per-evaluation statistics); "
        "each f evaluation now starts from that shared set. Its eval-mode accuracy stays that "
        "of the old layout until training re-estimates the statistics.",
        stacklevel=2,
    )
    per_evaluation = jax.jit(
        lambda tree: jax.tree.map(
            lambda x, t: jnp.broadcast_to(x, t.shape), tree, template.batch_stats
        ),
        out_shardings=sharding,
    )
    return state.replace(batch_stats=per_evaluation(state.batch_stats))


# -- files -----------------------------------------------------------------------------------------
def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temp file in the same folder, then rename: never half-written."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(payload, tmp, indent=2, default=str)
    os.replace(tmp.name, path)


class MetricsLog:
    """metrics.jsonl plus TensorBoard event files; silent on processes other than 0.

    One record per step and kind; in a run with several seeds one per seed, with a "seed"
    field, and TensorBoard tags ``KIND/NAME/seed_S``.
    """

    def __init__(self, workdir: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter

            self.file = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115
            self.writer = SummaryWriter(str(workdir / "tensorboard"))

    def write(
        self, step: int, kind: str, values: dict[str, float], seed: int | None = None
    ) -> None:
        """Append one record; ``seed``: the seed it belongs to (None in a single-seed run)."""
        if not self.enabled:
            return
        tagged = {} if seed is None else {"seed": seed}
        self.file.write(json.dumps({"step": step, "kind": kind, **tagged, **values}) + "\n")
        self.file.flush()
        suffix = "" if seed is None else f"/seed_{seed}"
        for name, value in values.items():
            self.writer.add_scalar(f"{kind}/{name}{suffix}", value, step)
        self.writer.flush()

    def write_seeds(
        self, step: int, kind: str, values: list[dict[str, float]], seeds: list[int]
    ) -> None:
        """One record per seed: ``values[i]`` for ``seeds[i]`` (no seed field if only one)."""
        for seed, seed_values in zip(seeds, values, strict=True):
            self.write(step, kind, seed_values, seed if len(seeds) > 1 else None)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.writer.close()


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """Collect SIGTERM/SIGINT instead of dying, so the loop can checkpoint and exit."""
    received: list[int] = []
    handler = lambda signum, frame: received.append(signum)
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# -- the loop --------------------------------------------------------------------------------------
def evaluate(
    eval_step, state, images, labels, batch_size: int, mesh, order: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Loss and accuracy over a whole (host) test set, in ``order`` (default: as stored).

    Returns float64 arrays: () each, or (k,) for a state with a seed axis (an eval step
    mapped by :func:`anodev2_jax.training.seeds.over_seeds`). The last batch is filled up with rows
    from the start of the order, masked out of the totals (so that, with batch statistics,
    it is still a sample of the test set).
    """
    totals: dict[str, Any] = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    local = parallel.process_slice(batch_size)
    order = np.arange(len(images)) if order is None else order
    for start in range(0, len(images), batch_size):
        positions = np.arange(start, start + batch_size)
        mask = positions < len(images)
        rows = order[positions % len(images)]
        batch = (images[rows[local]], labels[rows[local]], mask[local])
        out = eval_step(state, *parallel.global_batch(batch, mesh))
        for name in totals:
            totals[name] = totals[name] + np.asarray(out[name], dtype=np.float64)
    return {
        "loss": totals["loss"] / totals["count"],
        "accuracy": totals["correct"] / totals["count"],
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Train ``config.model``/``config.variant`` on CIFAR-10; return the results dict.

    The results (also written to ``workdir/results.json``): per seed (``per_seed``, a list
    of {"seed", "final_test_accuracy", "final_test_loss", "best_test_accuracy" and, with
    ``config.eval_batch_statistics``, "final_test_accuracy_batch_statistics"}), their min,
    max and mean over seeds (``summary``), and ``seeds``, ``num_params`` (of one seed),
    ``steps``, ``wall_time_sec`` (of this call: a resumed run's from its resumption),
    ``data_source``, ``devices``, ``processes`` and ``config``. A single-seed run also has
    its seed's numbers at the top level.

    A SIGTERM or SIGINT saves a checkpoint and exits (SystemExit) at the end of the running
    dispatch (:mod:`anodev2_jax.training.input_pipeline`): after the current step with the host
    pipeline, after up to ``steps_per_dispatch`` steps with the device pipeline, and with
    several processes at the next log boundary. The same call then resumes bit-identically.
    """
    start_time = time.time()
    check_config(config)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    workdir = Path(workdir).absolute()
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)

    sizes = {k: config[k] for k in ("num_train", "num_test") if config[k] is not None}
    dataset = data_lib.load_cifar10(
        config.data_source,
        data_dir=config.data_dir,
        download=config.download,
        seed=data_seed(config),
        **sizes,
    )
    num_train = len(dataset.train_images)
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"config.batch_size={config.batch_size} exceeds the {num_train} training images"
        )
    total_steps = steps_per_epoch * config.num_epochs
    seeds = seeds_of(config)
    num_seeds = len(seeds)

    model = model_from_config(config)
    optimizer = make_optimizer(config, steps_per_epoch)
    schedule = learning_rate_schedule(config, steps_per_epoch)
    dtype = jnp.dtype(config.dtype)
    over_seeds = functools.partial(
        seeds_lib.over_seeds, num_seeds=num_seeds, batching=config.seed_batching
    )
    eval_step = parallel.jit_data_parallel(
        over_seeds(make_eval_step(model, dtype)), mesh, num_batch_args=3
    )

    checkpoints = checkpoint_manager(
        workdir / "checkpoints", max_to_keep=config.max_checkpoints_to_keep
    )
    state = create_state(model, optimizer, config)
    num_params = models.count_params(state.params) // num_seeds
    if checkpoints.latest_step() is not None:
        state = restore_checkpoint(checkpoints, state, parallel.replicated(mesh))
        if is_main:
            print(f"Resumed from {workdir / 'checkpoints'} at step {state_step(state)}", flush=True)
    else:
        state = parallel.replicate(state, mesh)
    host_input = input_lib.resolve_pipeline(config.input_pipeline) == "host"
    train_step, model, gradients = compile_train_step(
        config, model, optimizer, state, mesh, needed=host_input
    )
    feed = input_lib.make_input(
        config.input_pipeline,
        over_seeds(make_train_step(model, optimizer, dtype)),
        dataset.train_images,
        dataset.train_labels,
        mesh,
        config.steps_per_dispatch or config.log_every_steps,
        compiled=train_step,
    )

    log = MetricsLog(workdir, is_main)

    def save(state: TrainState) -> None:
        step = state_step(state)
        if checkpoints.latest_step() != step:
            checkpoints.save(step, args=ocp.args.StandardSave(state))
            checkpoints.wait_until_finished()

    # Every process reads it (orbax needs a workdir all processes share) so all return the same.
    best_accuracy = _best_accuracies(read_metrics(workdir / "metrics.jsonl"), seeds)
    test_metrics: list[dict[str, float]] = []
    step = state_step(state)
    with stop_requests() as stop:
        while step < total_steps:
            epoch, offset = divmod(step, steps_per_epoch)
            order = data_lib.epoch_batches(num_train, config.batch_size, data_seed(config), epoch)
            bar = tqdm.tqdm(
                total=steps_per_epoch,
                initial=offset,
                desc=f"epoch {epoch + 1}/{config.num_epochs}",
                disable=not (is_main and config.progress_bar),
                dynamic_ncols=True,
            )
            epoch_order = feed.epoch(order)
            pending: list[input_lib.Dispatch] = []
            pending_steps, tick, stopping = 0, time.time(), False
            for num_steps in input_lib.dispatch_lengths(
                offset, steps_per_epoch, config.log_every_steps, feed.steps_per_dispatch
            ):
                state, metrics = feed.run(state, epoch_order, step % steps_per_epoch, num_steps)
                step += num_steps
                pending.append((step, num_steps, metrics))
                pending_steps += num_steps
                bar.update(num_steps)
                boundary = pending_steps == config.log_every_steps or step % steps_per_epoch == 0
                # Saving a checkpoint is collective, so all processes must stop after the same
                # step: with several they agree at log boundaries, where the host waits anyway.
                if boundary or jax.process_count() == 1:
                    stopping = parallel.any_process(bool(stop))
                if boundary or stopping:
                    values = seeds_lib.per_seed(
                        _check_finite(feed.fetch(pending), checkpoints, seeds), num_seeds
                    )
                    # Training images per second, all seeds together.
                    rate = pending_steps * config.batch_size * num_seeds / (time.time() - tick)
                    for seed_values in values:
                        seed_values["images_per_sec"] = rate
                        seed_values["learning_rate"] = float(schedule(step))
                    bar.set_postfix(
                        loss=f"{np.mean([v['loss'] for v in values]):.3f}",
                        acc=f"{np.mean([v['accuracy'] for v in values]):.3f}",
                        img_s=f"{rate:.0f}",
                    )
                    log.write_seeds(step, "train", values, seeds)
                    pending, pending_steps, tick = [], 0, time.time()
                if stopping:
                    break
            bar.close()
            if stopping:
                save(state)
                log.close()
                cause = f"signal {stop[0]}" if stop else "a signal to another process"
                raise SystemExit(
                    f"Stopped by {cause} at step {step}; checkpoint saved to "
                    f"{workdir / 'checkpoints'}. Run the same command to resume."
                )
            if (epoch + 1) % config.checkpoint_every_epochs == 0 or step == total_steps:
                save(state)
            test_metrics = _test(eval_step, state, dataset, config, mesh)
            best_accuracy = np.maximum(best_accuracy, [m["accuracy"] for m in test_metrics])
            log.write_seeds(step, "test", [{**m, "epoch": epoch + 1} for m in test_metrics], seeds)
            if is_main:
                print(f"epoch {epoch + 1}: {_describe_test(test_metrics, seeds)}", flush=True)
    if not test_metrics:  # resumed a finished run
        test_metrics = _test(eval_step, state, dataset, config, mesh)
    check = _batch_statistics_check(config, model, dtype, state, dataset, mesh, test_metrics)
    per_seed = []
    for i, (seed, metrics) in enumerate(zip(seeds, test_metrics, strict=True)):
        numbers = {
            "final_test_accuracy": metrics["accuracy"],
            "final_test_loss": metrics["loss"],
        }
        if check is not None:
            numbers["final_test_accuracy_batch_statistics"] = check[i]
        numbers["best_test_accuracy"] = float(max(best_accuracy[i], metrics["accuracy"]))
        per_seed.append({"seed": seed, **numbers})
    names = [name for name in per_seed[0] if name != "seed"]
    results = {
        **({name: per_seed[0][name] for name in names} if num_seeds == 1 else {}),
        "num_params": num_params,
        "steps": step,
        "wall_time_sec": time.time() - start_time,
        "data_source": dataset.source,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "seeds": seeds,
        "gradients": gradients,
        "per_seed": per_seed,
        "summary": {name: seeds_lib.summary([r[name] for r in per_seed]) for name in names},
        "config": config.to_dict(),
    }
    log.close()
    checkpoints.close()
    if is_main:
        write_json_atomic(workdir / "results.json", results)
    return results


def per_seed_results(results: dict) -> list[dict]:
    """The per-seed entries of a results.json dict, also for one written before num_seeds
    existed (a single seed, its numbers at the top level)."""
    if "per_seed" in results:
        return list(results["per_seed"])
    names = ("final_test_accuracy", "final_test_loss", "final_test_accuracy_batch_statistics")
    single = {name: results[name] for name in (*names, "best_test_accuracy") if name in results}
    return [{"seed": results["config"]["seed"], **single}]


def _test(eval_step, state, dataset, config, mesh) -> list[dict[str, float]]:
    """The test set's loss and accuracy, one dict per seed."""
    metrics = evaluate(
        eval_step, state, dataset.test_images, dataset.test_labels, config.eval_batch_size, mesh
    )
    return seeds_lib.per_seed(metrics, config.num_seeds)


def _describe_test(test_metrics: list[dict[str, float]], seeds: list[int]) -> str:
    if len(seeds) == 1:
        only = test_metrics[0]
        return f"test loss {only['loss']:.4f}, accuracy {only['accuracy']:.4f}"
    accuracies = ", ".join(f"{m['accuracy']:.4f}" for m in test_metrics)
    return f"test accuracy {accuracies} (seeds {seeds[0]}–{seeds[-1]})"


def _best_accuracies(records: list[dict], seeds: list[int]) -> np.ndarray:
    """The best test accuracy per seed in earlier metrics records (0 where none)."""
    best = np.zeros(len(seeds))
    for record in records:
        seed = record.get("seed", seeds[0])
        if record["kind"] == "test" and seed in seeds:
            index = seeds.index(seed)
            best[index] = max(best[index], record["accuracy"])
    return best


def _batch_statistics_check(
    config, model, dtype, state, dataset, mesh, test_metrics
) -> list[float] | None:
    """The final test accuracy per seed again with BatchNorm on batch statistics (test set
    in a fixed random order), a second measure of the same weights; says so when eval mode
    is > 2 points below it, i.e. when the running statistics do not fit the trained network.
    None when ``config.eval_batch_statistics`` is off."""
    if not config.eval_batch_statistics:
        return None
    order = np.random.default_rng(data_seed(config)).permutation(len(dataset.test_images))
    step = parallel.jit_data_parallel(
        seeds_lib.over_seeds(
            make_eval_step(model, dtype, batch_statistics=True),
            config.num_seeds,
            config.seed_batching,
        ),
        mesh,
        num_batch_args=3,
    )
    check = evaluate(
        step, state, dataset.test_images, dataset.test_labels, config.eval_batch_size, mesh, order
    )
    accuracies = [m["accuracy"] for m in seeds_lib.per_seed(check, config.num_seeds)]
    if jax.process_index() == 0:
        for seed, accuracy, metrics in zip(seeds_of(config), accuracies, test_metrics, strict=True):
            which = f"seed {seed}: " if config.num_seeds > 1 else ""
            print(
                f"{which}test accuracy {metrics['accuracy']:.4f} (running BatchNorm "
                f"statistics), {accuracy:.4f} with batch statistics",
                flush=True,
            )
            gap = accuracy - metrics["accuracy"]
            if gap > 0.02:
                print(
                    f"warning: {which}eval mode is {100 * gap:.1f} points below batch "
                    "statistics: the running statistics do not fit the network (too few steps "
                    "since a change?)",
                    flush=True,
                )
    return accuracies


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (none if absent), one per (kind, step, seed). A resumed
    run appends the steps after its checkpoint again: where a (kind, step, seed) repeats, the
    later record is kept, the one of the run that went on."""
    if not path.exists():
        return []
    records: dict[tuple, dict] = {}  # keeps the first's place, takes the later's values
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed process
            continue
        records[(record["kind"], record["step"], record.get("seed"))] = record
    return list(records.values())


def _check_finite(
    pending: list[tuple[int, dict[str, np.ndarray]]], checkpoints, seeds: list[int]
) -> dict[str, np.ndarray]:
    """Mean of the pending steps' metrics, () or (k,) per seed; stops training at the first
    non-finite loss. pending: (step, its metrics on the host) per step, in order."""
    host = [metrics for _, metrics in pending]
    for step, metrics in pending:
        losses = np.atleast_1d(np.asarray(metrics["loss"]))
        bad = [i for i, loss in enumerate(losses) if not math.isfinite(float(loss))]
        if bad:
            last = checkpoints.latest_step()
            where = (
                f"the last good checkpoint is step {last} in {checkpoints.directory}"
                if last is not None
                else "no checkpoint was saved yet"
            )
            which = f" (seed {seeds[bad[0]]})" if len(seeds) > 1 else ""
            raise NonFiniteLossError(
                f"loss is {float(losses[bad[0]])} at step {step}{which}; training stopped, "
                f"{where}. Lower config.learning_rate or lengthen config.warmup_epochs."
            )
    return {name: np.mean([m[name] for m in host], axis=0) for name in host[0]}
