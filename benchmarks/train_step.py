"""Training-step throughput of every model × variant, beside the PyTorch reference.

    .venv/bin/python -m benchmarks.train_step --torch_python $HOME/torch-venv/bin/python \\
        --json train_step.json --markdown train_step.md

Each row compiles the real training step (``anodev2_jax.training.make_train_step`` on a
config from ``configs/<model>.py``, batch 128, random uint8 images augmented and normalized
inside the step as in training) and times ``--steps`` steps after ``--warmup``; img/s is from
the median step. With ``--torch_python``, ``torch_ref.py bench`` runs the same model right
after, in a subprocess under the GLIBC_TUNABLES its README recommends, and the row gets the
ratio JAX ÷ torch. Achieved GFLOP/s (XLA's ``cost_analysis`` FLOPs of the step compiled
with XLA's convolution, which it can count; torch's FlopCounter count) are given as a share
of the fp32 matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import jax

from anodev2_jax.nn import models
from benchmarks import common

GRADIENTS = ("dto", "auto")
TORCH_LAYOUTS = ("nchw", "channels_last", "compiled")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="alternate JAX and torch this many times per row; report each one's best median",
    )
    parser.add_argument(
        "--peak_n", type=int, default=4096, help="matrix size of the fp32 matmul peak"
    )
    parser.add_argument(
        "--gradients",
        type=common.name_list(GRADIENTS, "gradient"),
        default=["dto"],
        help="the ODE variants' gradient, one row each: dto (beside torch's checkpointed "
        "blocks) and/or auto (beside torch's blocks not checkpointed)",
    )
    parser.add_argument(
        "--torch_layouts",
        type=common.name_list(TORCH_LAYOUTS, "layout"),
        default=["nchw"],
        help="torch_ref's setups to time, each in its own rounds: nchw (its default), "
        "channels_last (torch's faster layout on the CPU), compiled (channels_last under "
        "torch.compile, benchmarks/torch_compiled.py)",
    )
    parser.add_argument(
        "--sections",
        type=common.name_list(("steps", "split"), "section"),
        default=["steps"],
        help="steps: img/s beside torch (default); split: forward vs backward time",
    )
    parser.add_argument("--split_iters", type=int, default=10, help="timed calls (split)")
    parser.add_argument(
        "--from_json",
        type=Path,
        default=None,
        help="measure nothing: print the tables of an earlier run's --json file",
    )
    args = parser.parse_args(argv)
    common.check_common_args(args)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1 or args.split_iters < 1:
        raise ValueError(
            f"--steps={args.steps}, --repeats={args.repeats} and --split_iters="
            f"{args.split_iters} must be ≥ 1, "
            f"--warmup={args.warmup} ≥ 0"
        )
    return args


def jax_round(step: common.CompiledStep, args: argparse.Namespace) -> dict[str, Any]:
    """One timing of a compiled step: ``--steps`` steps after ``--warmup``."""
    load = os.getloadavg()[0]
    times = step.time_steps(args.steps, args.warmup)
    return {
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
        "step_s_all": times,
        "load_1min_before": load,
    }


def torch_round(
    model: str, variant: str, args: argparse.Namespace, layout: str, gradient: str
) -> dict[str, Any]:
    """One ``torch_ref.py bench`` subprocess (its own warm-up of 3 and ``--steps`` iters), in
    ``layout``, its ODE blocks checkpointed beside our gradient dto and not beside auto."""
    command = common.torch_bench_command(args, model, variant, args.steps)
    if layout == "compiled":
        command.insert(1, str(Path(__file__).with_name("torch_compiled.py")))
    command += ["--channels-last"] if layout != "nchw" else []
    command += ["--no-ckpt"] if gradient == "auto" else []
    load = os.getloadavg()[0]
    (row,) = common.run_torch(command)
    # ru_maxrss survives fork+exec on Linux: the child reports this (larger) process's peak.
    for stale in ("peak_rss_mib", "rss_start_mib"):
        row.pop(stale, None)
    return {**row, "command": common.shell_line(command), "load_1min_before": load}


def best_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the fastest median step, with the fastest step of all rounds."""
    best = dict(min(rounds, key=lambda r: r["step_s_median"]))
    best["step_s_min"] = min(r["step_s_min"] for r in rounds)
    best["rounds"] = rounds
    return best


def measure(model: str, variant: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """JAX (each conv impl and gradient) and torch (each layout), alternated ``--repeats``
    times so that all see the same load; one {"jax", "torch", "torch_layouts"} row per conv
    impl and gradient ("torch": the first layout's)."""
    gradients = args.gradients if variant not in ("baseline", "node") else ["dto"]
    rows = []
    for gradient in gradients:
        rows += _measure(model, variant, gradient, args)
    return rows


def _measure(
    model: str, variant: str, gradient: str, args: argparse.Namespace
) -> list[dict[str, Any]]:
    steps = {}
    for conv_impl in args.conv_impl:
        steps[conv_impl] = common.CompiledStep(
            common.load_config(model, variant, args.batch_size, conv_impl, gradient)
        )
    jax_rounds: dict[str, list[dict[str, Any]]] = {conv_impl: [] for conv_impl in steps}
    torch_rounds: dict[str, list[dict[str, Any]]] = {layout: [] for layout in args.torch_layouts}
    for _ in range(args.repeats):
        for conv_impl, step in steps.items():
            jax_rounds[conv_impl].append(jax_round(step, args))
            log(f"jax   {model} {variant} {conv_impl} {gradient}", jax_rounds[conv_impl][-1])
        if args.torch_python is not None:
            for layout, rounds in torch_rounds.items():
                rounds.append(torch_round(model, variant, args, layout, gradient))
                log(f"torch {model} {variant} {layout} {gradient}", rounds[-1])
    torch_layouts = {layout: best_of(r) for layout, r in torch_rounds.items() if r}
    torch = next(iter(torch_layouts.values()), None)
    # XLA's cost analysis does not see inside the C++ kernels' FFI calls (conv_impl cpu):
    # count the same step compiled with XLA's own convolution.
    counted = steps.get("xla") or common.CompiledStep(
        common.load_config(model, variant, args.batch_size, "xla", gradient)
    )
    rows = []
    for conv_impl, step in steps.items():
        timing = best_of(jax_rounds[conv_impl])
        median = timing["step_s_median"]
        jax_result = {
            "model": model,
            "variant": variant,
            "conv_impl": conv_impl,
            "gradient": gradient if variant not in ("baseline", "node") else None,
            "batch": args.batch_size,
            "steps": args.steps,
            "params": models.count_params(step.state.params),
            "lower_s": step.lower_s,
            "compile_s": step.compile_s,
            **timing,
            "img_per_s": args.batch_size / median,
            "flops_per_step": counted.flops,
            "mflop_per_img": counted.flops / args.batch_size / 1e6,
            "gflops": counted.flops / median / 1e9,
        }
        rows.append({"jax": jax_result, "torch": torch, "torch_layouts": torch_layouts})
    return rows


def log(what: str, timing: dict[str, Any]) -> None:
    print(
        f"{what}: median {timing['step_s_median']:.3f} s, fastest {timing['step_s_min']:.3f} s,"
        f" load {timing['load_1min_before']:.1f}",
        file=sys.stderr,
        flush=True,
    )


# Run by the torch venv's python: the same three timings for torch_ref.py's model.
TORCH_SPLIT = """
import json, statistics, sys, time
import torch
import torch.nn.functional as F
sys.path.insert(0, sys.argv[1])
import torch_ref
model_name, variant, batch, iters = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(2)
torch.manual_seed(0)
model = torch_ref.build(model_name, variant)
model.train()
x = torch.randn(batch, 3, 32, 32)
y = torch.randint(0, 10, (batch,))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
def forward():
    return F.cross_entropy(model(x), y)
def forward_backward():
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
def step():
    forward_backward()
    opt.step()
out = {}
for name, fn in (("forward", forward), ("forward_backward", forward_backward), ("step", step)):
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    out[name + "_s"] = statistics.median(times)
print(json.dumps(out))
"""


def jax_split(step: common.CompiledStep, iters: int, warmup: int) -> dict[str, float]:
    loss, params = step.loss_function(), step.state.params
    forward, gradient = jax.jit(loss), jax.jit(jax.grad(loss))
    forward_s = common.time_calls(lambda: forward(params).block_until_ready(), iters)
    forward_backward_s = common.time_calls(lambda: jax.block_until_ready(gradient(params)), iters)
    return {
        "forward_s": statistics.median(forward_s),
        "forward_backward_s": statistics.median(forward_backward_s),
        "step_s": statistics.median(step.time_steps(iters, warmup)),
    }


def split(model: str, variant: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Median forward (loss), forward + backward (gradient) and whole step, JAX then torch:
    where the time of a step goes."""
    torch = None
    if args.torch_python is not None:
        name, *_ = common.TORCH_VARIANTS[variant]  # torch_ref's anode defaults to Nt = 2
        command = [
            str(args.torch_python),
            "-c",
            TORCH_SPLIT,
            str(args.torch_ref.parent),
            model,
            name,
            str(args.batch_size),
            str(args.split_iters),
        ]
        torch = {"load_1min_before": os.getloadavg()[0], **common.run_torch(command)[0]}
    rows = []
    for conv_impl in args.conv_impl:
        step = common.CompiledStep(common.load_config(model, variant, args.batch_size, conv_impl))
        jax_result = {
            "model": model,
            "variant": variant,
            "conv_impl": conv_impl,
            "load_1min_before": os.getloadavg()[0],
            **jax_split(step, args.split_iters, args.warmup),
        }
        rows.append({"jax": jax_result, "torch": torch})
        print(f"split {model} {variant} {conv_impl}: {jax_result}", file=sys.stderr, flush=True)
    return rows


def split_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    def cells(r: dict[str, Any] | None) -> list[str | None]:
        if r is None:
            return [None] * 4
        backward = r["forward_backward_s"] - r["forward_s"]
        return [
            common.fmt(1e3 * r["forward_s"]),
            common.fmt(1e3 * backward),
            common.fmt(1e3 * r["step_s"]),
            common.fmt(backward / r["forward_s"], 1),
        ]

    def ratio(jax: dict[str, Any], torch: dict[str, Any] | None, backward: bool) -> str | None:
        if torch is None:
            return None
        part = lambda r: r["forward_backward_s"] - r["forward_s"] if backward else r["forward_s"]
        return common.fmt(part(jax) / part(torch), 2)

    table = [
        [
            row["jax"]["model"],
            row["jax"]["variant"],
            row["jax"]["conv_impl"],
            *cells(row["jax"]),
            *cells(row["torch"]),
            ratio(row["jax"], row["torch"], False),
            ratio(row["jax"], row["torch"], True),
        ]
        for row in rows
    ]
    return (
        f"## Forward vs backward, batch {args.batch_size}, ms (median of {args.split_iters})\n\n"
        "fwd: the loss alone (train mode, jitted in JAX; autograd recording in torch); bwd: "
        "the gradient (forward + backward, jitted) minus fwd; step: the whole train step.\n\n"
        + common.markdown_table(
            [
                "model",
                "variant",
                "conv",
                "JAX fwd",
                "JAX bwd",
                "JAX step",
                "JAX bwd ÷ fwd",
                "torch fwd",
                "torch bwd",
                "torch step",
                "torch bwd ÷ fwd",
                "fwd JAX ÷ torch",
                "bwd JAX ÷ torch",
            ],
            table,
            left=3,
        )
    )


def peak_rows(args: argparse.Namespace, when: str) -> list[dict[str, Any]]:
    rows = common.matmul_peak(args.peak_n)
    if args.torch_python is not None:
        rows += common.torch_peak(args.torch_python, args.torch_ref)
    for row in rows:
        row["when"] = when
    return rows


def report(env: dict, peaks: list[dict], rows: list[dict], args: argparse.Namespace) -> None:
    """Print (and append to ``--markdown``) the peak table and the train-step table."""
    peak = max(p["gflops_median"] for p in peaks)
    peak_from = max(peaks, key=lambda p: p["gflops_median"])
    common.emit(
        "## fp32 matmul peak (n×n @ n×n, GFLOP/s: median and best of 5)\n\n"
        + common.markdown_table(
            ["when", "backend", "n", "median", "best"],
            [
                [
                    p["when"],
                    p["backend"],
                    p["n"],
                    common.fmt(p["gflops_median"], 1),
                    common.fmt(p["gflops_best"], 1),
                ]
                for p in peaks
            ],
        )
        + f"\n\nShares of peak below are of {peak:.1f} GFLOP/s ({peak_from['backend']}, "
        f"{peak_from['when']}), the highest median here.",
        args.markdown,
    )
    table = []
    for row in rows:
        jax, torch = row["jax"], row.get("torch")
        ratio = jax["img_per_s"] / torch["img_per_s"] if torch else None
        best_ratio = torch["step_s_min"] / jax["step_s_min"] if torch else None
        flop_ratio = jax["mflop_per_img"] / torch["train_mflop_per_img_counted"] if torch else None
        table.append(
            [
                jax["model"],
                jax["variant"],
                jax["conv_impl"],
                jax.get("gradient") or "–",
                common.fmt(jax["img_per_s"]),
                common.fmt(torch and torch["img_per_s"]),
                common.fmt(ratio, 2),
                common.fmt(best_ratio, 2),
                common.fmt(jax["lower_s"] + jax["compile_s"], 1),
                common.fmt(jax["mflop_per_img"], 1),
                common.fmt(torch and torch["train_mflop_per_img_counted"], 1),
                common.fmt(flop_ratio, 2),
                common.fmt(jax["gflops"], 1),
                common.fmt(torch and torch["gflops_counted"], 1),
                common.fmt(100 * jax["gflops"] / peak, 1),
                common.fmt(torch and 100 * torch["gflops_counted"] / peak, 1),
                common.fmt(jax["step_s_median"] / jax["step_s_min"], 2),
                common.fmt(torch and torch["step_s_median"] / torch["step_s_min"], 2),
                common.fmt(jax["load_1min_before"], 1)
                + (f" / {torch['load_1min_before']:.1f}" if torch else ""),
            ]
        )
    common.emit(
        f"## Train step, batch {args.batch_size}, median of {args.steps} steps after "
        f"{args.warmup} warm-up, best of {args.repeats} alternating round(s)\n\n"
        "img/s: from the median step of the round with the fastest median (JAX and torch "
        "alternate, so both see the same load); '÷ (fastest steps)': the same ratio from each "
        "side's single fastest step, less sensitive to other load. JAX compile s: trace + "
        "lower + compile. JAX MFLOP: XLA's count of the step with conv_impl xla (the same "
        "arithmetic; XLA cannot count inside the C++ kernels of cpu). FLOP ratio: that ÷ "
        "torch's FlopCounter count (both include the checkpoint's recomputation). Spread: "
        "that median ÷ the fastest step; well above 1, other processes slowed the row. "
        "Load: the 1-minute load average when that round started (2 cores: above 2, the "
        "benchmark shares them with other processes).\n\n"
        + common.markdown_table(
            [
                "model",
                "variant",
                "conv",
                "gradient",
                "JAX img/s",
                "torch img/s",
                "JAX ÷ torch",
                "÷ (fastest steps)",
                "JAX compile s",
                "JAX MFLOP/img (XLA)",
                "torch MFLOP/img (counted)",
                "FLOP ratio",
                "JAX GFLOP/s",
                "torch GFLOP/s",
                "JAX % peak",
                "torch % peak",
                "JAX spread",
                "torch spread",
                "load JAX / torch",
            ],
            table,
            left=4,
        ),
        args.markdown,
    )


def torch_at_its_best_table(rows: list[dict[str, Any]]) -> str:
    """JAX ÷ torch in each layout torch ran in, and ÷ its fastest layout, per row."""
    layouts = [
        layout for layout in TORCH_LAYOUTS if any(layout in r["torch_layouts"] for r in rows)
    ]
    body = []
    for row in rows:
        jax, torch = row["jax"], row["torch_layouts"]
        rates = {layout: torch[layout]["img_per_s"] for layout in layouts if layout in torch}
        best = max(rates.values(), default=None)
        body.append(
            [
                jax["model"],
                jax["variant"],
                jax["conv_impl"],
                jax["gradient"] or "–",
                "no" if jax["gradient"] == "auto" else "yes",
                common.fmt(jax["img_per_s"]),
                *(common.fmt(rates.get(layout)) for layout in layouts),
                *(
                    common.fmt(rates.get(layout) and jax["img_per_s"] / rates[layout], 2)
                    for layout in layouts
                ),
                common.fmt(best and jax["img_per_s"] / best, 2),
            ]
        )
    return (
        "## JAX ÷ torch at its best\n\n"
        "torch's ODE blocks checkpointed beside our dto and not beside auto (baseline: no ODE "
        "blocks); each layout timed in its own rounds, alternating with JAX.\n\n"
        + common.markdown_table(
            [
                "model",
                "variant",
                "conv",
                "gradient",
                "torch ckpt",
                "JAX img/s",
                *(f"torch {layout} img/s" for layout in layouts),
                *(f"JAX ÷ torch {layout}" for layout in layouts),
                "JAX ÷ torch best",
            ],
            body,
            left=5,
        )
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        for name, value in saved.get("settings", {}).items():
            setattr(args, name, value)
        if saved.get("rows"):
            report(saved["env"], saved["peaks"], saved["rows"], args)
            if all(row.get("torch_layouts") for row in saved["rows"]):
                common.emit(torch_at_its_best_table(saved["rows"]), args.markdown)
        if saved.get("split"):
            common.emit(split_table(saved["split"], args), args.markdown)
        return
    env = common.environment(args.torch_python, args.cpu_malloc_tuned)
    settings = {
        name: getattr(args, name)
        for name in ("batch_size", "steps", "warmup", "repeats", "peak_n", "split_iters")
    }
    common.emit(
        "## Run\n\n"
        + "\n".join(f"- {key}: `{value}`" for key, value in env.items())
        + f"\n- torch rows: torch_ref.py bench, GLIBC_TUNABLES={common.TORCH_GLIBC_TUNABLES}",
        args.markdown,
    )
    results: dict[str, Any] = {"env": env, "settings": settings, "peaks": [], "rows": []}
    if "steps" in args.sections:
        results["peaks"] = peak_rows(args, "start")
        for model in args.models:
            for variant in args.variants:
                results["rows"] += measure(model, variant, args)
                gc.collect()
                common.write_json(args.json, results)
        results["peaks"] += peak_rows(args, "end")
        common.write_json(args.json, results)
        report(env, results["peaks"], results["rows"], args)
        if args.torch_python is not None:
            common.emit(torch_at_its_best_table(results["rows"]), args.markdown)
    if "split" in args.sections:
        results["split"] = []
        for model in args.models:
            for variant in args.variants:
                results["split"] += split(model, variant, args)
                gc.collect()
                common.write_json(args.json, results)
        common.emit(split_table(results["split"], args), args.markdown)


if __name__ == "__main__":
    main()
