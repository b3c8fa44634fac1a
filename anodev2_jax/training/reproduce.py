"""Reproducing the paper's tables: a protocol's cells, trained one after another.

``run`` trains every unfinished cell of a protocol (:mod:`anodev2_jax.training.protocol`)
in ``WORKDIR/MODEL-VARIANT``, skipping finished ones and resuming started ones, and
rewrites the report (:mod:`anodev2_jax.training.report`) after every cell.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_collections

from anodev2_jax import training
from anodev2_jax.training.protocol import (
    CONFIG_FILE,
    Cell,
    cell_status,
    check_protocol,
    make_cells,
    plain,
    seed_range_text,
)
from anodev2_jax.training.report import ACCURACY_FIGURE, duration, parameter_counts, write_report

__all__ = ["ACCURACY_FIGURE", "cell_status", "check_protocol", "make_cells", "run"]


def run(
    protocol: ml_collections.ConfigDict,
    model_configs: Mapping[str, ml_collections.ConfigDict],
    workdir: str | Path,
    *,
    overrides: Mapping[str, Any] | None = None,
    report_only: bool = False,
    command: str | None = None,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> dict:
    """Train every unfinished cell of ``protocol`` in ``workdir``; return the report dict.

    Every cell is built and checked first (a bad field or a cell made with another config
    stops here). ``report_only``: train nothing, only rewrite the report from the cells.
    ``command``: how the run was started, for the report (default: this process's argv).
    """
    root = Path(workdir).absolute()
    cells = make_cells(protocol, model_configs, root, overrides)
    statuses = {cell.name: cell_status(cell) for cell in cells}
    command = command or " ".join(["python", *sys.argv])
    counts = parameter_counts(cells)
    root.mkdir(parents=True, exist_ok=True)
    report = write_report(protocol, cells, root, counts, command)
    todo = [cell for cell in cells if statuses[cell.name] != "finished"]
    log(
        f"{len(cells) - len(todo)}/{len(cells)} cells of protocol {protocol.name!r} finished in "
        f"{root}" + ("" if report_only else f"; {len(todo)} to train")
    )
    if report_only:
        return report
    start, trained_epochs, trained_seconds = time.time(), 0.0, 0.0
    for i, cell in enumerate(todo):
        remaining = sum(other.config.num_epochs - _epochs_done(other) for other in todo[i:])
        eta = (
            f"ETA {duration(remaining * trained_seconds / trained_epochs)} at the "
            f"{duration(trained_seconds / trained_epochs)} per epoch measured so far"
            if trained_epochs
            else "ETA after the first cell"
        )
        log(
            f"[{len(cells) - len(todo) + i}/{len(cells)} done, elapsed "
            f"{duration(time.time() - start)}, {eta}] {cell.name}: "
            f"{'resuming' if statuses[cell.name] == 'started' else 'starting'}, seeds "
            f"{seed_range_text(cell)}, {_plural(cell.config.num_epochs, 'epoch')}, "
            f"in {cell.workdir}"
        )
        cell.workdir.mkdir(parents=True, exist_ok=True)
        if not (cell.workdir / CONFIG_FILE).exists():
            training.write_json_atomic(cell.workdir / CONFIG_FILE, plain(cell.config))
        first_epoch = _epochs_done(cell)
        tick = time.time()
        training.train_and_evaluate(cell.config, cell.workdir)
        trained_seconds += time.time() - tick
        trained_epochs += cell.config.num_epochs - first_epoch
        report = write_report(protocol, cells, root, counts, command)
    log(
        f"{len(cells)}/{len(cells)} cells finished ({duration(time.time() - start)} this "
        f"session); the tables are in {root / 'results.md'}"
    )
    return report


def _epochs_done(cell: Cell) -> float:
    """Epochs of the cell's latest checkpoint (0 without one, or before its first epoch
    ended): its step over the step of the first epoch's test record."""
    checkpoints = cell.workdir / "checkpoints"
    if not checkpoints.is_dir():
        return 0.0
    steps = [int(path.name) for path in checkpoints.iterdir() if path.name.isdigit()]
    records = training.read_metrics(cell.workdir / "metrics.jsonl")
    steps_per_epoch = next(
        (r["step"] for r in records if r["kind"] == "test" and r.get("epoch") == 1), None
    )
    return max(steps) / steps_per_epoch if steps and steps_per_epoch else 0.0


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
