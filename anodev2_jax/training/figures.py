"""The paper's Figures 1, 4 and 5 from a trained run: an evolved kernel at every weight step.

From a run directory of an ANODEV2 model (variant anodev2_conf1 or anodev2_conf2, or any
config whose ODE blocks evolve their weights), :func:`kernel_evolution` restores the last
checkpoint and solves the block's weight ODE from the trained w0 and p,
w_{m+1} = Φ_δ(w_m; p) for m = 0 … Nw-1 (``solve.weight_trajectory``), and
:func:`plot_kernel_evolution` draws one input channel of one output filter of one kernel at
t = m/Nw, with the learned d = softplus(diffusion), v = (vx, vy) and ρ in the caption.

From the run directories of a reproduction (or any train.py runs), :func:`accuracy_curves`
reads each run's per-epoch test accuracies from its metrics.jsonl and
:func:`plot_accuracy_curves` draws them: the mean over seeds as a line, the min–max band around
it, one colour per variant.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from anodev2_jax import evolution as evolution_lib
from anodev2_jax import solve as solve_lib
from anodev2_jax import training
from anodev2_jax.nn import models
from anodev2_jax.training import checkpoints as checkpoints_lib
from anodev2_jax.training import paper
from anodev2_jax.training import seeds as seeds_lib
from anodev2_jax.training.config import run_config

PyTree = Any


@dataclasses.dataclass(frozen=True)
class KernelEvolution:
    """One kernel slice along the weight trajectory of a trained ODE block.

    ``kernels``: (Nw + 1, kh, kw) float64, w_m[:, :, in_channel, out_channel] for m = 0 … Nw;
    ``times``: (Nw + 1,) t = m / Nw; ``coefficients``: the learned d, vx, vy, rho of the
    kernel (of ``out_channel`` when the RDA is per channel).
    """

    model: str
    variant: str
    seed: int
    block: str
    kernel: str
    in_channel: int
    out_channel: int
    kernels: np.ndarray
    times: np.ndarray
    coefficients: dict[str, float]


@dataclasses.dataclass(frozen=True)
class AccuracyCurve:
    """The test accuracy of one run after each epoch, per seed.

    ``epochs``: (E,) the epochs (1-based) every seed has a test record for; ``accuracy``:
    (num_seeds, E) test accuracy in %, eval mode; ``num_epochs``: the run's planned length.
    """

    model: str
    variant: str
    seeds: list[int]
    epochs: np.ndarray
    accuracy: np.ndarray
    num_epochs: int


def restore_params(workdir: Path, config: ml_collections.ConfigDict, seed_index: int) -> PyTree:
    """The parameters of seed ``seed_index`` (0-based) in the run's last checkpoint."""
    if not 0 <= seed_index < config.num_seeds:
        raise ValueError(
            f"--seed_index={seed_index}: the run in {workdir} has num_seeds={config.num_seeds} "
            f"(seeds {config.seed}–{config.seed + config.num_seeds - 1}); use 0 … "
            f"{config.num_seeds - 1}"
        )
    state = checkpoints_lib.restore_run(workdir, config)
    params = state.params
    return seeds_lib.select(params, seed_index) if config.num_seeds > 1 else params


def kernel_evolution(
    workdir: str | os.PathLike,
    *,
    seed_index: int = 0,
    block: str | None = None,
    kernel: str | None = None,
    in_channel: int = 0,
    out_channel: int = 0,
) -> KernelEvolution:
    """The trained kernel ``kernel`` of ODE block ``block`` along t = 0 … 1.

    block: a module name with evolved weights (default: the first, e.g. ResNet's
    "layer1_1"); kernel: one of its kernels (default: the first, e.g. "conv1").
    """
    workdir = Path(workdir)
    config = run_config(workdir)
    model = training.model_from_config(config)
    ode = model.ode
    if ode is None or isinstance(ode.evolution, evolution_lib.Zero):
        raise ValueError(
            f"the run in {workdir} is {config.model} {config.variant}, whose weights do not "
            "evolve (static θ); pass the run of an anodev2_conf1 or anodev2_conf2 model"
        )
    params = restore_params(workdir, config, seed_index)
    blocks = sorted(name for name, sub in params.items() if isinstance(sub, dict) and "p" in sub)
    block = blocks[0] if block is None else block
    if block not in blocks:
        raise ValueError(f"block={block!r} has no evolved weights; use one of {blocks}")
    w0, p = params[block]["w0"], params[block]["p"]
    kernel = sorted(w0)[0] if kernel is None else kernel
    if kernel not in w0:
        raise ValueError(f"kernel={kernel!r} is not in block {block}; use one of {sorted(w0)}")
    cin, cout = w0[kernel].shape[2:]
    if not (0 <= in_channel < cin and 0 <= out_channel < cout):
        raise ValueError(
            f"in_channel={in_channel}, out_channel={out_channel}: kernel {block}/{kernel} has "
            f"{cin} input and {cout} output channels"
        )
    num_w_steps = ode.plan().num_w_steps
    ws = solve_lib.weight_trajectory(ode.evolution, w0, p, num_w_steps, num_w_steps)
    kernels = np.stack([np.asarray(w[kernel][:, :, in_channel, out_channel]) for w in ws])
    coefficients = {}
    for name, value in p[kernel].items():
        value = np.asarray(value)
        value = value[out_channel] if value.ndim else value
        coefficients[name] = float(value)
    if "diffusion" in coefficients:  # stored unconstrained: d = softplus(diffusion) ≥ 0
        coefficients = {"d": float(jax.nn.softplus(coefficients.pop("diffusion"))), **coefficients}
    return KernelEvolution(
        model=config.model,
        variant=config.variant,
        seed=config.seed + seed_index,
        block=block,
        kernel=kernel,
        in_channel=in_channel,
        out_channel=out_channel,
        kernels=kernels.astype(np.float64),
        times=np.arange(num_w_steps + 1) / num_w_steps,
        coefficients=coefficients,
    )


def accuracy_curve(workdir: str | os.PathLike) -> AccuracyCurve:
    """The per-epoch test accuracies of the run in ``workdir`` (from its metrics.jsonl)."""
    workdir = Path(workdir)
    config = run_config(workdir)
    seeds = seeds_lib.seed_list(config.seed, config.num_seeds)
    by_epoch: dict[int, dict[int, float]] = {}
    for record in training.read_metrics(workdir / "metrics.jsonl"):
        if record["kind"] == "test":
            seed = record.get("seed", config.seed)
            by_epoch.setdefault(record["epoch"], {})[seed] = 100 * record["accuracy"]
    epochs = sorted(e for e, found in by_epoch.items() if set(seeds) <= set(found))
    return AccuracyCurve(
        model=config.model,
        variant=config.variant,
        seeds=seeds,
        epochs=np.asarray(epochs, dtype=int),
        accuracy=np.asarray([[by_epoch[e][s] for e in epochs] for s in seeds]).reshape(
            len(seeds), len(epochs)
        ),
        num_epochs=config.num_epochs,
    )


def accuracy_curves(root: str | os.PathLike) -> list[AccuracyCurve]:
    """The curves of every run directly under ``root`` (a reproduce.py workdir) that has a
    test record, in the order of :data:`anodev2_jax.nn.models.VARIANTS` within each model."""
    runs = [
        path
        for path in sorted(Path(root).iterdir())
        if (path / "config.json").exists() or (path / "results.json").exists()
    ]
    curves = [curve for curve in map(accuracy_curve, runs) if len(curve.epochs)]
    order = {variant: i for i, variant in enumerate(models.VARIANTS)}
    return sorted(curves, key=lambda c: (c.model, order.get(c.variant, len(order))))


def plot_accuracy_curves(curves: list[AccuracyCurve]) -> Any:
    """A matplotlib Figure, one panel per model: test accuracy (%) against epoch, per variant
    the mean over seeds as a line and the min–max over seeds as a band."""
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("no run has a test record yet: nothing to plot")
    model_names = sorted({c.model for c in curves})
    figure = Figure(figsize=(6.4 * len(model_names), 4.4), layout="constrained")
    axes = figure.subplots(1, len(model_names), squeeze=False)[0]
    colours = {variant: f"C{i}" for i, variant in enumerate(models.VARIANTS)}
    for ax, model in zip(axes, model_names, strict=True):
        for curve in (c for c in curves if c.model == model):
            colour = colours.get(curve.variant, "k")
            done = curve.epochs[-1]
            label = f"{curve.variant} ({len(curve.seeds)} seeds"
            label += ")" if done == curve.num_epochs else f", epoch {done}/{curve.num_epochs})"
            ax.plot(curve.epochs, curve.accuracy.mean(0), color=colour, label=label)
            ax.fill_between(
                curve.epochs, curve.accuracy.min(0), curve.accuracy.max(0), color=colour, alpha=0.2
            )
        ax.set_title(paper.MODEL_NAMES.get(model, model))
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%), eval mode")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    return figure


def caption(evolution: KernelEvolution) -> str:
    """'learned d = …, v = (vx, vy) = (…, …), ρ = …' (or the operator's own parameters)."""
    c = evolution.coefficients
    if {"d", "vx", "vy", "rho"} <= set(c):
        return (
            f"learned d = {c['d']:.4g}, v = (vx, vy) = ({c['vx']:.4g}, {c['vy']:.4g}), "
            f"ρ = {c['rho']:.4g}"
        )
    return "learned " + ", ".join(f"{name} = {value:.4g}" for name, value in c.items())


def plot_kernel_evolution(evolution: KernelEvolution) -> Any:
    """A matplotlib Figure: one panel per weight step, one colour scale, the caption below."""
    from matplotlib.figure import Figure

    count = len(evolution.times)
    figure = Figure(figsize=(1.6 * count + 0.8, 2.6), layout="constrained")
    axes = figure.subplots(1, count, squeeze=False)[0]
    limit = float(np.max(np.abs(evolution.kernels))) or 1.0
    for ax, t, w in zip(axes, evolution.times, evolution.kernels, strict=True):
        image = ax.imshow(w, cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(f"t = {t:.2g}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    figure.colorbar(image, ax=list(axes), shrink=0.8)
    name = paper.MODEL_NAMES.get(evolution.model, evolution.model)
    figure.suptitle(
        f"{name} {evolution.variant}, seed {evolution.seed}: {evolution.block}/"
        f"{evolution.kernel}[:, :, {evolution.in_channel}, {evolution.out_channel}]",
        fontsize=10,
    )
    figure.supxlabel(caption(evolution), fontsize=9)
    return figure


def save_figure(figure: Any, out: str | os.PathLike, dpi: int = 150) -> Path:
    """Write the figure to ``out`` (format from its suffix) via a temp file, then rename."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=out.suffix, delete=False) as tmp:
        figure.savefig(tmp.name, dpi=dpi)
    os.replace(tmp.name, out)
    return out
