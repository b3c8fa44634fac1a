"""A convergence sweep of a trained run: accuracy against step count, method and statistics.

:func:`sweep` evaluates every seed of a run (:mod:`anodev2_jax.training.discretization`) at
each step count × method × BatchNorm statistics handling, and, for a ``conf2`` run, at each
weight step count too (its Nz and Nw vary apart). :func:`write_sweep` writes the rows as
``sweep.json``, a table ``sweep.md`` and a plot ``sweep.png``: test accuracy against Nz, one
line per method and statistics handling, with the forward FLOPs per image on a second axis, so
that the plot also reads as depth compression: how few steps the trained model tolerates, and
what that saves at inference.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from anodev2_jax import stepping
from anodev2_jax.training import discretization as disc
from anodev2_jax.training import figures, paper
from anodev2_jax.training import seeds as seeds_lib
from anodev2_jax.training.metrics import write_json_atomic

STEPS = (1, 2, 3, 5, 8, 10, 20, 50)
METHODS = ("euler", "rk2", "rk4")


def _row(evaluation: disc.Evaluation, trained: bool, varies: str) -> dict[str, Any]:
    accuracy = [100 * a for a in evaluation.accuracy]
    return {
        **dataclasses.asdict(evaluation),
        "accuracy": accuracy,
        "summary": seeds_lib.summary(accuracy),
        "trained": trained,
        "varies": varies,  # "num_z_steps" (Nw as the schedule ties it) or "num_w_steps"
    }


def sweep(
    run: disc.TrainedRun,
    steps: Sequence[int] = STEPS,
    methods: Sequence[str] = METHODS,
    bn_statistics: Sequence[str] = disc.BN_STATISTICS,
    weight_steps: Sequence[int] = (),
    recalibration_batches: int = 50,
    max_evaluations: int | None = None,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> list[dict[str, Any]]:
    """One row per setting × statistics handling (accuracy in %, per seed and summarized);
    a setting the run's schedule cannot take, or with more than ``max_evaluations`` f
    evaluations per ODE block (Nz·stages, the cost), gives a row with the reason under
    "skipped". ``weight_steps``: Nw values to sweep at the trained Nz and method (conf2)."""
    plan = run.plan
    if plan is None:
        raise ValueError(f"{run.workdir} is a baseline run: it has no ODE blocks to sweep")
    if "recalibrate" in bn_statistics:
        disc.recalibration_order(run, recalibration_batches)
    settings = [disc.Setting(nz, None, method) for method in methods for nz in steps]
    settings += [disc.Setting(None, nw, None) for nw in weight_steps]
    rows: list[dict[str, Any]] = []
    for setting in settings:
        try:
            overrides = disc.ode_overrides(run.config, setting)
        except ValueError as error:
            skipped = {**dataclasses.asdict(setting), "skipped": str(error).split(": ")[-1]}
            rows.append(skipped)
            log(f"skipped {setting}: {skipped['skipped']}")
            continue
        stages = len(stepping.TABLEAUS[overrides["method"]].c)
        if max_evaluations is not None and overrides["num_z_steps"] * stages > max_evaluations:
            reason = f"{overrides['num_z_steps'] * stages} f evaluations > {max_evaluations}"
            rows.append({**dataclasses.asdict(setting), "skipped": reason})
            continue
        trained = (
            overrides["num_z_steps"] == plan.num_z_steps
            and overrides["num_w_steps"] == plan.num_w_steps
            and overrides["method"] == plan.method
        )
        for mode in bn_statistics:
            evaluation = disc.evaluate_setting(run, setting, mode, recalibration_batches)
            varies = "num_z_steps" if setting.num_w_steps is None else "num_w_steps"
            rows.append(_row(evaluation, trained, varies))
            summary = rows[-1]["summary"]
            log(
                f"Nz={evaluation.num_z_steps} Nw={evaluation.num_w_steps} "
                f"{evaluation.method} {mode}: test accuracy {summary['mean']:.2f} % "
                f"(min {summary['min']:.2f}, max {summary['max']:.2f}), "
                f"{evaluation.flops_per_image / 1e6:.1f} MFLOP/image"
            )
    return rows


def sweep_markdown(rows: list[dict[str, Any]], title: str, command: str) -> str:
    """sweep.md: one line per evaluated setting and statistics handling, then the skipped."""
    lines = [
        f"# {title}",
        "",
        f"Command: `{command}`. Test accuracy in %, min / max, mean over the run's seeds; "
        "MFLOP/image: XLA's count of the eval step's forward pass. * marks the training "
        "setting.",
        "",
        "| Nz | Nw | method | BatchNorm statistics | accuracy min / max, mean | per seed | "
        "MFLOP/image |",
        "| ---: | ---: | --- | --- | ---: | --- | ---: |",
    ]
    for row in rows:
        if "skipped" in row:
            continue
        s = row["summary"]
        lines.append(
            f"| {row['num_z_steps']}{'*' if row['trained'] else ''} | {row['num_w_steps']} | "
            f"{row['method']} | {row['bn_statistics']} | "
            f"{s['min']:.2f} / {s['max']:.2f}, {s['mean']:.2f} | "
            f"{', '.join(f'{a:.2f}' for a in row['accuracy'])} | "
            f"{row['flops_per_image'] / 1e6:.1f} |"
        )
    skipped = [row for row in rows if "skipped" in row]
    if skipped:
        lines += ["", "Not evaluated (the schedule cannot take them, or over the cost cap):", ""]
        lines += [
            f"- Nz={r['num_z_steps']}, Nw={r['num_w_steps']}, method={r['method']}: {r['skipped']}"
            for r in skipped
        ]
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict[str, Any]], title: str) -> Any:
    """Test accuracy (mean, min–max band) against Nz per method and statistics handling, and
    MFLOP per image (dotted, right axis) per method."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.5))
    ax = figure.add_subplot()
    cost = ax.twinx()
    evaluated = [
        r for r in rows if "skipped" not in r and r.get("varies", "num_z_steps") == "num_z_steps"
    ]
    colours = dict(zip(METHODS, ("tab:blue", "tab:orange", "tab:green"), strict=True))
    styles = {"interpolate": "-", "recalibrate": "--"}
    for method in METHODS:
        for mode in styles:
            line = sorted(
                (r for r in evaluated if r["method"] == method and r["bn_statistics"] == mode),
                key=lambda r: (r["num_z_steps"], r["num_w_steps"]),
            )
            if not line:
                continue
            nz = [r["num_z_steps"] for r in line]
            mean = [r["summary"]["mean"] for r in line]
            ax.plot(
                nz,
                mean,
                styles[mode],
                color=colours[method],
                marker="o",
                markersize=3,
                label=f"{method}, {mode}",
            )
            ax.fill_between(
                nz,
                [r["summary"]["min"] for r in line],
                [r["summary"]["max"] for r in line],
                color=colours[method],
                alpha=0.1,
            )
            if mode == "interpolate":
                cost.plot(
                    nz,
                    [r["flops_per_image"] / 1e6 for r in line],
                    ":",
                    color=colours[method],
                    alpha=0.6,
                )
        trained = [r for r in evaluated if r["trained"] and r["method"] == method]
        for r in trained:
            ax.plot(r["num_z_steps"], r["summary"]["mean"], "*", color="black", markersize=10)
    ax.set_xscale("log")
    ax.set_xlabel("activation steps Nz (log scale)")
    ax.set_ylabel("test accuracy (%), mean over seeds")
    cost.set_ylabel("MFLOP per image (dotted)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    return figure


def write_sweep(rows: list[dict[str, Any]], out: str | Path, title: str, command: str) -> Path:
    """Write ``out/sweep.json``, ``out/sweep.md`` and ``out/sweep.png`` (each atomically);
    return ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "sweep.json", {"title": title, "command": command, "rows": rows})
    tmp = out / "sweep.md.tmp"
    tmp.write_text(sweep_markdown(rows, title, command))
    tmp.replace(out / "sweep.md")
    figures.save_figure(plot_sweep(rows, title), out / "sweep.png")
    return out


def title_of(run: disc.TrainedRun) -> str:
    """'ResNet-4 anodev2_conf1, seeds 0–2, trained Nz=5 Nw=5 euler' for a sweep's heading."""
    config, plan = run.config, run.plan
    seeds = seeds_lib.seed_list(config.seed, config.num_seeds)
    trained = (
        ""
        if plan is None
        else (f", trained Nz={plan.num_z_steps} Nw={plan.num_w_steps} {plan.method}")
    )
    draws = config.get("train_num_z_steps")
    if plan is not None and draws:
        trained = f", trained drawing Nz from {tuple(draws)}, statistics on Nz={plan.num_z_steps}"
    return (
        f"{paper.MODEL_NAMES[config.model]} {config.variant}, seeds {seeds[0]}–{seeds[-1]}{trained}"
    )


def read_sweep(out: str | Path) -> dict[str, Any]:
    """A written sweep.json."""
    return dict(json.loads((Path(out) / "sweep.json").read_text()))


def comparison_markdown(sweeps: dict[str, list[dict[str, Any]]]) -> str:
    """One table of several runs' sweeps: per method and Nz, each run's mean accuracy over
    its seeds (min–max) with the better of its statistics handlings (i: interpolate, r:
    recalibrate); * marks a run's training setting, – a setting not evaluated."""
    best: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
    for name, rows in sweeps.items():
        for row in rows:
            if "skipped" in row or row.get("varies", "num_z_steps") != "num_z_steps":
                continue
            key = (row["method"], row["num_z_steps"])
            held = best.setdefault(name, {}).get(key)
            if held is None or row["summary"]["mean"] > held["summary"]["mean"]:
                best[name][key] = row
    keys = sorted(
        {k for rows in best.values() for k in rows}, key=lambda k: (METHODS.index(k[0]), k[1])
    )
    lines = [
        "| method | Nz | " + " | ".join(sweeps) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in sweeps) + " |",
    ]
    for method, nz in keys:
        cells = []
        for name in sweeps:
            chosen = best.get(name, {}).get((method, nz))
            if chosen is None:
                cells.append("–")
                continue
            s = chosen["summary"]
            cells.append(
                f"{s['mean']:.2f}{'*' if chosen['trained'] else ''} "
                f"({s['min']:.1f}–{s['max']:.1f}, {chosen['bn_statistics'][0]})"
            )
        lines.append(f"| {method} | {nz} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
