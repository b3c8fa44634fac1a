"""Training: train state, jitted train/eval steps, and train_and_evaluate(config, workdir).

Everything a run writes goes to ``workdir``: ``checkpoints/`` (orbax, every epoch and on
SIGTERM/SIGINT; a restart with the same workdir resumes), ``metrics.jsonl``, TensorBoard
event files under ``tensorboard/`` and, at the end, ``results.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
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
from anodev2_jax import data as data_lib
from anodev2_jax import host_malloc, models, parallel

PyTree = Any


class TrainState(struct.PyTreeNode):
    """Everything a resumed run needs: the data order and augmentation follow from step."""

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
    for name in ("batch_size", "eval_batch_size", "num_epochs", "log_every_steps"):
        value = config[name]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{name}={value!r} must be a positive integer")
    if config.learning_rate <= 0:
        raise ValueError(f"config.learning_rate={config.learning_rate} must be positive")
    if config.grad_clip_norm is not None and not config.grad_clip_norm > 0:
        raise ValueError(
            f"config.grad_clip_norm={config.grad_clip_norm} must be positive (or None: no clipping)"
        )
    if config.warmup_epochs < 0:
        raise ValueError(f"config.warmup_epochs={config.warmup_epochs} must be ≥ 0")
    if list(config.lr_decay_epochs) != sorted(config.lr_decay_epochs):
        raise ValueError(f"config.lr_decay_epochs={config.lr_decay_epochs} must be increasing")
    # Builds the ODE plan, which validates step counts, schedule and method.
    model_from_config(config)


def model_from_config(config: ml_collections.ConfigDict) -> Any:
    overrides = {
        name: config[name]
        for name in ("num_z_steps", "num_w_steps", "method", "gradient", "norm_params")
        if config[name] is not None
    }
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
        conv_impl=config.conv_impl,
        dtype=jnp.dtype(config.dtype),
        **overrides,
    )


def learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
    """Linear warm-up from 0, then the paper's step decay at ``lr_decay_epochs``."""
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


def make_train_step(model: Any, optimizer: optax.GradientTransformation, dtype: Any) -> Callable:
    def train_step(state: TrainState, images: jax.Array, labels: jax.Array):
        """One SGD step on a (B, 32, 32, 3) uint8 batch, augmented on device."""
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        inputs = data_lib.normalize(data_lib.augment(key, images)).astype(dtype)

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            logits, updates = model.apply(variables, inputs, train=True, mutable=["batch_stats"])
            return jnp.mean(cross_entropy(logits, labels)), (logits, updates["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
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
    key = jax.random.key(config.seed)
    init_key, train_key = jax.random.split(key)
    dummy = jnp.zeros((1, 32, 32, 3), jnp.dtype(config.dtype))
    variables = model.init(init_key, dummy, train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.asarray(0, jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=optimizer.init(params),
        key=jax.random.key_data(train_key),
    )


# -- checkpoints -----------------------------------------------------------------------------------
def checkpoint_manager(directory: Path, **options: Any) -> ocp.CheckpointManager:
    """An orbax manager of TrainState checkpoints in ``directory`` (synchronous saves)."""
    return ocp.CheckpointManager(
        directory,
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
    saved_stats = manager.item_metadata(step).tree["batch_stats"]
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), template
    )
    template_leaves, treedef = jax.tree.flatten(template.batch_stats)
    is_array = lambda x: hasattr(x, "shape")
    saved_paths, paths = (
        {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(t, is_array)}
        for t in (saved_stats, template.batch_stats)
    )
    if saved_paths != paths:
        raise ValueError(
            f"the checkpoint at step {step} in {manager.directory} holds the BatchNorm "
            f"statistics of other layers than this model's (only in the checkpoint: "
            f"{sorted(saved_paths - paths)}; only in the model: {sorted(paths - saved_paths)}): "
            "it was written by a different config.model or variant; resume it with that "
            "config, or use a new workdir"
        )
    saved_shapes = [tuple(m.shape) for m in jax.tree.leaves(saved_stats, is_leaf=is_array)]
    legacy = [
        len(shape) == 1 and t.ndim == 2 and shape == t.shape[1:]
        for shape, t in zip(saved_shapes, template_leaves, strict=True)
    ]
    if not any(legacy):
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))
    stats = jax.tree.unflatten(
        treedef,
        [
            jax.ShapeDtypeStruct(shape, t.dtype, sharding=sharding)
            for shape, t in zip(saved_shapes, template_leaves, strict=True)
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
    """metrics.jsonl plus TensorBoard event files; silent on processes other than 0."""

    def __init__(self, workdir: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter

            self.file = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115
            self.writer = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        self.file.flush()
        for name, value in values.items():
            self.writer.add_scalar(f"{kind}/{name}", value, step)
        self.writer.flush()

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
) -> dict[str, float]:
    """Loss and accuracy over a whole (host) test set, in ``order`` (default: as stored).

    The last batch is filled up with rows from the start of the order, masked out of the
    totals (so that, with batch statistics, it is still a sample of the test set).
    """
    totals = {"loss": 0.0, "correct": 0, "count": 0}
    local = parallel.process_slice(batch_size)
    order = np.arange(len(images)) if order is None else order
    for start in range(0, len(images), batch_size):
        positions = np.arange(start, start + batch_size)
        mask = positions < len(images)
        rows = order[positions % len(images)]
        batch = (images[rows[local]], labels[rows[local]], mask[local])
        out = eval_step(state, *parallel.global_batch(batch, mesh))
        for name in totals:
            totals[name] += out[name].item()
    return {
        "loss": totals["loss"] / totals["count"],
        "accuracy": totals["correct"] / totals["count"],
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Train ``config.model``/``config.variant`` on CIFAR-10; return the results dict."""
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
        seed=config.seed,
        **sizes,
    )
    num_train = len(dataset.train_images)
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"config.batch_size={config.batch_size} exceeds the {num_train} training images"
        )
    total_steps = steps_per_epoch * config.num_epochs

    model = model_from_config(config)
    optimizer = make_optimizer(config, steps_per_epoch)
    dtype = jnp.dtype(config.dtype)
    train_step = parallel.jit_data_parallel(
        make_train_step(model, optimizer, dtype), mesh, num_batch_args=2, donate_state=True
    )
    eval_step = parallel.jit_data_parallel(make_eval_step(model, dtype), mesh, num_batch_args=3)

    checkpoints = checkpoint_manager(
        workdir / "checkpoints", max_to_keep=config.max_checkpoints_to_keep
    )
    state = create_state(model, optimizer, config)
    num_params = models.count_params(state.params)
    if checkpoints.latest_step() is not None:
        state = restore_checkpoint(checkpoints, state, parallel.replicated(mesh))
        if is_main:
            print(f"Resumed from {workdir / 'checkpoints'} at step {int(state.step)}", flush=True)
    else:
        state = parallel.replicate(state, mesh)

    log = MetricsLog(workdir, is_main)

    def save(state: TrainState) -> None:
        step = int(state.step)
        if checkpoints.latest_step() != step:
            checkpoints.save(step, args=ocp.args.StandardSave(state))
            checkpoints.wait_until_finished()

    local = parallel.process_slice(config.batch_size)
    best_accuracy, test_metrics = 0.0, {}
    # Every process reads it (orbax needs a workdir all processes share) so all return the same.
    for record in _read_metrics(workdir / "metrics.jsonl"):
        if record["kind"] == "test":
            best_accuracy = max(best_accuracy, record["accuracy"])
    step = int(state.step)
    with stop_requests() as stop:
        while step < total_steps:
            epoch, offset = divmod(step, steps_per_epoch)
            order = data_lib.epoch_batches(num_train, config.batch_size, config.seed, epoch)
            bar = tqdm.tqdm(
                total=steps_per_epoch,
                initial=offset,
                desc=f"epoch {epoch + 1}/{config.num_epochs}",
                disable=not (is_main and config.progress_bar),
                dynamic_ncols=True,
            )
            pending: list[tuple[int, dict]] = []
            tick, stopping = time.time(), False
            for rows in order[offset:]:
                rows = rows[local]
                images, labels = dataset.train_images[rows], dataset.train_labels[rows]
                state, metrics = train_step(state, *parallel.global_batch((images, labels), mesh))
                step += 1
                pending.append((step, metrics))
                bar.update()
                boundary = len(pending) == config.log_every_steps or step % steps_per_epoch == 0
                # Saving a checkpoint is collective, so all processes must stop after the same
                # step: with several they agree at log boundaries, where the host waits anyway.
                if boundary or jax.process_count() == 1:
                    stopping = parallel.any_process(bool(stop))
                if boundary or stopping:
                    values = _check_finite(pending, checkpoints)
                    elapsed = time.time() - tick
                    values["images_per_sec"] = len(pending) * config.batch_size / elapsed
                    values["learning_rate"] = float(
                        learning_rate_schedule(config, steps_per_epoch)(step)
                    )
                    bar.set_postfix(
                        loss=f"{values['loss']:.3f}",
                        acc=f"{values['accuracy']:.3f}",
                        img_s=f"{values['images_per_sec']:.0f}",
                    )
                    log.write(step, "train", values)
                    pending, tick = [], time.time()
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
            test_metrics = evaluate(
                eval_step,
                state,
                dataset.test_images,
                dataset.test_labels,
                config.eval_batch_size,
                mesh,
            )
            best_accuracy = max(best_accuracy, test_metrics["accuracy"])
            log.write(step, "test", {**test_metrics, "epoch": epoch + 1})
            if is_main:
                print(
                    f"epoch {epoch + 1}: test loss {test_metrics['loss']:.4f}, "
                    f"accuracy {test_metrics['accuracy']:.4f}",
                    flush=True,
                )
    if not test_metrics:  # resumed a finished run
        test_metrics = evaluate(
            eval_step, state, dataset.test_images, dataset.test_labels, config.eval_batch_size, mesh
        )
    results = {
        "final_test_accuracy": test_metrics["accuracy"],
        "final_test_loss": test_metrics["loss"],
        **_batch_statistics_check(config, model, dtype, state, dataset, mesh, test_metrics),
        "best_test_accuracy": max(best_accuracy, test_metrics["accuracy"]),
        "num_params": num_params,
        "steps": step,
        "wall_time_sec": time.time() - start_time,
        "data_source": dataset.source,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "config": config.to_dict(),
    }
    log.close()
    checkpoints.close()
    if is_main:
        write_json_atomic(workdir / "results.json", results)
    return results


def _batch_statistics_check(config, model, dtype, state, dataset, mesh, test_metrics) -> dict:
    """The final test accuracy again with BatchNorm on batch statistics (test set in a fixed
    random order), a second measure of the same weights; says so when eval mode is > 2
    points below it, i.e. when the running statistics do not fit the trained network."""
    if not config.eval_batch_statistics:
        return {}
    order = np.random.default_rng(config.seed).permutation(len(dataset.test_images))
    step = parallel.jit_data_parallel(
        make_eval_step(model, dtype, batch_statistics=True), mesh, num_batch_args=3
    )
    check = evaluate(
        step, state, dataset.test_images, dataset.test_labels, config.eval_batch_size, mesh, order
    )
    gap = check["accuracy"] - test_metrics["accuracy"]
    if jax.process_index() == 0:
        print(
            f"test accuracy {test_metrics['accuracy']:.4f} (running BatchNorm statistics), "
            f"{check['accuracy']:.4f} with batch statistics",
            flush=True,
        )
        if gap > 0.02:
            print(
                f"warning: eval mode is {100 * gap:.1f} points below batch statistics: the "
                "running statistics do not fit the network (too few steps since a change?)",
                flush=True,
            )
    return {"final_test_accuracy_batch_statistics": check["accuracy"]}


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed process
            continue
    return records


def _check_finite(pending: list[tuple[int, dict]], checkpoints) -> dict[str, float]:
    """Mean of the pending steps' metrics; stops training at the first non-finite loss."""
    host = jax.device_get([metrics for _, metrics in pending])
    for (step, _), metrics in zip(pending, host, strict=True):
        if not math.isfinite(float(metrics["loss"])):
            last = checkpoints.latest_step()
            where = (
                f"the last good checkpoint is step {last} in {checkpoints.directory}"
                if last is not None
                else "no checkpoint was saved yet"
            )
            raise NonFiniteLossError(
                f"loss is {float(metrics['loss'])} at step {step}; training stopped, {where}. "
                "Lower config.learning_rate or lengthen config.warmup_epochs."
            )
    return {name: float(np.mean([m[name] for m in host])) for name in host[0]}
