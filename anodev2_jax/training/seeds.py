"""Several seeds of one run in one compiled program (``config.num_seeds``).

A run with ``num_seeds = k`` trains the seeds ``config.seed + i``, i = 0 … k-1, together: its
train state (parameters, BatchNorm statistics, optimizer state, PRNG key and step) carries a
leading seed axis of size k. Seed s starts from the initialization of a single run with
``config.seed = s`` and draws its own augmentation; all seeds see the same batches, in the
order of the data seed (``config.data_seed``, default ``config.seed``). Seed i of such a run
is therefore a single run with ``seed = config.seed + i`` and ``data_seed = config.seed``.

The train and eval steps map a per-seed step over the seed axis in one of two ways, which
compute the same numbers (up to summation order):

- ``"vmap"``: ``jax.vmap``, one batched program; how k small models fill a GPU or TPU.
- ``"loop"``: the k per-seed steps one after another inside the one jitted program, an
  unrolled Python loop (k copies of the step in the program). On XLA:CPU, ``vmap`` over
  weights turns every convolution into a grouped convolution, several times slower than
  separate steps, while the loop runs as fast as them (``benchmarks/seeds.py`` measures
  both). ``jax.lax.map`` is as fast too and compiles one copy, but XLA rounds its loop body
  differently from a separate step, and training amplifies that (measured: 7e-2 apart after
  12 steps), where the unrolled loop stays within float32 rounding of the separate runs
  (2e-7).
- ``"auto"``: ``"loop"`` with the CPU speed-ups (JAX's default backend is the CPU), ``"vmap"``
  elsewhere (:func:`anodev2_jax.backend.seed_batching`).

``num_seeds = 1`` keeps the state without a seed axis: exactly the single-seed run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anodev2_jax import backend

PyTree = Any

BATCHINGS = ("auto", "loop", "vmap")


def resolve_batching(batching: str) -> str:
    """``"loop"`` or ``"vmap"``: the strategy ``batching`` (one of BATCHINGS) means here."""
    if batching not in BATCHINGS:
        raise ValueError(f"seed_batching={batching!r} is unknown; use one of {BATCHINGS}")
    return backend.seed_batching(batching)


def seed_list(first_seed: int, num_seeds: int) -> list[int]:
    """The seeds of a run: first_seed, first_seed + 1, …, first_seed + num_seeds - 1."""
    return [first_seed + i for i in range(num_seeds)]


def stack(trees: Sequence[PyTree]) -> PyTree:
    """k pytrees of equal structure -> one pytree whose leaves have a leading (k,) seed axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def select(tree: PyTree, index: int) -> PyTree:
    """Seed ``index`` of a pytree with a leading seed axis (leaves (k, ...) -> (...))."""
    return jax.tree.map(lambda leaf: leaf[index], tree)


def over_seeds(step: Callable[..., Any], num_seeds: int, batching: str) -> Callable[..., Any]:
    """``step(state, *batch) -> out`` for a state with a leading seed axis of ``num_seeds``.

    step: a per-seed function of one state and batch arguments shared by all seeds.
    Returns a function of the same form whose state and outputs have the seed axis; with
    ``num_seeds=1``, ``step`` itself (no seed axis). ``batching``: one of BATCHINGS.
    """
    if num_seeds == 1:
        return step
    if resolve_batching(batching) == "vmap":

        def batched(state: PyTree, *batch: Any) -> Any:
            return jax.vmap(lambda one: step(one, *batch))(state)  # the batch is shared

        return functools.wraps(step)(batched)

    def looped(state: PyTree, *batch: Any) -> Any:
        return stack([step(select(state, i), *batch) for i in range(num_seeds)])

    return functools.wraps(step)(looped)


def per_seed(values: dict[str, Any], num_seeds: int) -> list[dict[str, float]]:
    """Host copies of () or (k,) metrics -> one dict of Python floats per seed.

    values: name -> scalar (a run with num_seeds = 1) or (k,) array (a seed axis).
    """
    host = {name: np.asarray(value) for name, value in values.items()}
    if num_seeds == 1:
        return [{name: float(value) for name, value in host.items()}]
    return [{name: float(value[i]) for name, value in host.items()} for i in range(num_seeds)]


def summary(values: Sequence[float]) -> dict[str, float]:
    """min, max and mean of one quantity over seeds."""
    array = np.asarray(values, dtype=np.float64)
    return {"min": float(array.min()), "max": float(array.max()), "mean": float(array.mean())}
