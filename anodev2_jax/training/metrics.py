"""What a run records as it trains: ``metrics.jsonl``, TensorBoard events, atomic JSON.

One record per logged step and kind ("train", "test"), and per seed in a run with several
(with a "seed" field). A resumed run appends the steps after its checkpoint again;
:func:`read_metrics` keeps the later record where a (kind, step, seed) repeats.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or Inf loss."""


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


def training_seconds(records: list[dict], images_per_step: int) -> float:
    """The training time the train records log: per logged window, its steps times
    ``images_per_step`` (batch size × seeds) over its ``images_per_sec``, summed over the
    windows of one seed. Evaluation and checkpointing are left out; a resumed run's stretches
    add up, which a wall clock started at its last resumption does not."""
    train = [r for r in records if r["kind"] == "train"]
    if not train:
        return 0.0
    seed = train[0].get("seed")  # every seed's record holds the same rate
    windows = sorted((r["step"], r["images_per_sec"]) for r in train if r.get("seed") == seed)
    starts = [0] + [step for step, _ in windows[:-1]]
    return sum(
        (step - start) * images_per_step / rate
        for start, (step, rate) in zip(starts, windows, strict=True)
    )


def best_accuracies(records: list[dict], seeds: list[int]) -> np.ndarray:
    """The best test accuracy per seed in earlier metrics records (0 where none)."""
    best = np.zeros(len(seeds))
    for record in records:
        seed = record.get("seed", seeds[0])
        if record["kind"] == "test" and seed in seeds:
            index = seeds.index(seed)
            best[index] = max(best[index], record["accuracy"])
    return best


def check_finite(
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
