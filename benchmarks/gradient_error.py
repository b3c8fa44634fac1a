"""The Neural ODE adjoint (OTD) gradient against the exact (DTO) one in ResNet-4's ODE block.

    .venv/bin/python -m benchmarks.gradient_error \
        --train_workdir=benchmarks/checkpoints/resnet4-anode-1epoch

Run from the repository root. For Nz = 1, 2, 4, ..., 32 Euler steps, on the block's real input
activations (CIFAR-10 test images through the model's stem) and the model's own loss (head
and softmax cross-entropy with the true labels), it compares jax.grad through
``coupled_solve(..., gradient="otd")`` with the exact gradient of the same discrete block
(``gradient="dto"``), in float64, w.r.t. the block's input z0, its kernels w0, its BatchNorm
scale/offset and all of the model's parameters (relative L2 error; cosine for the last), for

- the weights of a ResNet-4 ``anode`` trained for one epoch (``--train_workdir``: trained there
  by ``training.train_and_evaluate`` when it holds no checkpoint, else restored), and
- the same model's initial (random) weights, the ones that training starts from;

with static θ (``Zero`` evolution: the paper's Table 4 ``node``/``anode`` blocks) and with
RDA-evolved weights, conf1, Nw = Nz. BatchNorm normalizes with batch statistics (training
mode). Writes a markdown table (``--out_md``, keeping the hand-written ``## Conclusion`` of an
existing one) and a log-log plot (``--out_png``).
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from anodev2_jax import RDA, Zero, coupled_solve, training
from anodev2_jax.nn import blocks, models
from anodev2_jax.training import data as data_lib
from configs import resnet4

PyTree = Any
NUM_Z_STEPS = (1, 2, 4, 8, 16, 32)


# -- the briefly trained model ---------------------------------------------------------------------
def train_config() -> ml_collections.ConfigDict:
    """ResNet-4 ANODE (static θ, Nz = 2, DTO) for one epoch on the bundled CIFAR-10."""
    config = resnet4.get_config()
    config.variant = "anode"
    config.num_epochs = 1
    config.data_source = "bundled"
    config.conv_impl = "xla"
    config.progress_bar = False
    return config


def trained_state(config: ml_collections.ConfigDict, workdir: Path) -> training.TrainState:
    """The last checkpoint in ``workdir``, after training there if it holds none."""
    checkpoints = workdir / "checkpoints"
    if not (checkpoints.is_dir() and any(checkpoints.iterdir())):
        print(
            f"no checkpoint in {checkpoints}: training {config.model}/{config.variant}", flush=True
        )
        training.train_and_evaluate(config, workdir)
    abstract = jax.eval_shape(
        lambda: training.create_state(
            training.model_from_config(config), training.make_optimizer(config, 1), config
        )
    )
    with training.checkpoint_manager(checkpoints.absolute()) as manager:
        return training.restore_checkpoint(manager, abstract)


# -- the model cut at its ODE block ----------------------------------------------------------------
def cut_at_block(
    model: nn.Module, variables: PyTree, images: jax.Array, labels: jax.Array, z1: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(J, z0): the mean cross-entropy of ``model`` on ``images`` when its ODE block outputs
    ReLU(z1) (the block's final ReLU), and the block's input z0 (the stem's output).

    BatchNorm normalizes with batch statistics (training mode); running statistics are unused.
    images: (B, 32, 32, 3) normalized; labels: (B,); z1, z0: (B, 32, 32, 16).
    """
    with blocks.ode_block_replaced(z1) as block_inputs:
        logits, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    return jnp.mean(training.cross_entropy(logits, labels)), block_inputs[0]


# -- the study -------------------------------------------------------------------------------------
EVOLUTIONS = {"static θ (Zero)": Zero(), "RDA conf1, Nw = Nz": RDA()}
PARTS = {
    "z0": "∂J/∂z0",
    "w0": "∂J/∂w0",
    "bn": "∂J/∂(BN scale, offset)",
    "model": "∂J/∂(all parameters)",
}


@functools.partial(jax.jit, static_argnames=("model", "evolution", "num_z_steps", "gradient"))
def block_gradients(
    variables: PyTree,
    p: PyTree,
    images: jax.Array,
    labels: jax.Array,
    *,
    model: nn.Module,
    evolution: Any,
    num_z_steps: int,
    gradient: str,
) -> dict[str, PyTree]:
    """∂J/∂z0, ∂J/∂w0 and ∂J/∂(BN scale, offset) of the model's ODE block ``layer1_1``, solved
    by Euler with ``num_z_steps`` steps and differentiated by ``gradient`` ("dto" or "otd"),
    and the gradient w.r.t. all the model's parameters that this makes (p excluded)."""
    f = functools.partial(blocks.resnet_field, train=True, conv_impl="xla")
    block = variables["params"]["layer1_1"]
    zeros = jnp.zeros((*images.shape[:-1], block["w0"]["conv1"].shape[-1]), images.dtype)

    def loss(params: PyTree, w0: PyTree, norms: PyTree, dz0: jax.Array) -> jax.Array:
        """J, the stem and head taking ``params``; ∂J/∂dz0 at dz0 = 0 is ∂J/∂z0."""
        net = {**variables, "params": params}
        _, z0 = cut_at_block(model, net, images, labels, zeros)
        z1, _ = coupled_solve(
            f,
            z0 + dz0,
            w0,
            p,
            norms,
            evolution=evolution,
            num_z_steps=num_z_steps,
            gradient=gradient,
            has_aux=True,
        )
        return cut_at_block(model, net, images, labels, z1)[0]

    norms = {name: block[name] for name in ("bn1", "bn2")}
    grads = jax.grad(loss, (0, 1, 2, 3))(variables["params"], block["w0"], norms, zeros)
    stem_and_head, grad_w0, grad_norms, grad_z0 = grads
    # The stem's and head's parameters by autodiff, the block's from the solve (the block's own
    # entries in stem_and_head are zero: the intercepted block never reads them).
    model_grads = {**stem_and_head, "layer1_1": {"w0": grad_w0, **grad_norms}}
    return {"z0": grad_z0, "w0": grad_w0, "bn": grad_norms, "model": model_grads}


def relative_error(approx: PyTree, exact: PyTree) -> float:
    """‖approx - exact‖₂ / ‖exact‖₂ over all leaves together."""
    pairs = zip(jax.tree.leaves(approx), jax.tree.leaves(exact), strict=True)
    diff = sum(float(jnp.sum((a - b) ** 2)) for a, b in pairs)
    norm = sum(float(jnp.sum(b**2)) for b in jax.tree.leaves(exact))
    return float(np.sqrt(diff / norm))


def cosine(a: PyTree, b: PyTree) -> float:
    """⟨a, b⟩ / (‖a‖ ‖b‖) over all leaves together."""
    dot = lambda x, y: sum(float(jnp.vdot(u, v)) for u, v in zip(x, y, strict=True))
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    return dot(a, b) / float(np.sqrt(dot(a, a) * dot(b, b)))


def study(
    model: nn.Module, weights: dict[str, PyTree], images, labels, num_z_steps_list: list[int]
) -> list[dict]:
    """One row per (weights, evolution, Nz): the OTD gradient's relative errors per part."""
    rows = []
    for evolution_name, evolution in EVOLUTIONS.items():
        for weights_name, variables in weights.items():
            # RDA's initial parameters (diffusion only) on the block's own kernels
            p = evolution.init(variables["params"]["layer1_1"]["w0"])
            for num_z_steps in num_z_steps_list:
                start = time.time()
                grads = {
                    gradient: block_gradients(
                        variables,
                        p,
                        images,
                        labels,
                        model=model,
                        evolution=evolution,
                        num_z_steps=num_z_steps,
                        gradient=gradient,
                    )
                    for gradient in ("dto", "otd")
                }
                row = {"weights": weights_name, "evolution": evolution_name, "nz": num_z_steps}
                for part in PARTS:
                    row[part] = relative_error(grads["otd"][part], grads["dto"][part])
                row["cosine"] = cosine(grads["otd"]["model"], grads["dto"]["model"])
                row["seconds"] = time.time() - start
                print(row, flush=True)
                rows.append(row)
    return rows


# -- report ----------------------------------------------------------------------------------------
# Written by hand from the numbers: kept, from this heading on, when the script rewrites the file.
CONCLUSION = "## Conclusion"


def markdown(rows: list[dict], command: str, header: str, conclusion: str) -> str:
    lines = [
        "# OTD vs DTO gradient error in ResNet-4's ODE block",
        "",
        "Made by (from the repository root):",
        "",
        f"    {command}",
        "",
        header,
        "",
        "Relative L2 error ‖g_OTD - g_DTO‖ / ‖g_DTO‖ of the Neural ODE adjoint gradient against",
        "the exact gradient of the same discrete block (Euler, Nz steps), in float64. The last",
        "two columns are about the gradient w.r.t. all of the model's parameters, the one SGD",
        "steps along (stem and head by autodiff, fed ∂J/∂z0 and ∂J/∂z1; weight decay and RDA's",
        "p left out): its relative error and its cosine with the exact one (OTD's step is a",
        "descent direction while the cosine is positive):",
        "",
        "| weights | θ(t) | Nz | " + " | ".join(PARTS.values()) + " | cosine, all parameters |",
        "|---|---|---:|" + "---:|" * (len(PARTS) + 1),
    ]
    for row in rows:
        errors = " | ".join(f"{row[part]:.3g}" for part in PARTS)
        cells = f"{row['weights']} | {row['evolution']} | {row['nz']} | {errors}"
        lines.append(f"| {cells} | {row['cosine']:.3f} |")
    lines += ["", "![OTD gradient error against Nz](gradient_error.png)", "", conclusion]
    return "\n".join(lines).rstrip() + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(EVOLUTIONS), figsize=(11, 4.8), sharey=True)
    weights = sorted({row["weights"] for row in rows}, reverse=True)
    for ax, evolution in zip(axes, EVOLUTIONS, strict=True):
        for part, color in zip(PARTS, ("C0", "C1", "C2", "C3"), strict=True):
            for name, style in zip(weights, ("-o", "--s"), strict=False):
                selected = [r for r in rows if r["evolution"] == evolution and r["weights"] == name]
                nz = [r["nz"] for r in selected]
                ax.loglog(
                    nz,
                    [r[part] for r in selected],
                    style,
                    color=color,
                    ms=4,
                    label=f"{PARTS[part]}, {name}",
                )
        nz = sorted({row["nz"] for row in rows})
        ax.loglog(nz, [0.5 / n for n in nz], ":", color="gray", label="∝ 1/Nz")
        ax.axvline(2, color="gray", lw=0.5)
        ax.set_title(evolution)
        ax.set_xlabel("Nz (Euler steps)")
        ax.set_xticks(nz, [str(n) for n in nz])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("‖g_OTD − g_DTO‖ / ‖g_DTO‖")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--train_workdir",
        type=Path,
        required=True,
        help="workdir of the one-epoch ResNet-4 anode run: trained there if it has no checkpoint",
    )
    parser.add_argument("--batch_size", type=int, default=128, help="CIFAR-10 test images")
    parser.add_argument("--num_z_steps", type=int, nargs="+", default=list(NUM_Z_STEPS))
    parser.add_argument("--out_md", type=Path, default=Path("docs/gradient_error.md"))
    parser.add_argument("--out_png", type=Path, default=Path("docs/gradient_error.png"))
    flags = parser.parse_args(argv)
    if not 2 <= flags.batch_size <= 10_000:
        raise ValueError(f"--batch_size={flags.batch_size}: BatchNorm needs 2..10000 test images")
    if min(flags.num_z_steps) < 1:
        raise ValueError(f"--num_z_steps={flags.num_z_steps}: step counts must be positive")
    command = shlex.join([".venv/bin/python", "-m", "benchmarks.gradient_error", *argv])

    config = train_config()
    trained = trained_state(config, flags.train_workdir)
    # The weights this training started from: create_state with the config's seed.
    initial = training.create_state(
        training.model_from_config(config), training.make_optimizer(config, 1), config
    )
    results = flags.train_workdir / "results.json"
    accuracy = json.loads(results.read_text())["final_test_accuracy"] if results.exists() else None

    # The gradients are compared in float64, from here on.
    jax.config.update("jax_enable_x64", True)
    # Host arrays: restored and freshly initialised ones would otherwise differ in sharding and
    # so compile every block_gradients twice.
    f64 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float64), tree)
    weights = {
        name: f64({"params": state.params, "batch_stats": state.batch_stats})
        for name, state in (("trained", trained), ("initial", initial))
    }
    dataset = data_lib.load_cifar10("bundled")
    images = data_lib.normalize(dataset.test_images[: flags.batch_size]).astype(jnp.float64)
    labels = jnp.asarray(dataset.test_labels[: flags.batch_size])
    model = models.create_model("resnet4", "anode", dtype=jnp.float64)

    start = time.time()
    rows = study(model, weights, images, labels, flags.num_z_steps)
    seconds = time.time() - start

    trained_words = f"{int(trained.step)} SGD steps, batch {config.batch_size}" + (
        f", test accuracy {accuracy:.1%}" if accuracy is not None else ""
    )
    header = (
        f"Input: the first {flags.batch_size} images of the CIFAR-10 test set ({dataset.source}) "
        "through each model's stem; the loss is the model's mean softmax cross-entropy with "
        "the true labels, BatchNorm in training mode (batch statistics). Weights: *trained* = "
        f"ResNet-4 anode (static θ, Nz = 2, DTO) after one epoch ({trained_words}; checkpoint in "
        f"`{flags.train_workdir}`); *initial* = the same model's weights at step 0. The RDA rows "
        "evolve the block's kernels by RDA (tanh) with its initial parameters (diffusion 0.1, "
        f"no advection, no reaction). Study time {seconds:.0f} s ({jax.devices()[0].platform})."
    )
    old = flags.out_md.read_text() if flags.out_md.exists() else ""
    conclusion = old[old.index(CONCLUSION) :] if CONCLUSION in old else ""
    flags.out_md.parent.mkdir(parents=True, exist_ok=True)
    flags.out_md.write_text(markdown(rows, command, header, conclusion))
    plot(rows, flags.out_png)
    print(f"wrote {flags.out_md} and {flags.out_png}")


if __name__ == "__main__":
    main(sys.argv[1:])
