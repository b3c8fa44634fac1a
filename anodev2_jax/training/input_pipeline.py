"""How the training batches reach the train step (``config.input_pipeline``).

- ``"host"``: every step, numpy takes the batch's rows of the host dataset, they are copied
  to the devices and the train step is dispatched: one dispatch per step.
- ``"device"``: the uint8 training set is placed on the devices once; every epoch its order
  (:func:`anodev2_jax.training.data.epoch_batches`, the host path's, so both see the same batches)
  goes to the devices once, and one dispatch runs up to ``steps_per_dispatch`` train steps
  in a jitted ``lax.scan`` that gathers each step's batch on the device. Nothing
  differentiates through the scan, so the slow scanned backward pass of XLA:CPU does not
  arise. What the host path spends per step (indexing, a host→device copy, a dispatch)
  would dominate a step as small as ResNet-4's on a GPU.
- ``"auto"``: ``"host"`` with the CPU speed-ups (JAX's default backend is the CPU),
  ``"device"`` elsewhere (:func:`anodev2_jax.backend.input_pipeline`).

Both run the same train step on the same batches. With ``conv_impl="cpu"`` (the CPU's
default) and one seed the device path is bit-identical to the host path on one XLA:CPU
device. Otherwise it is equal to float32 rounding (measured: 1e-5 to 2e-5 apart after 6
steps): with XLA's convolution, XLA:CPU keeps the backward convolutions inside a while body
in their folded-transpose form instead of rewriting them into its canonical layout, so they
sum in another order; with several seeds looped in one step, some of their sums are
ordered differently inside the loop. Either way the device path's numbers
do not depend on how its steps are split into dispatches, so a resumed run is bit-identical.

The dataset is replicated on every device, not split over ``data``. Split on the gathered
axis, XLA's SPMD partitioner gathers each batch as an all-gather of the (B,) row indices, a
masked gather of all B rows from each device's shard, an all-reduce of the whole (B, 32, 32,
3) uint8 batch and a slice of each device's rows (the compiled HLO on 2 CPU devices): no
all-gather of the dataset, but B·3 KiB all-reduced every step, 25 times the 30 KiB of
ResNet-4's gradient all-reduce at B = 256. Replicated, each device gathers its own rows with
no communication, for CIFAR-10's 146 MiB on every device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from anodev2_jax import backend
from anodev2_jax.training import parallel

PIPELINES = ("auto", "host", "device")

PyTree = Any
# (number of steps taken after a dispatch, steps in it, its metrics on the device)
Dispatch = tuple[int, int, PyTree]


def resolve_pipeline(pipeline: str) -> str:
    """``"host"`` or ``"device"``: what ``pipeline`` (one of PIPELINES) means here."""
    if pipeline not in PIPELINES:
        raise ValueError(f"input_pipeline={pipeline!r} is unknown; use one of {PIPELINES}")
    return backend.input_pipeline(pipeline)


def dispatch_lengths(
    offset: int, steps_per_epoch: int, log_every_steps: int, steps_per_dispatch: int
) -> list[int]:
    """The number of steps of each dispatch from step ``offset`` of an epoch to its end.

    Runs of ``steps_per_dispatch`` steps, cut at every log boundary (every
    ``log_every_steps`` steps from ``offset``, as the loop logs) and at the epoch's end, so
    no dispatch crosses either; at most three lengths occur in an epoch (compilations).
    """
    lengths = []
    for start in range(offset, steps_per_epoch, log_every_steps):
        full, rest = divmod(min(log_every_steps, steps_per_epoch - start), steps_per_dispatch)
        lengths += [steps_per_dispatch] * full + ([rest] if rest else [])
    return lengths


def make_multi_step(train_step: Callable, num_steps: int, mesh: Mesh) -> Callable:
    """``num_steps`` train steps in one function, each on a batch gathered on the device.

    train_step: ``(state, images, labels) -> (state, metrics)``, as
    :func:`anodev2_jax.training.make_train_step` (or its seeds-mapped form). Returns
    ``multi_step(state, images, labels, order, start) -> (state, metrics)`` with images
    (N, 32, 32, 3) uint8 and labels (N,) int32 the whole training set, order (S, B) int32
    an epoch's rows, start () the first of the ``num_steps`` batches to take; every leaf of
    metrics gets a leading (num_steps,) axis.
    """
    batch = parallel.batch_sharded(mesh)

    def multi_step(state, images, labels, order, start):
        rows = jax.lax.dynamic_slice_in_dim(order, start, num_steps)

        def step(state, batch_rows):
            # The batch split over data, as the host path hands it to the same step.
            inputs = jax.lax.with_sharding_constraint(
                (images[batch_rows], labels[batch_rows]), batch
            )
            return train_step(state, *inputs)

        return jax.lax.scan(step, state, rows)

    return multi_step


class Input(Protocol):
    """What the training loop asks of an input pipeline."""

    steps_per_dispatch: int

    def epoch(self, order: np.ndarray) -> Any:
        """An epoch's (S, B) rows (host int64) in the form :meth:`run` takes."""
        ...

    def run(self, state: PyTree, order: Any, start: int, num_steps: int) -> tuple[PyTree, Any]:
        """``num_steps`` steps from step ``start`` of the epoch in one dispatch."""
        ...

    def fetch(self, pending: list[Dispatch]) -> list[tuple[int, dict[str, np.ndarray]]]:
        """The (step, metrics) of every step in ``pending``, on the host."""
        ...


class HostInput:
    """One dispatch per step, its batch indexed on the host and copied to the devices."""

    steps_per_dispatch = 1

    def __init__(
        self,
        train_step: Callable,
        images: np.ndarray,
        labels: np.ndarray,
        mesh: Mesh,
        compiled: Callable | None = None,
    ):
        """train_step: as for :func:`make_multi_step`; images (N, 32, 32, 3) uint8 and labels
        (N,) int32 on the host; compiled: train_step already jitted by
        :func:`parallel.jit_data_parallel` (state donated) and compiled, used as it is."""
        self.step = compiled or parallel.jit_data_parallel(
            train_step, mesh, num_batch_args=2, donate_state=True
        )
        self.images, self.labels, self.mesh = images, labels, mesh

    def epoch(self, order: np.ndarray) -> np.ndarray:
        """The epoch's (S, B) rows as :meth:`run` takes them: on the host, as they are."""
        return order

    def run(self, state: PyTree, order: np.ndarray, start: int, num_steps: int):
        """Step ``start`` of the epoch (``num_steps`` is 1); returns the state and metrics."""
        rows = order[start][parallel.process_slice(order.shape[1])]
        batch = (self.images[rows], self.labels[rows])
        return self.step(state, *parallel.global_batch(batch, self.mesh))

    def fetch(self, pending: list[Dispatch]) -> list[tuple[int, dict[str, np.ndarray]]]:
        """The (step, metrics) of every step in ``pending``, on the host."""
        host = jax.device_get([metrics for _, _, metrics in pending])
        return [(step, metrics) for (step, _, _), metrics in zip(pending, host, strict=True)]


class DeviceInput:
    """The training set on the devices, several steps per dispatch (:func:`make_multi_step`)."""

    def __init__(
        self,
        train_step: Callable,
        images: np.ndarray,
        labels: np.ndarray,
        mesh: Mesh,
        steps_per_dispatch: int,
    ):
        """images (N, 32, 32, 3) uint8 and labels (N,) int32 on the host, equal on every
        process: placed once, replicated (see the module docstring for why)."""
        self.train_step, self.mesh = train_step, mesh
        self.steps_per_dispatch = steps_per_dispatch
        self.images, self.labels = parallel.replicate((images, labels), mesh)
        self.compiled: dict[int, Callable] = {}

    def epoch(self, order: np.ndarray) -> jax.Array:
        """The epoch's (S, B) rows on the devices as int32, the batch axis split over data;
        each process provides the columns of its :func:`parallel.process_slice`."""
        local = order[:, parallel.process_slice(order.shape[1])].astype(np.int32)
        sharding = parallel.steps_batch_sharded(self.mesh)
        return jax.make_array_from_process_local_data(sharding, local, order.shape)

    def multi_step(self, num_steps: int) -> Callable:
        """The jitted :func:`make_multi_step` of ``num_steps`` (one compilation per length)."""
        if num_steps not in self.compiled:
            replicated = parallel.replicated(self.mesh)
            self.compiled[num_steps] = jax.jit(
                make_multi_step(self.train_step, num_steps, self.mesh),
                in_shardings=(replicated,) * 3
                + (parallel.steps_batch_sharded(self.mesh), replicated),
                out_shardings=replicated,
                donate_argnums=(0,),
            )
        return self.compiled[num_steps]

    def run(self, state: PyTree, order: jax.Array, start: int, num_steps: int):
        """Steps ``start``, …, ``start + num_steps - 1`` of the epoch in one dispatch; returns
        the state and the metrics, each with a leading (num_steps,) axis."""
        return self.multi_step(num_steps)(state, self.images, self.labels, order, np.int32(start))

    def fetch(self, pending: list[Dispatch]) -> list[tuple[int, dict[str, np.ndarray]]]:
        """The (step, metrics) of every step in ``pending``, on the host."""
        host = jax.device_get([metrics for _, _, metrics in pending])
        return [
            (step - num_steps + 1 + i, {name: value[i] for name, value in metrics.items()})
            for (step, num_steps, _), metrics in zip(pending, host, strict=True)
            for i in range(num_steps)
        ]


def make_input(
    pipeline: str,
    train_step: Callable,
    images: np.ndarray,
    labels: np.ndarray,
    mesh: Mesh,
    steps_per_dispatch: int,
    compiled: Callable | None = None,
) -> Input:
    """The input pipeline ``pipeline`` (one of PIPELINES) of ``train_step`` on a training set.

    train_step: ``(state, images, labels) -> (state, metrics)``, not jitted; images
    (N, 32, 32, 3) uint8 and labels (N,) int32 on the host; steps_per_dispatch: ≥ 1, used
    by the device pipeline only; compiled: the host pipeline's step if already compiled
    (:func:`anodev2_jax.training.compile_train_step`).
    """
    if resolve_pipeline(pipeline) == "host":
        return HostInput(train_step, images, labels, mesh, compiled)
    return DeviceInput(train_step, images, labels, mesh, steps_per_dispatch)
