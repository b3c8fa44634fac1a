"""Reproducing the paper's tables: a protocol's cells, trained one after another, and the report.

A protocol (``configs/protocols/*.py``) is data: models, variants, seeds, epochs and training
fields. Each cell, one model × variant, is one :func:`anodev2_jax.training.train_and_evaluate`
run of all the protocol's seeds (``config.num_seeds``) in ``WORKDIR/MODEL-VARIANT``. A cell
with a ``results.json`` is finished and skipped; a cell that started (``config.json``, written
before it trains) resumes from its last checkpoint; both must have been made with the same
config as the protocol now asks (up to :data:`RUN_MECHANICS`), else a ``ValueError`` names the
fields that differ before anything trains. After every cell the report is rewritten:
``WORKDIR/results.json`` and ``WORKDIR/results.md``, both computed from the cells'
``results.json`` files alone (and parameter counts from the model definitions), and
``WORKDIR/test_accuracy.png``, the per-epoch test accuracy of every started cell.

Epochs: ``protocol.num_epochs = None`` keeps each model config's own (the paper's 350, AlexNet
120, with its decay epochs); a number compresses the model's step schedule to that length,
every decay epoch scaled by ``num_epochs / model's num_epochs`` (fractions allowed).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from anodev2_jax import training
from anodev2_jax.nn import models
from anodev2_jax.training import figures, paper
from anodev2_jax.training import seeds as seeds_lib

# Config fields that change how a cell runs but not what it computes (up to summation order):
# a finished or started cell may differ from the protocol in these.
RUN_MECHANICS = (
    "progress_bar",
    "log_every_steps",
    "checkpoint_every_epochs",
    "max_checkpoints_to_keep",
    "cpu_malloc",
    "conv_impl",
    "seed_batching",
    "input_pipeline",
    "steps_per_dispatch",
    "memory_budget_gb",
    "eval_batch_size",
    "data_dir",
    "download",
)
PROTOCOL_FIELDS = (
    "name",
    "models",
    "variants",
    "num_seeds",
    "first_seed",
    "num_epochs",
    "training",
)
CONFIG_FILE = "config.json"
ACCURACY_FIGURE = "test_accuracy.png"  # per-epoch test accuracy of every started cell


@dataclasses.dataclass(frozen=True)
class Cell:
    """One model × variant of a protocol: its training config and its run directory."""

    model: str
    variant: str
    config: ml_collections.ConfigDict
    workdir: Path

    @property
    def name(self) -> str:
        return f"{self.model}-{self.variant}"


# -- the cells -------------------------------------------------------------------------------------
def check_protocol(protocol: ml_collections.ConfigDict) -> None:
    """ValueError naming the bad protocol field, before anything is built or trained."""
    missing = [name for name in PROTOCOL_FIELDS if name not in protocol]
    if missing:
        raise ValueError(f"the protocol lacks the fields {missing}; see configs/protocols/cpu.py")
    for name, allowed in (("models", models.MODELS), ("variants", models.VARIANTS)):
        chosen = list(protocol[name])
        unknown = [value for value in chosen if value not in allowed]
        if unknown or not chosen or len(set(chosen)) != len(chosen):
            raise ValueError(
                f"protocol.{name}={tuple(chosen)} must be distinct names out of {allowed} "
                f"(unknown: {unknown}); e.g. --{name}={','.join(allowed[:2])}"
            )
    if not isinstance(protocol.num_seeds, int) or protocol.num_seeds < 1:
        raise ValueError(f"protocol.num_seeds={protocol.num_seeds!r} must be a positive integer")
    if not isinstance(protocol.first_seed, int) or protocol.first_seed < 0:
        raise ValueError(
            f"protocol.first_seed={protocol.first_seed!r} must be a non-negative integer"
        )
    epochs = protocol.num_epochs
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise ValueError(
            f"protocol.num_epochs={epochs!r} must be a positive integer, or None for each "
            "model config's own"
        )


def cell_config(
    protocol: ml_collections.ConfigDict,
    base: ml_collections.ConfigDict,
    variant: str,
    overrides: Mapping[str, Any] | None = None,
) -> ml_collections.ConfigDict:
    """The training config of one cell: ``base`` (configs/MODEL.py) with the protocol's
    variant, seeds, epochs (schedule compressed), training fields and the variant's own
    training fields, then ``overrides``."""
    config = copy.deepcopy(base)
    config.variant = variant
    config.seed = protocol.first_seed
    config.num_seeds = protocol.num_seeds
    if protocol.num_epochs is not None and protocol.num_epochs != base.num_epochs:
        scale = protocol.num_epochs / base.num_epochs
        config.num_epochs = protocol.num_epochs
        config.lr_decay_epochs = tuple(epoch * scale for epoch in base.lr_decay_epochs)
    per_variant = protocol.variant_training.get(variant, {})
    sources = (
        ("protocol.training", dict(protocol.training)),
        (f"protocol.variant_training.{variant}", dict(per_variant)),
        ("--set", overrides or {}),
    )
    for source, fields in sources:
        for name, value in fields.items():
            if name not in config:
                raise ValueError(
                    f"{source} sets {name}={value!r}, which is not a training config field "
                    "(configs/default.py)"
                )
            try:
                config[name] = value
            except TypeError as error:
                raise ValueError(f"{source} sets {name}={value!r}: {error}") from None
    training.check_config(config)
    return config


def make_cells(
    protocol: ml_collections.ConfigDict,
    model_configs: Mapping[str, ml_collections.ConfigDict],
    workdir: str | Path,
    overrides: Mapping[str, Any] | None = None,
) -> list[Cell]:
    """Every model × variant of ``protocol``, model-major, each validated (check_config).

    model_configs: model name -> its config (``configs/MODEL.py``'s get_config()).
    """
    check_protocol(protocol)
    absent = [model for model in protocol.models if model not in model_configs]
    if absent:
        raise ValueError(f"no training config for the models {absent}; pass configs/MODEL.py's")
    root = Path(workdir)
    cells = []
    for model in protocol.models:
        for variant in protocol.variants:
            config = cell_config(protocol, model_configs[model], variant, overrides)
            cells.append(Cell(model, variant, config, root / f"{model}-{variant}"))
    return cells


def _plain(config: ml_collections.ConfigDict | dict) -> dict:
    """A config as results.json holds it (JSON types: lists for tuples)."""
    raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    return json.loads(json.dumps(raw, default=str))


def config_differences(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """'FIELD: SAVED -> NOW' for each field (not in RUN_MECHANICS) that differs."""
    now = _plain(config)
    return [
        f"{name}: {saved.get(name)!r} -> {now.get(name)!r}"
        for name in sorted(set(saved) | set(now))
        if name not in RUN_MECHANICS and saved.get(name) != now.get(name)
    ]


def cell_status(cell: Cell) -> str:
    """'finished' (results.json), 'started' (config.json: resumes) or 'pending'.

    Raises ValueError when the cell was made with another config than ``cell.config``.
    """
    for status, name in (("finished", "results.json"), ("started", CONFIG_FILE)):
        path = cell.workdir / name
        if not path.exists():
            continue
        saved = json.loads(path.read_text())
        differences = config_differences(
            saved["config"] if status == "finished" else saved, cell.config
        )
        if differences:
            raise ValueError(
                f"cell {cell.name} in {cell.workdir} was {status} with another config than "
                f"this protocol asks ({'; '.join(differences)}). Use another --workdir, or "
                "move that directory away to train the cell again."
            )
        return status
    return "pending"


# -- running ---------------------------------------------------------------------------------------
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
            f"ETA {_duration(remaining * trained_seconds / trained_epochs)} at the "
            f"{_duration(trained_seconds / trained_epochs)} per epoch measured so far"
            if trained_epochs
            else "ETA after the first cell"
        )
        log(
            f"[{len(cells) - len(todo) + i}/{len(cells)} done, elapsed "
            f"{_duration(time.time() - start)}, {eta}] {cell.name}: "
            f"{'resuming' if statuses[cell.name] == 'started' else 'starting'}, seeds "
            f"{seed_range_text(cell)}, {_plural(cell.config.num_epochs, 'epoch')}, "
            f"in {cell.workdir}"
        )
        cell.workdir.mkdir(parents=True, exist_ok=True)
        if not (cell.workdir / CONFIG_FILE).exists():
            training.write_json_atomic(cell.workdir / CONFIG_FILE, _plain(cell.config))
        first_epoch = _epochs_done(cell)
        tick = time.time()
        training.train_and_evaluate(cell.config, cell.workdir)
        trained_seconds += time.time() - tick
        trained_epochs += cell.config.num_epochs - first_epoch
        report = write_report(protocol, cells, root, counts, command)
    log(
        f"{len(cells)}/{len(cells)} cells finished ({_duration(time.time() - start)} this "
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


def _duration(seconds: float) -> str:
    total = round(seconds)
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


# -- the report ------------------------------------------------------------------------------------
def parameter_counts(cells: Sequence[Cell]) -> dict[tuple[str, str], dict[str, int]]:
    """(model, variant) -> {"shared": params of the cell's model, "per_evaluation": with one
    BatchNorm scale and offset per f evaluation (the baseline: the same, no ODE blocks)}."""
    counts = {}
    for cell in cells:
        entry = {"shared": _count(cell.config)}
        if cell.variant == "baseline":
            entry["per_evaluation"] = entry["shared"]
        else:
            per_evaluation = copy.deepcopy(cell.config)
            per_evaluation.norm_params = "per_evaluation"
            entry["per_evaluation"] = _count(per_evaluation)
        counts[(cell.model, cell.variant)] = entry
    return counts


def _count(config: ml_collections.ConfigDict) -> int:
    model = training.model_from_config(config)
    dummy = jax.ShapeDtypeStruct((1, *models.IMAGE_SHAPE), jnp.dtype(config.dtype))
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), dummy)
    return models.count_params(shapes["params"])


def cell_summary(cell: Cell, root: Path) -> dict[str, Any]:
    """What the report says of one cell, computed from its results.json alone (percent)."""
    reported = paper.ACCURACY[(cell.model, cell.variant)]
    entry: dict[str, Any] = {
        "model": cell.model,
        "variant": cell.variant,
        "workdir": str(cell.workdir.relative_to(root)),
        "paper_tables": paper.TABLES[cell.variant],
        "paper_test_accuracy": dict(zip(("min", "max", "mean"), reported, strict=True)),
        "paper_epochs": paper.EPOCHS[cell.model],
        "paper_seeds": paper.NUM_SEEDS,
    }
    path = cell.workdir / "results.json"
    if not path.exists():
        entry["status"] = "started" if (cell.workdir / CONFIG_FILE).exists() else "pending"
        return entry
    results = json.loads(path.read_text())
    runs = training.per_seed_results(results)
    per_seed = [
        {
            "seed": run["seed"],
            "test_accuracy": 100 * run["final_test_accuracy"],
            "test_accuracy_batch_statistics": (
                100 * run["final_test_accuracy_batch_statistics"]
                if "final_test_accuracy_batch_statistics" in run
                else None
            ),
            "best_test_accuracy": 100 * run["best_test_accuracy"],
        }
        for run in runs
    ]
    batch_statistics = [r["test_accuracy_batch_statistics"] for r in per_seed]
    entry.update(
        status="finished",
        seeds=[r["seed"] for r in per_seed],
        num_epochs=results["config"]["num_epochs"],
        lr_decay_epochs=results["config"]["lr_decay_epochs"],
        steps=results["steps"],
        data_source=results["data_source"],
        num_params=results["num_params"],
        wall_time_sec=results["wall_time_sec"],
        test_accuracy=seeds_lib.summary([r["test_accuracy"] for r in per_seed]),
        test_accuracy_batch_statistics=(
            seeds_lib.summary(batch_statistics) if None not in batch_statistics else None
        ),
        per_seed=per_seed,
    )
    return entry


def write_report(
    protocol: ml_collections.ConfigDict,
    cells: Sequence[Cell],
    root: Path,
    counts: Mapping[tuple[str, str], Mapping[str, int]],
    command: str,
) -> dict:
    """Write ``root/results.json``, ``root/results.md`` and, once a cell has a test record,
    ``root/test_accuracy.png`` (each atomically); return the dict."""
    summaries = [cell_summary(cell, root) for cell in cells]
    report = {
        "protocol": _plain(protocol),
        "command": command,
        "written": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cells_finished": sum(s["status"] == "finished" for s in summaries),
        "cells": summaries,
        "parameters": [
            {
                "model": model,
                "variant": variant,
                "ours": entry["shared"],
                "ours_per_evaluation_norm_params": entry["per_evaluation"],
                "paper_k": paper.PARAMS_K[(model, variant)],
            }
            for (model, variant), entry in counts.items()
        ],
    }
    training.write_json_atomic(root / "results.json", report)
    _write_text_atomic(root / "results.md", results_markdown(report))
    started = [cell.workdir for cell in cells if (cell.workdir / CONFIG_FILE).exists()]
    curves = [c for c in map(figures.accuracy_curve, started) if len(c.epochs)]
    if curves:
        figures.save_figure(figures.plot_accuracy_curves(curves), root / ACCURACY_FIGURE)
    return report


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _range(summary: Mapping[str, float] | None) -> str:
    """'min / max, mean' with two decimals (the paper's format); an en dash for None."""
    if summary is None:
        return "–"
    return f"{summary['min']:.2f} / {summary['max']:.2f}, {summary['mean']:.2f}"


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f}".replace("-", "−")


def results_markdown(report: dict) -> str:
    """results.md: the accuracy table beside the paper's, per-seed numbers, Table 3."""
    protocol = report["protocol"]
    cells = report["cells"]
    finished = [c for c in cells if c["status"] == "finished"]
    sources = sorted({c["data_source"] for c in finished}) or ["–"]
    baseline = {
        c["model"]: c for c in finished if c["variant"] == "baseline"
    }  # differences are to the same model's baseline
    lines = [
        f"# Reproduction: protocol `{protocol['name']}`",
        "",
        f"Command: `{report['command']}`. Written {report['written']}; "
        f"{report['cells_finished']} of {len(cells)} cells finished. Data: "
        f"{', '.join(sources)}.",
        "",
        "Every accuracy below is recomputed from the cells' `MODEL-VARIANT/results.json` "
        "(`per_seed`): CIFAR-10 test accuracy in %, after the last epoch, min / max, mean over "
        'the seeds. "Eval mode" uses the running BatchNorm statistics (what the paper '
        'reports); "batch statistics" evaluates the same weights with the moments of '
        "each test batch, a check of the running statistics. − baseline: mean minus the same "
        "model's baseline mean.",
        "",
        "## Test accuracy beside the paper (Tables 1, 2, 4)",
        "",
        f"Per epoch: [{ACCURACY_FIGURE}]({ACCURACY_FIGURE}) (mean over seeds, min–max band).",
        "",
        "| model | variant | paper table | seeds | epochs | ours, eval mode | paper | "
        "ours − baseline | paper − baseline | ours, batch statistics |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in cells:
        name = paper.MODEL_NAMES[c["model"]]
        reported = c["paper_test_accuracy"]
        paper_base = paper.ACCURACY[(c["model"], "baseline")][2]
        delta_paper = None if c["variant"] == "baseline" else reported["mean"] - paper_base
        if c["status"] != "finished":
            lines.append(
                f"| {name} | {c['variant']} | {c['paper_tables']} | – | – | {c['status']} | "
                f"{_range(reported)} | – | {_signed(delta_paper)} | – |"
            )
            continue
        base = baseline.get(c["model"])
        delta = (
            c["test_accuracy"]["mean"] - base["test_accuracy"]["mean"]
            if base is not None and c["variant"] != "baseline"
            else None
        )
        lines.append(
            f"| {name} | {c['variant']} | {c['paper_tables']} | {len(c['seeds'])} | "
            f"{c['num_epochs']} | {_range(c['test_accuracy'])} | {_range(reported)} | "
            f"{_signed(delta)} | {_signed(delta_paper)} | "
            f"{_range(c['test_accuracy_batch_statistics'])} |"
        )
    epochs = sorted({(c["model"], c["paper_epochs"]) for c in cells})
    lines += [
        "",
        "Paper: " + ", ".join(f"{paper.MODEL_NAMES[m]} {e} epochs" for m, e in epochs) + f", "
        f"{paper.NUM_SEEDS} seeds each. Ours: "
        + "; ".join(
            sorted(
                {
                    f"{paper.MODEL_NAMES[c['model']]} lr ÷10 at epochs "
                    + ", ".join(f"{e:g}" for e in c["lr_decay_epochs"])
                    + f" of {c['num_epochs']}"
                    for c in finished
                }
            )
            or ["–"]
        )
        + ".",
        "",
        "## Per seed",
        "",
        "| model | variant | seed | eval mode | batch statistics | best epoch's, eval mode | "
        "cell wall time (since its last resumption) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in finished:
        for r in c["per_seed"]:
            bs = r["test_accuracy_batch_statistics"]
            lines.append(
                f"| {paper.MODEL_NAMES[c['model']]} | {c['variant']} | {r['seed']} | "
                f"{r['test_accuracy']:.2f} | {'–' if bs is None else f'{bs:.2f}'} | "
                f"{r['best_test_accuracy']:.2f} | {_duration(c['wall_time_sec'])} |"
            )
    lines += [
        "",
        "## Parameter counts beside the paper (Table 3)",
        "",
        "Ours: the trained cell's `num_params` where it finished, else counted from the model "
        "definition (`models.count_params`). Per-evaluation: the same model with "
        '`config.norm_params="per_evaluation"` (one BatchNorm scale and offset per f '
        "evaluation in the ODE blocks, optional; not trained here).",
        "",
        "| model | variant | ours | ours, per-evaluation BatchNorm scale/offset | paper |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    trained = {(c["model"], c["variant"]): c["num_params"] for c in finished}
    for p in report["parameters"]:
        ours = trained.get((p["model"], p["variant"]), p["ours"])
        lines.append(
            f"| {paper.MODEL_NAMES[p['model']]} | {p['variant']} | {ours:,} | "
            f"{p['ours_per_evaluation_norm_params']:,} | {p['paper_k']:.2f}K |"
        )
    return "\n".join(lines) + "\n"


def seed_range_text(cell: Cell) -> str:
    """'0–2' (or '0' for one seed): the seeds of a cell."""
    seeds = seeds_lib.seed_list(cell.config.seed, cell.config.num_seeds)
    return f"{seeds[0]}–{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
