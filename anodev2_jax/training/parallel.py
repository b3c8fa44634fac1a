"""Data parallelism: a device mesh over all processes, the batch sharded over ``data``.

This is what ``pmap`` became (pmap is in maintenance mode since JAX 0.8): ``jit`` over
arrays placed with ``NamedSharding`` on a ``Mesh``. Parameters and optimizer state are
replicated; the batch is split over the ``data`` axis, so BatchNorm statistics, losses and
gradients are over the global batch and a run's numbers do not depend on the device count.

With several processes (``jax.distributed.initialize``), the mesh spans every device of every
process; each process loads only its :func:`process_slice` of every global batch and
:func:`global_batch` joins the slices into one array without copying between hosts.
Random numbers drawn inside a step on a sharded batch (the augmentation) are the same for
every sharding: with ``jax_threefry_partitionable`` (on by default since JAX 0.5) each device
draws only its own rows' bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process).

    The default orders devices by process, so each process's devices hold one consecutive
    block of the batch: its :func:`process_slice`.
    """
    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def steps_batch_sharded(mesh: Mesh) -> NamedSharding:
    """(steps, batch) arrays (an epoch's rows): the batch axis split over the data axis."""
    return NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "batch_size") -> None:
    """Raise ValueError unless the global batch splits evenly over devices and processes."""
    devices, processes = mesh.size, jax.process_count()
    multiple = math.lcm(devices, processes)  # = devices when processes have equal device counts
    if batch_size % multiple:
        lower = max(batch_size // multiple * multiple, multiple)
        raise ValueError(
            f"config.{name}={batch_size} is the global batch and does not divide by the "
            f"{devices} devices (of {processes} process{'es' if processes > 1 else ''}); "
            f"use a multiple of {multiple}, e.g. --config.{name}={lower} or {lower + multiple}"
        )


def process_slice(
    global_batch: int, process_index: int | None = None, process_count: int | None = None
) -> slice:
    """The rows of a global batch that a process loads (default: this process).

    Process i takes the i-th of ``process_count`` equal consecutive blocks, the rows that its
    devices hold in a :func:`make_mesh` mesh, so the data order does not depend on the number
    of processes.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    per_process = global_batch // process_count
    start = process_index * per_process
    return slice(start, start + per_process)


def global_batch(local: Any, mesh: Mesh) -> Any:
    """Assemble a batch-sharded global array from every process's own rows of it.

    local: pytree of (global_batch / process_count, ...) host arrays, this process's
    :func:`process_slice`. Returns (global_batch, ...) arrays split over ``data``.
    """
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree of host or device arrays, equal on every process, on every device."""
    sharding = replicated(mesh)

    def place(x: Any) -> jax.Array:
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree)


def jit_data_parallel(
    step: Callable, mesh: Mesh, num_batch_args: int, *, donate_state: bool = False
) -> jax.stages.Wrapped:
    """``jax.jit`` of ``step(state, *batch)`` with explicit shardings for data parallelism.

    The state (first argument) and every output are replicated; the ``num_batch_args``
    batch arguments are split along their leading axis over ``data``. A mean over the batch
    inside ``step`` (the loss, BatchNorm statistics) is thus over the global batch: XLA adds
    the all-reduces.
    """
    state, batch = replicated(mesh), batch_sharded(mesh)
    return jax.jit(
        step,
        in_shardings=(state,) + (batch,) * num_batch_args,
        out_shardings=state,
        donate_argnums=(0,) if donate_state else (),
    )


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any (a collective: all must call it)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
