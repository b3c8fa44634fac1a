"""Training-step memory with and without the ODE-block checkpoint, its growth in Nt, the RDA
share of a conf2 step and the input pipeline's throughput.

    .venv/bin/python -m benchmarks.memory --torch_python $HOME/torch-venv/bin/python \\
        --json memory.json --markdown memory.md

1. Temp bytes of the compiled training step (``compiled.memory_analysis()``, XLA's buffer
   assignment: activations kept for the backward pass plus scratch) for each model × variant,
   with the DTO checkpoint (``gradient="dto"``) and without it (``"backprop"``); with
   ``--torch_python`` beside ``torch_ref.py saved`` (MiB of tensors autograd saves in the
   forward pass, checkpoint on and off: a different measure, given for the ratio).
2. The same for ``--nt_model``/``--nt_variant`` at num_z_steps in ``--nt_list``.
3. The RDA share of an anodev2_conf2 step: the time of the weight evolution's forward and
   backward alone (every ODE block's weights at the schedule's indices, a jitted gradient of
   their sum) against the whole step, and the same as a share of XLA's FLOP count; torch's
   ``rda_frac`` (measured the same way) beside it.
4. The input pipeline: host gather of a batch from uint8 arrays of CIFAR-10's size, transfer,
   and on-device augment + normalize in one jitted function.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from anodev2_jax import solve as solve_lib
from anodev2_jax.training import data as data_lib
from benchmarks import common

MIB = common.MIB
TORCH_TO_OURS = {names[0]: ours for ours, names in common.TORCH_VARIANTS.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser)
    parser.add_argument(
        "--sections",
        type=common.name_list(("memory", "nt", "rda", "input"), "section"),
        default=["memory", "nt", "rda", "input"],
        help="comma-separated, default all: memory,nt,rda,input",
    )
    parser.add_argument("--nt_model", choices=common.BENCH_MODELS, default="resnet10")
    parser.add_argument("--nt_variant", choices=("anode", "anodev2_conf1"), default="anode")
    parser.add_argument(
        "--nt_list", type=lambda s: [int(n) for n in s.split(",")], default=[2, 5, 10, 20]
    )
    parser.add_argument("--rda_steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--input_batch_size", type=int, default=256)
    parser.add_argument("--input_batches", type=int, default=40, help="timed batches")
    args = parser.parse_args(argv)
    common.check_common_args(args)
    if any(n < 1 for n in args.nt_list):
        raise ValueError(f"--nt_list={args.nt_list} must hold positive step counts")
    if args.rda_steps < 1 or args.input_batches < 1 or args.input_batch_size < 1:
        raise ValueError("--rda_steps, --input_batches and --input_batch_size must be ≥ 1")
    return args


# -- 1, 2: memory of the compiled step -------------------------------------------------------------
def saved_residual_bytes(step: common.CompiledStep) -> int:
    """Bytes of the residuals the loss's VJP keeps after the forward pass (the jaxpr's), not
    counting the parameters and the (constant) input batch: the analogue of torch_ref.py
    ``saved``.

    Distinct jaxpr variables only, so a value saved twice counts once.
    """
    loss = step.loss_function()
    closed = jax.make_jaxpr(lambda params: jax.vjp(loss, params)[1])(step.state.params)
    excluded = set(closed.jaxpr.invars) | set(closed.jaxpr.constvars)
    residuals = {v for v in closed.jaxpr.outvars if isinstance(v, jax.extend.core.Var)} - excluded
    return sum(int(np.prod(v.aval.shape)) * v.aval.dtype.itemsize for v in residuals)


def step_memory(
    model: str, variant: str, conv_impl: str, batch_size: int, **overrides: Any
) -> dict[str, Any]:
    """Compile the train step (not run it) and read XLA's buffer sizes."""
    config = common.load_config(model, variant, batch_size, conv_impl, **overrides)
    step = common.CompiledStep(config)
    stats = step.compiled.memory_analysis()
    saved = saved_residual_bytes(step)
    row = {
        "model": model,
        "variant": variant,
        "conv_impl": conv_impl,
        **overrides,
        "temp_bytes": stats.temp_size_in_bytes,
        "argument_bytes": stats.argument_size_in_bytes,
        "output_bytes": stats.output_size_in_bytes,
        "alias_bytes": stats.alias_size_in_bytes,
        "saved_residual_bytes": saved,
        "compile_s": step.lower_s + step.compile_s,
    }
    del step
    gc.collect()
    print(
        f"memory {model} {variant} {overrides}: temp {row['temp_bytes'] / MIB:.1f} MiB, "
        f"compile {row['compile_s']:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return row


def memory_section(args: argparse.Namespace, conv_impl: str) -> list[dict[str, Any]]:
    rows = []
    for model in args.models:
        for variant in args.variants:
            gradients = ["dto", "backprop"] if variant != "baseline" else [None]
            for gradient in gradients:
                overrides = {"gradient": gradient} if gradient else {}
                rows.append(step_memory(model, variant, conv_impl, args.batch_size, **overrides))
    return rows


def torch_saved(args: argparse.Namespace) -> dict[str, Any]:
    """torch_ref.py saved: MiB autograd saves per model × variant, checkpoint on and off."""
    command = common.torch_command(
        args.torch_python, args.torch_ref, "saved", "--batch", str(args.batch_size)
    )
    return {"rows": common.run_torch(command), "command": common.shell_line(command)}


def memory_table(
    rows: list[dict[str, Any]], torch: dict[str, Any] | None, args: argparse.Namespace
) -> str:
    def jax_mib(model: str, variant: str, gradient: str | None, field: str) -> float | None:
        for row in rows:
            if (row["model"], row["variant"], row.get("gradient")) == (model, variant, gradient):
                return row[field] / MIB
        return None

    def torch_mib(model: str, variant: str, ckpt: bool) -> float | None:
        for row in torch["rows"] if torch else []:
            if (row["model"], TORCH_TO_OURS.get(row["variant"]), row["ckpt"]) == (
                model,
                variant,
                ckpt,
            ):
                return row["saved_act_mib"]
        return None

    def pair(on: float | None, off: float | None) -> list[str | None]:
        """checkpoint on, off, and off ÷ on."""
        ratio = common.fmt(off / on, 1) + "×" if on and off else None
        return [common.fmt(on, 1), common.fmt(off, 1), ratio]

    table = []
    for model, variant in dict.fromkeys((row["model"], row["variant"]) for row in rows):
        cells = [model, variant]
        for field in ("temp_bytes", "saved_residual_bytes"):
            if variant == "baseline":
                value = jax_mib(model, variant, None, field)
                cells += [common.fmt(value, 1), None, None]
            else:
                cells += pair(
                    jax_mib(model, variant, "dto", field),
                    jax_mib(model, variant, "backprop", field),
                )
        if variant == "baseline":
            cells += [common.fmt(torch_mib(model, variant, True), 1), None, None]
        else:
            cells += pair(torch_mib(model, variant, True), torch_mib(model, variant, False))
        table.append(cells)
    return (
        f"## Train-step memory, batch {args.batch_size}, conv {rows[0]['conv_impl']}\n\n"
        'MiB with the ODE-block checkpoint (JAX `gradient="dto"`, torch ckpt) and without '
        '(`"backprop"`, torch `--no-ckpt`). JAX temp: the compiled step\'s '
        "`memory_analysis().temp_size_in_bytes` (peak live buffers: saved activations, the "
        "backward pass's recomputation and scratch). JAX saved: bytes of the distinct residuals "
        "the loss's VJP keeps after the forward pass (jaxpr), parameters and input excluded. "
        "torch saved: MiB of tensors autograd saves in the forward pass (`torch_ref.py saved`), "
        "parameters excluded. The baseline has no ODE block: one value.\n\n"
        + common.markdown_table(
            [
                "model",
                "variant",
                "JAX temp, dto",
                "backprop",
                "÷",
                "JAX saved, dto",
                "backprop",
                "÷",
                "torch saved, ckpt",
                "no ckpt",
                "÷",
            ],
            table,
        )
        + (f"\n\ntorch: `{torch['command']}`" if torch else "")
    )


def nt_section(args: argparse.Namespace, conv_impl: str) -> list[dict[str, Any]]:
    rows = []
    for nt in args.nt_list:
        for gradient in ("dto", "backprop"):
            rows.append(
                step_memory(
                    args.nt_model,
                    args.nt_variant,
                    conv_impl,
                    args.batch_size,
                    num_z_steps=nt,
                    gradient=gradient,
                )
            )
    return rows


def nt_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    fields = ("temp_bytes", "saved_residual_bytes")
    by = {
        (row["num_z_steps"], row["gradient"], field): row[field] / MIB
        for row in rows
        for field in fields
    }
    table = []
    for nt in args.nt_list:
        cells: list[Any] = [nt]
        for field in fields:
            dto, backprop = by[nt, "dto", field], by[nt, "backprop", field]
            cells += [common.fmt(dto, 1), common.fmt(backprop, 1), f"{backprop / dto:.1f}×"]
        table.append(cells)
    slopes = []
    for field, name in zip(fields, ("temp", "saved"), strict=True):
        for gradient in ("dto", "backprop"):
            slope = _slope(args.nt_list, [by[nt, gradient, field] for nt in args.nt_list])
            slopes.append(f"{name} {gradient} {slope:.1f}")
    return (
        f"## Growth in Nt: {args.nt_model} {args.nt_variant}, batch {args.batch_size}, "
        f"conv {rows[0]['conv_impl']}\n\n"
        "MiB of the train step at num_z_steps = Nt (Nw = Nz), measured as in the table above.\n\n"
        + common.markdown_table(
            ["Nt", "JAX temp, dto", "backprop", "÷", "JAX saved, dto", "backprop", "÷"], table, 1
        )
        + f"\n\nLeast-squares slope, MiB per extra step: {', '.join(slopes)}."
    )


def _slope(xs: list[int], ys: list[float]) -> float:
    return float(np.polyfit(np.asarray(xs, float), np.asarray(ys), 1)[0]) if len(xs) > 1 else 0.0


# -- 3: the RDA share of a conf2 step --------------------------------------------------------------
def rda_function(step: common.CompiledStep) -> tuple[Any, list[Any]]:
    """Jitted gradient, w.r.t. every ODE block's (w0, p), of the sum of the evolved weights
    the schedule uses beyond w_0: the weight evolution's forward + backward alone."""
    ode = step.model.ode
    plan = ode.plan()
    used = sorted({m for row in plan.stage_indices for m in row if m > 0})
    blocks = _ode_blocks(step.state.params)

    def total(blocks: list[tuple[Any, Any]]) -> jax.Array:
        sums = []
        for w0, p in blocks:
            ws = solve_lib.weight_trajectory(ode.evolution, w0, p, plan.num_w_steps, max(used))
            sums += [jnp.sum(leaf) for m in used for leaf in jax.tree.leaves(ws[m])]
        return jnp.sum(jnp.stack(sums))

    return jax.jit(jax.grad(total)), blocks


def _ode_blocks(params: Any) -> list[tuple[Any, Any]]:
    """(w0, p) of every ODE block in a params tree (the modules that hold both)."""
    if not isinstance(params, dict):
        return []
    if "w0" in params and "p" in params:
        return [(params["w0"], params["p"])]
    return [block for value in params.values() for block in _ode_blocks(value)]


def rda_row(model: str, conv_impl: str, args: argparse.Namespace) -> dict[str, Any]:
    config = common.load_config(model, "anodev2_conf2", args.batch_size, conv_impl)
    step = common.CompiledStep(config)
    step_s = statistics.median(step.time_steps(args.rda_steps, warmup=2))
    rda, blocks = rda_function(step)
    compiled = rda.lower(blocks).compile()
    rda_s = statistics.median(
        common.time_calls(lambda: jax.block_until_ready(compiled(blocks)), 20, warmup=3)
    )
    rda_flops = common.flops_of(compiled)
    row = {
        "model": model,
        "conv_impl": conv_impl,
        "ode_blocks": len(blocks),
        "step_s": step_s,
        "rda_s": rda_s,
        "time_share": rda_s / step_s,
        "step_flops": step.flops,
        "rda_flops": rda_flops,
        "flop_share": rda_flops / step.flops,
    }
    if args.torch_python is not None:
        command = common.torch_bench_command(args, model, "anodev2_conf2", args.rda_steps)
        (torch,) = common.run_torch(command)
        row.update(
            torch_step_s=torch["step_s_median"],
            torch_rda_s=torch["rda_s"],
            torch_time_share=torch["rda_frac"],
            torch_command=common.shell_line(command),
        )
    print(f"rda {model}: {row['time_share']:.3f} of the step", file=sys.stderr, flush=True)
    return row


def rda_section(args: argparse.Namespace, conv_impl: str) -> list[dict[str, Any]]:
    rows = []
    for model in args.models:
        rows.append(rda_row(model, conv_impl, args))
        gc.collect()
    return rows


def rda_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    table = [
        [
            row["model"],
            row["ode_blocks"],
            common.fmt(1e3 * row["step_s"], 0),
            common.fmt(1e3 * row["rda_s"], 2),
            common.fmt(100 * row["time_share"], 2),
            common.fmt(100 * row["flop_share"], 3),
            common.fmt(row.get("torch_step_s") and 1e3 * row["torch_step_s"], 0),
            common.fmt(row.get("torch_rda_s") and 1e3 * row["torch_rda_s"], 2),
            common.fmt(row.get("torch_time_share") and 100 * row["torch_time_share"], 2),
        ]
        for row in rows
    ]
    return (
        f"## RDA share of an anodev2_conf2 train step, batch {args.batch_size}, "
        f"conv {rows[0]['conv_impl']}\n\n"
        "Time: median of the weight evolution's jitted forward + backward alone (all ODE "
        "blocks, Nw = 10 exact RDA steps) over the median whole step; FLOPs: XLA's "
        "cost_analysis of the two programs.\n\n"
        + common.markdown_table(
            [
                "model",
                "ODE blocks",
                "JAX step ms",
                "JAX RDA ms",
                "JAX RDA % time",
                "JAX RDA % FLOPs",
                "torch step ms",
                "torch RDA ms",
                "torch RDA % time",
            ],
            table,
            left=1,
        )
    )


# -- 4: the input pipeline -------------------------------------------------------------------------
def input_section(args: argparse.Namespace) -> dict[str, Any]:
    """Gather uint8 batches on the host in epoch order, then augment + normalize on device."""
    num = 50_000
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num, *data_lib.IMAGE_SHAPE), dtype=np.uint8)
    labels = rng.integers(0, data_lib.NUM_CLASSES, num).astype(np.int32)
    order = data_lib.epoch_batches(num, args.input_batch_size, 0, 0)
    prepare = jax.jit(lambda key, x: data_lib.normalize(data_lib.augment(key, x)))
    key = jax.random.key(0)
    warmup = 3
    gather_s, device_s = [], []
    for i, rows in enumerate(order[: warmup + args.input_batches]):
        start = time.perf_counter()
        batch = (images[rows], labels[rows])
        gathered = time.perf_counter()
        x, y = jax.device_put(batch)
        out = prepare(jax.random.fold_in(key, i), x)
        jax.block_until_ready((out, y))
        if i >= warmup:
            gather_s.append(gathered - start)
            device_s.append(time.perf_counter() - gathered)
    batch = args.input_batch_size
    gather, device = statistics.median(gather_s), statistics.median(device_s)
    total = statistics.median([g + d for g, d in zip(gather_s, device_s, strict=True)])
    return {
        "batch": batch,
        "batches": args.input_batches,
        "gather_s": gather,
        "transfer_augment_normalize_s": device,
        "total_s": total,
        "gather_img_per_s": batch / gather,
        "transfer_augment_normalize_img_per_s": batch / device,
        "img_per_s": batch / total,
    }


def input_table(row: dict[str, Any]) -> str:
    stages = [
        ("host gather (numpy fancy indexing)", "gather_s", "gather_img_per_s"),
        (
            "transfer + augment + normalize (jitted)",
            "transfer_augment_normalize_s",
            "transfer_augment_normalize_img_per_s",
        ),
        ("whole pipeline", "total_s", "img_per_s"),
    ]
    table = [
        [name, common.fmt(1e3 * row[seconds], 2), common.fmt(row[rate])]
        for name, seconds, rate in stages
    ]
    return (
        f"## Input pipeline, batch {row['batch']}, median of {row['batches']} batches\n\n"
        "From uint8 arrays of CIFAR-10's training-set size (50,000 × 32×32×3) in a shuffled "
        "epoch order (`data.epoch_batches`); in training, augment + normalize run inside the "
        "jitted train step.\n\n" + common.markdown_table(["stage", "ms", "img/s"], table, left=1)
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = common.environment(args.torch_python, args.cpu_malloc_tuned)
    common.emit(
        "## Run\n\n" + "\n".join(f"- {key}: `{value}`" for key, value in env.items()),
        args.markdown,
    )
    results: dict[str, Any] = {"env": env}
    torch = None
    if "memory" in args.sections and args.torch_python is not None:
        results["torch_saved"] = torch = torch_saved(args)
    for conv_impl in args.conv_impl:
        results[conv_impl] = out = {}
        if "memory" in args.sections:
            out["memory"] = memory_section(args, conv_impl)
            common.emit(memory_table(out["memory"], torch, args), args.markdown)
        if "nt" in args.sections:
            out["nt"] = nt_section(args, conv_impl)
            common.emit(nt_table(out["nt"], args), args.markdown)
        if "rda" in args.sections:
            out["rda"] = rda_section(args, conv_impl)
            common.emit(rda_table(out["rda"], args), args.markdown)
        common.write_json(args.json, results)
    if "input" in args.sections:
        results["input"] = input_section(args)
        common.emit(input_table(results["input"]), args.markdown)
    common.write_json(args.json, results)


if __name__ == "__main__":
    main()
