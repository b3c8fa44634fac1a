"""The reproduction report: ``results.json``, ``results.md`` and ``test_accuracy.png``.

All three are recomputed from the cells' own ``results.json`` and ``metrics.jsonl`` files (and
the parameter counts from the model definitions) every time a cell finishes, so the report
never holds a number that no cell's records hold.
"""

from __future__ import annotations

import copy
import datetime
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from anodev2_jax import training
from anodev2_jax.nn import models
from anodev2_jax.training import figures, metrics, paper
from anodev2_jax.training import seeds as seeds_lib
from anodev2_jax.training.protocol import CONFIG_FILE, Cell, plain

ACCURACY_FIGURE = "test_accuracy.png"  # per-epoch test accuracy of every started cell


def duration(seconds: float) -> str:
    total = round(seconds)
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


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
    """What the report says of one cell, from its results.json (accuracies in percent) and
    its metrics.jsonl (the training time)."""
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
        training_time_sec=metrics.training_seconds(
            metrics.read_metrics(cell.workdir / "metrics.jsonl"),
            results["config"]["batch_size"] * len(per_seed),
        ),
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
        "protocol": plain(protocol),
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
    lines += _accuracy_rows(cells, baseline)
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
    ]
    lines += _per_seed_section(finished)
    lines += _worst_against_best_section(finished, baseline)
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
    lines += _parameter_rows(report["parameters"], finished)
    return "\n".join(lines) + "\n"


def _accuracy_rows(cells: list[dict], baseline: Mapping[str, dict]) -> list[str]:
    """One row per cell of the accuracy table; differences to the same model's baseline."""
    lines = []
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
    return lines


def _per_seed_section(finished: list[dict]) -> list[str]:
    """The per-seed table: one row per seed of every finished cell, then what its training
    time counts."""
    lines = [
        "",
        "## Per seed",
        "",
        "| model | variant | seed | eval mode | batch statistics | best epoch's, eval mode | "
        "cell training time |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in finished:
        for r in c["per_seed"]:
            bs = r["test_accuracy_batch_statistics"]
            lines.append(
                f"| {paper.MODEL_NAMES[c['model']]} | {c['variant']} | {r['seed']} | "
                f"{r['test_accuracy']:.2f} | {'–' if bs is None else f'{bs:.2f}'} | "
                f"{r['best_test_accuracy']:.2f} | {duration(c['training_time_sec'])} |"
            )
    lines += [
        "",
        "Training time: the cell's logged train windows summed (steps × batch size × seeds "
        "over the logged images per second), every stretch of a resumed cell, evaluation and "
        "checkpointing left out; its seeds train together.",
    ]
    return lines


def _worst_against_best_section(finished: list[dict], baseline: Mapping[str, dict]) -> list[str]:
    """Each finished cell's worst seed minus its model's best baseline seed, beside the
    paper's; nothing where no finished cell has a finished baseline."""
    rows = []
    for c in finished:
        base = baseline.get(c["model"])
        if c["variant"] == "baseline" or base is None:
            continue
        ours = c["test_accuracy"]["min"] - base["test_accuracy"]["max"]
        reported = c["paper_test_accuracy"]["min"] - base["paper_test_accuracy"]["max"]
        rows.append(
            f"| {paper.MODEL_NAMES[c['model']]} | {c['variant']} | {_signed(ours)} | "
            f"{_signed(reported)} |"
        )
    if not rows:
        return []
    return [
        "",
        "## Worst seed against the baseline's best",
        "",
        "The lowest seed of a cell minus the highest seed of the same model's baseline: above "
        "zero, every seed beat every baseline seed.",
        "",
        "| model | variant | ours | paper |",
        "| --- | --- | ---: | ---: |",
        *rows,
    ]


def _parameter_rows(parameters: list[dict], finished: list[dict]) -> list[str]:
    """One row per model × variant of Table 3: the trained count where the cell finished."""
    lines = []
    trained = {(c["model"], c["variant"]): c["num_params"] for c in finished}
    for p in parameters:
        ours = trained.get((p["model"], p["variant"]), p["ours"])
        lines.append(
            f"| {paper.MODEL_NAMES[p['model']]} | {p['variant']} | {ours:,} | "
            f"{p['ours_per_evaluation_norm_params']:,} | {p['paper_k']:.2f}K |"
        )
    return lines
