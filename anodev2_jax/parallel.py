"""Data parallelism: a device mesh over all processes, the batch sharded over ``data``.

This is what ``pmap`` became (pmap is in maintenance mode since JAX 0.8): ``jit`` over
arrays placed with ``NamedSharding`` on a ``Mesh``. Parameters and optimizer state are
replicated; the batch is split over the ``data`` axis, so BatchNorm statistics, losses and
gradients are over the global batch and a run's numbers do not depend on the device count.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "batch_size") -> None:
    """Raise ValueError unless the global batch splits evenly over devices and processes."""
    devices, processes = mesh.size, jax.process_count()
    if batch_size % devices or batch_size % processes:
        raise ValueError(
            f"config.{name}={batch_size} does not divide by the {devices} devices "
            f"({processes} processes); use a multiple of {devices}"
        )


def process_slice(global_batch: int) -> slice:
    """The rows of a global batch that this process loads (processes split it evenly)."""
    per_process = global_batch // jax.process_count()
    start = jax.process_index() * per_process
    return slice(start, start + per_process)


def global_batch(local: Any, mesh: Mesh) -> Any:
    """Assemble a batch-sharded global array from every process's own rows of it."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree of host or device arrays on every device of the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(
            np.shape(x), sharding, lambda index: np.asarray(x)[index]
        ),
        tree,
    )
