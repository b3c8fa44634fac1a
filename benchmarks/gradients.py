"""The exact gradients side by side: dto, backprop and auto (training's default) per model ×
variant, speed and memory of the compiled train step.

    .venv/bin/python -m benchmarks.gradients --json gradients.json --markdown gradients.md

For each ODE variant (anode, anodev2_conf1, anodev2_conf2) of each model, the real train step
(``training.make_train_step``, batch ``--batch_size``, random uint8 images augmented inside
the step) is compiled with ``gradient="dto"``, ``"backprop"`` and ``"auto"`` (resolved as
``train_and_evaluate`` resolves it: ``training.compile_train_step`` against the default budget,
half of one device's memory). The three alternate in ``--repeats`` rounds of ``--steps``
timed steps after ``--warmup``, so that they see the same load; img/s is from each one's best
median. Memory: XLA's peak (arguments + outputs − donated + temporaries,
``gradient_choice.peak_bytes``) and temporaries of the compiled step, per device.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from anodev2_jax import gradients as gradient_choice
from benchmarks import common

GRADIENTS = ("dto", "backprop", "auto")
ODE_VARIANTS = ("anode", "anodev2_conf1", "anodev2_conf2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models",
        type=common.name_list(common.BENCH_MODELS, "model"),
        default=list(common.BENCH_MODELS),
    )
    parser.add_argument(
        "--variants", type=common.name_list(ODE_VARIANTS, "variant"), default=list(ODE_VARIANTS)
    )
    parser.add_argument("--conv_impl", default="auto", help="as training: auto | xla | cpu")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--repeats", type=int, default=2, help="alternations of the three")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    common.add_cpu_malloc_arg(parser)
    args = parser.parse_args(argv)
    if min(args.batch_size, args.steps, args.repeats) < 1 or args.warmup < 0:
        raise ValueError(
            f"--batch_size={args.batch_size}, --steps={args.steps} and --repeats="
            f"{args.repeats} must be ≥ 1, --warmup={args.warmup} ≥ 0"
        )
    common.tune_malloc(args)
    return args


def measure(model: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    steps = {
        gradient: common.CompiledStep(
            common.load_config(model, variant, args.batch_size, args.conv_impl, gradient=gradient)
        )
        for gradient in GRADIENTS
    }
    medians: dict[str, list[float]] = {gradient: [] for gradient in GRADIENTS}
    for _ in range(args.repeats):
        for gradient, step in steps.items():
            medians[gradient].append(statistics.median(step.time_steps(args.steps, args.warmup)))
            print(f"{model} {variant} {gradient}: {1e3 * medians[gradient][-1]:.1f} ms", flush=True)
    row: dict[str, Any] = {"model": model, "variant": variant, "batch": args.batch_size}
    for gradient, step in steps.items():
        stats = step.compiled.memory_analysis()
        row[gradient] = {
            "gradients": step.gradients,
            "step_s_median": min(medians[gradient]),
            "step_s_rounds": medians[gradient],
            "img_per_s": args.batch_size / min(medians[gradient]),
            "peak_bytes": gradient_choice.peak_bytes(step.compiled),
            "temp_bytes": int(stats.temp_size_in_bytes),
        }
    return row


def table(rows: list[dict[str, Any]]) -> str:
    headers = [
        "model",
        "variant",
        "dto img/s",
        "backprop img/s",
        "auto img/s",
        "backprop ÷ dto",
        "dto peak MiB",
        "backprop peak MiB",
        "auto peak MiB",
        "auto chose",
    ]
    body = []
    for r in rows:
        speed = [r[g]["img_per_s"] for g in GRADIENTS]
        peak = [r[g]["peak_bytes"] / common.MIB for g in GRADIENTS]
        chose = ", ".join(f"{b}: {g}" for b, g in r["auto"]["gradients"].items())
        ratio = f"{speed[1] / speed[0]:.2f}"
        peaks = [common.fmt(v, 1) for v in peak]
        body.append([r["model"], r["variant"], *map(common.fmt, speed), ratio, *peaks, chose])
    return common.markdown_table(headers, body)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = common.environment(None, args.cpu_malloc_tuned)
    print(f"{env['date']} on {env['cpu']} ({env['cpu_count']} CPUs), jax {env['jax']}")
    rows = [measure(m, v, args) for m in args.models for v in args.variants]
    common.write_json(args.json, {"environment": env, "rows": rows})
    common.emit(table(rows), args.markdown)


if __name__ == "__main__":
    main()
