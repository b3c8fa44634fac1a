"""Checkpoints of a run's :class:`~anodev2_jax.training.steps.TrainState` (orbax).

A run saves to ``WORKDIR/checkpoints/STEP`` every ``config.checkpoint_every_epochs`` epochs,
at its end and when stopped by a signal; the same command resumes from the latest. Saves are
synchronous, so a checkpoint on disk is complete (orbax writes to a temporary folder and
renames it).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from anodev2_jax.training.config import make_optimizer, model_from_config
from anodev2_jax.training.steps import TrainState, create_state, state_step

PyTree = Any


def checkpoint_manager(directory: Path, **options: Any) -> ocp.CheckpointManager:
    """An orbax manager of TrainState checkpoints in ``directory`` (synchronous saves; a
    relative path is taken from the working directory, orbax wants absolute ones)."""
    return ocp.CheckpointManager(
        Path(directory).absolute(),
        item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, **options),
    )


def save(manager: ocp.CheckpointManager, state: TrainState) -> None:
    """Save ``state`` at its step, unless that step is saved already; return when written."""
    step = state_step(state)
    if manager.latest_step() != step:
        manager.save(step, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape")  # arrays, and the ShapeDtypeStructs of checkpoint metadata


def _leaf_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_array)
    return {jax.tree_util.keystr(path): tuple(x.shape) for path, x in leaves}


def _check_fits(manager: ocp.CheckpointManager, step: int, template: TrainState) -> None:
    """ValueError naming the leaves where the checkpoint at ``step`` does not fit
    ``template``; the one difference allowed is the one :func:`restore_checkpoint` mends,
    (C,) BatchNorm statistics where the model has (E, C)."""
    saved_tree = manager.item_metadata(step).tree
    saved = _leaf_shapes({"params": saved_tree["params"], "batch_stats": saved_tree["batch_stats"]})
    now = _leaf_shapes({"params": template.params, "batch_stats": template.batch_stats})

    def fits(path: str) -> bool:
        old, new = saved.get(path), now.get(path)
        if old == new:
            return True
        return (
            path.startswith("['batch_stats']")
            and new is not None
            and len(new) == 2
            and old == new[1:]
        )

    differ = sorted(path for path in saved.keys() | now.keys() if not fits(path))
    if differ:
        num_seeds = template.step.shape[0] if template.step.ndim else 1
        described = [f"{path}: {saved.get(path)} -> {now.get(path)}" for path in differ]
        raise ValueError(
            f"the checkpoint at step {step} in {manager.directory} does not fit this run's "
            f"model (checkpoint -> model, None where absent: {'; '.join(described[:4])}"
            f"{' …' if len(described) > 4 else ''}): it was written by a different "
            f"config.model, variant or num_seeds (this run: num_seeds={num_seeds}); resume it "
            "with that config, or use a new workdir"
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
    _check_fits(manager, step, template)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), template
    )
    saved_stats = manager.item_metadata(step).tree["batch_stats"]
    saved_shapes = [tuple(m.shape) for m in jax.tree.leaves(saved_stats, is_leaf=_is_array)]
    template_leaves, treedef = jax.tree.flatten(template.batch_stats)
    if all(s == t.shape for s, t in zip(saved_shapes, template_leaves, strict=True)):
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


def restore_run(workdir: Path, config: Any, sharding: Any = None) -> TrainState:
    """The latest checkpoint of the run in ``workdir``, made with ``config`` (every seed);
    ValueError naming the fix when the run has none."""
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise ValueError(f"{directory} holds no checkpoint; train the run first")
    manager = checkpoint_manager(directory)
    try:
        if manager.latest_step() is None:
            raise ValueError(f"{directory} holds no checkpoint; train the run first")
        model = model_from_config(config)
        optimizer = make_optimizer(config, steps_per_epoch=1)  # the state's structure only
        template = jax.eval_shape(lambda: create_state(model, optimizer, config))
        return restore_checkpoint(manager, template, sharding)
    finally:
        manager.close()
