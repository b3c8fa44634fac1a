"""The training loop: ``train_and_evaluate(config, workdir)``.

Everything a run writes goes to ``workdir``: ``checkpoints/`` (orbax, every epoch and on
SIGTERM/SIGINT; a restart with the same workdir resumes), ``metrics.jsonl``, TensorBoard
event files under ``tensorboard/`` and, at the end, ``results.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from anodev2_jax.nn import models
from anodev2_jax.training import checkpoints as checkpoints_lib
from anodev2_jax.training import data as data_lib
from anodev2_jax.training import evaluation, parallel
from anodev2_jax.training import input_pipeline as input_lib
from anodev2_jax.training import metrics as metrics_lib
from anodev2_jax.training import seeds as seeds_lib
from anodev2_jax.training.config import (
    check_config,
    data_seed,
    learning_rate_schedule,
    make_optimizer,
    model_from_config,
    seeds_of,
)
from anodev2_jax.training.steps import Steps, TrainState, build_steps, create_state, state_step


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


@dataclasses.dataclass
class _Run:
    """What the loop works with: built once by :func:`_prepare`."""

    config: ml_collections.ConfigDict
    workdir: Path
    mesh: jax.sharding.Mesh
    dataset: data_lib.CIFAR10
    steps_per_epoch: int
    schedule: optax.Schedule
    checkpoints: ocp.CheckpointManager
    steps: Steps
    feed: input_lib.Input
    log: metrics_lib.MetricsLog
    num_params: int

    @property
    def seeds(self) -> list[int]:
        return seeds_of(self.config)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.num_epochs


def _load_data(config: ml_collections.ConfigDict) -> tuple[data_lib.CIFAR10, int]:
    """The dataset of ``config`` and the steps per epoch."""
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
    return dataset, steps_per_epoch


def _prepare(config: ml_collections.ConfigDict, workdir: Path) -> tuple[_Run, TrainState]:
    """Check the config, load the data, build (or restore) the state and the steps."""
    check_config(config)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    dataset, steps_per_epoch = _load_data(config)
    model = model_from_config(config)
    optimizer = make_optimizer(config, steps_per_epoch)
    checkpoints = checkpoints_lib.checkpoint_manager(
        workdir / "checkpoints", max_to_keep=config.max_checkpoints_to_keep
    )
    state = create_state(model, optimizer, config)
    num_params = models.count_params(state.params) // config.num_seeds
    if checkpoints.latest_step() is not None:
        state = checkpoints_lib.restore_checkpoint(checkpoints, state, parallel.replicated(mesh))
        if jax.process_index() == 0:
            print(f"Resumed from {workdir / 'checkpoints'} at step {state_step(state)}", flush=True)
    else:
        state = parallel.replicate(state, mesh)
    host_input = input_lib.resolve_pipeline(config.input_pipeline) == "host"
    steps = build_steps(config, model, optimizer, state, mesh, needed=host_input)
    feed = input_lib.make_input(
        config.input_pipeline,
        steps.train,
        dataset.train_images,
        dataset.train_labels,
        mesh,
        config.steps_per_dispatch or config.log_every_steps,
        compiled=steps.compiled_train,
    )
    log = metrics_lib.MetricsLog(workdir, jax.process_index() == 0)
    schedule = learning_rate_schedule(config, steps_per_epoch)
    run = _Run(
        config, workdir, mesh, dataset, steps_per_epoch, schedule, checkpoints, steps, feed, log,
        num_params,
    )  # fmt: skip
    return run, state


def _log_train(run: _Run, step: int, pending: list[input_lib.Dispatch], tick: float) -> dict:
    """Write the pending dispatches' mean train metrics per seed; return them for the bar.

    tick: when the first of them was dispatched. Dispatches return before the steps end, so
    the images per second are timed once their metrics are on the host."""
    config, num_steps = run.config, sum(n for _, n, _ in pending)
    values = seeds_lib.per_seed(
        metrics_lib.check_finite(run.feed.fetch(pending), run.checkpoints, run.seeds),
        config.num_seeds,
    )
    seconds = time.time() - tick
    rate = num_steps * config.batch_size * config.num_seeds / seconds  # all seeds together
    for seed_values in values:
        seed_values["images_per_sec"] = rate
        seed_values["learning_rate"] = float(run.schedule(step))
    run.log.write_seeds(step, "train", values, run.seeds)
    return {
        "loss": f"{np.mean([v['loss'] for v in values]):.3f}",
        "acc": f"{np.mean([v['accuracy'] for v in values]):.3f}",
        "img_s": f"{rate:.0f}",
    }


def _train_epoch(
    run: _Run, state: TrainState, step: int, stop: list[int]
) -> tuple[TrainState, int, bool]:
    """Train from ``step`` to the end of its epoch, or until a stop request (then the third
    value is True): dispatches as the input pipeline cuts them, logged every
    ``log_every_steps`` steps."""
    config = run.config
    epoch, offset = divmod(step, run.steps_per_epoch)
    order = data_lib.epoch_batches(
        len(run.dataset.train_images), config.batch_size, data_seed(config), epoch
    )
    bar = tqdm.tqdm(
        total=run.steps_per_epoch,
        initial=offset,
        desc=f"epoch {epoch + 1}/{config.num_epochs}",
        disable=not (jax.process_index() == 0 and config.progress_bar),
        dynamic_ncols=True,
    )
    epoch_order = run.feed.epoch(order)
    pending: list[input_lib.Dispatch] = []
    tick, stopping = time.time(), False
    for num_steps in input_lib.dispatch_lengths(
        offset, run.steps_per_epoch, config.log_every_steps, run.feed.steps_per_dispatch
    ):
        state, metrics = run.feed.run(state, epoch_order, step % run.steps_per_epoch, num_steps)
        step += num_steps
        pending.append((step, num_steps, metrics))
        bar.update(num_steps)
        logged = sum(n for _, n, _ in pending)
        boundary = logged == config.log_every_steps or step % run.steps_per_epoch == 0
        # Saving a checkpoint is collective, so all processes must stop after the same step:
        # with several they agree at log boundaries, where the host waits anyway.
        if boundary or jax.process_count() == 1:
            stopping = parallel.any_process(bool(stop))
        if boundary or stopping:
            bar.set_postfix(**_log_train(run, step, pending, tick))
            pending, tick = [], time.time()
        if stopping:
            break
    bar.close()
    return state, step, stopping


def _stop(run: _Run, state: TrainState, step: int, stop: list[int]) -> SystemExit:
    """Checkpoint and close the logs after a stop request; the exception to raise."""
    checkpoints_lib.save(run.checkpoints, state)
    run.log.close()
    cause = f"signal {stop[0]}" if stop else "a signal to another process"
    return SystemExit(
        f"Stopped by {cause} at step {step}; checkpoint saved to "
        f"{run.workdir / 'checkpoints'}. Run the same command to resume."
    )


def _end_epoch(run: _Run, state: TrainState, step: int) -> list[dict[str, float]]:
    """Checkpoint when due, test, log and print; return the test metrics per seed."""
    config = run.config
    epoch = step // run.steps_per_epoch
    if epoch % config.checkpoint_every_epochs == 0 or step == run.total_steps:
        checkpoints_lib.save(run.checkpoints, state)
    test = evaluation.test_metrics(run.steps.evaluate, state, run.dataset, config, run.mesh)
    run.log.write_seeds(step, "test", [{**m, "epoch": epoch} for m in test], run.seeds)
    if jax.process_index() == 0:
        print(f"epoch {epoch}: {evaluation.describe_test(test, run.seeds)}", flush=True)
    return test


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
    dispatch (:mod:`anodev2_jax.training.input_pipeline`): after the current step with the
    host pipeline, after up to ``steps_per_dispatch`` steps with the device pipeline, and
    with several processes at the next log boundary. The same call then resumes
    bit-identically.
    """
    start_time = time.time()
    run, state = _prepare(config, Path(workdir).absolute())
    # Every process reads it (orbax needs a workdir all processes share) so all return the same.
    records = metrics_lib.read_metrics(run.workdir / "metrics.jsonl")
    best_accuracy = metrics_lib.best_accuracies(records, run.seeds)
    test: list[dict[str, float]] = []
    step = state_step(state)
    with stop_requests() as stop:
        while step < run.total_steps:
            state, step, stopping = _train_epoch(run, state, step, stop)
            if stopping:
                raise _stop(run, state, step, stop)
            test = _end_epoch(run, state, step)
            best_accuracy = np.maximum(best_accuracy, [m["accuracy"] for m in test])
    if not test:  # resumed a finished run
        test = evaluation.test_metrics(run.steps.evaluate, state, run.dataset, config, run.mesh)
    check = evaluation.batch_statistics_check(
        run.steps.evaluate_batch_statistics, state, run.dataset, config, run.mesh, test
    )
    results = evaluation.results(
        config,
        test,
        check,
        best_accuracy,
        num_params=run.num_params,
        steps=step,
        wall_time_sec=time.time() - start_time,
        data_source=run.dataset.source,
        devices=jax.device_count(),
        processes=jax.process_count(),
        gradients=run.steps.gradients,
    )
    run.log.close()
    run.checkpoints.close()
    if jax.process_index() == 0:
        metrics_lib.write_json_atomic(run.workdir / "results.json", results)
    return results
