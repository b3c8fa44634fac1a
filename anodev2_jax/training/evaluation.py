"""Evaluating a run's state on the test set, and the results a run reports.

Accuracies are computed twice at the end of a run: with BatchNorm on its running statistics
(eval mode, the reported number) and on the batch statistics of the test batches in a fixed
random order (a second measure of the same weights, which says when the running statistics
do not fit the network).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from anodev2_jax.training import parallel
from anodev2_jax.training import seeds as seeds_lib
from anodev2_jax.training.config import data_seed, seeds_of


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


def test_metrics(eval_step, state, dataset, config, mesh) -> list[dict[str, float]]:
    """The test set's loss and accuracy, one dict per seed."""
    metrics = evaluate(
        eval_step, state, dataset.test_images, dataset.test_labels, config.eval_batch_size, mesh
    )
    return seeds_lib.per_seed(metrics, config.num_seeds)


def describe_test(test_metrics: list[dict[str, float]], seeds: list[int]) -> str:
    if len(seeds) == 1:
        only = test_metrics[0]
        return f"test loss {only['loss']:.4f}, accuracy {only['accuracy']:.4f}"
    accuracies = ", ".join(f"{m['accuracy']:.4f}" for m in test_metrics)
    return f"test accuracy {accuracies} (seeds {seeds[0]}–{seeds[-1]})"


def batch_statistics_check(
    eval_step: Any,
    state: Any,
    dataset: Any,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    test: list[dict[str, float]],
) -> list[float] | None:
    """The final test accuracy per seed again with BatchNorm on batch statistics (test set
    in a fixed random order), a second measure of the same weights; says so when eval mode
    is > 2 points below it, i.e. when the running statistics do not fit the trained network.

    eval_step: the run's eval step on batch statistics
    (:attr:`~anodev2_jax.training.steps.Steps.evaluate_batch_statistics`); test: the eval-mode
    metrics per seed. None when ``config.eval_batch_statistics`` is off.
    """
    if not config.eval_batch_statistics:
        return None
    order = np.random.default_rng(data_seed(config)).permutation(len(dataset.test_images))
    check = evaluate(
        eval_step,
        state,
        dataset.test_images,
        dataset.test_labels,
        config.eval_batch_size,
        mesh,
        order,
    )
    accuracies = [m["accuracy"] for m in seeds_lib.per_seed(check, config.num_seeds)]
    if jax.process_index() == 0:
        for seed, accuracy, metrics in zip(seeds_of(config), accuracies, test, strict=True):
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


def results(
    config: ml_collections.ConfigDict,
    test: list[dict[str, float]],
    check: list[float] | None,
    best_accuracy: np.ndarray,
    **facts: Any,
) -> dict:
    """The results dict of a run (``results.json``; see
    :func:`anodev2_jax.training.loop.train_and_evaluate`) from its final test metrics per seed,
    the batch-statistics check, the best test accuracy per seed, and ``facts`` (num_params,
    steps, wall_time_sec, data_source, devices, processes, gradients)."""
    seeds = seeds_of(config)
    per_seed = []
    for i, (seed, metrics) in enumerate(zip(seeds, test, strict=True)):
        numbers = {
            "final_test_accuracy": metrics["accuracy"],
            "final_test_loss": metrics["loss"],
        }
        if check is not None:
            numbers["final_test_accuracy_batch_statistics"] = check[i]
        numbers["best_test_accuracy"] = float(max(best_accuracy[i], metrics["accuracy"]))
        per_seed.append({"seed": seed, **numbers})
    names = [name for name in per_seed[0] if name != "seed"]
    single = {name: per_seed[0][name] for name in names} if len(seeds) == 1 else {}
    ordered = ("num_params", "steps", "wall_time_sec", "data_source", "devices", "processes")
    return {
        **single,
        **{name: facts[name] for name in ordered},
        "seeds": seeds,
        "gradients": facts["gradients"],
        "per_seed": per_seed,
        "summary": {name: seeds_lib.summary([r[name] for r in per_seed]) for name in names},
        "config": config.to_dict(),
    }


def per_seed_results(results: dict) -> list[dict]:
    """The per-seed entries of a results.json dict, also for one written before num_seeds
    existed (a single seed, its numbers at the top level)."""
    if "per_seed" in results:
        return list(results["per_seed"])
    names = ("final_test_accuracy", "final_test_loss", "final_test_accuracy_batch_statistics")
    single = {name: results[name] for name in (*names, "best_test_accuracy") if name in results}
    return [{"seed": results["config"]["seed"], **single}]
