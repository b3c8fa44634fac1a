"""What the malloc settings of ``anodev2_jax.cpu.host_malloc`` change in a training step.

    .venv/bin/python -m benchmarks.host_malloc --models resnet4,resnet10 \\
        --variants anode,anodev2_conf1 --conv_impl cpu --json malloc.json

For each model × variant, one child process per setting (``--cpu_malloc default``: glibc as
it comes; ``tuned``), alternated ``--repeats`` times, each compiling the real training step
and timing ``--steps`` steps after ``--warmup``. Per step: the median wall time, and from
``getrusage`` over the timed steps the minor page faults and the user and kernel CPU seconds;
the resident memory at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks import common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10, help="the heap settles in ~10 steps")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "model,variant"
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        raise ValueError(
            f"--steps={args.steps}, --warmup={args.warmup}, --repeats={args.repeats}: use "
            "steps ≥ 1, warmup ≥ 0, repeats ≥ 1"
        )
    common.check_common_args(args)  # in a child: restarts it under --cpu_malloc
    return args


def child(args: argparse.Namespace) -> dict[str, Any]:
    """This process (already under its --cpu_malloc): one model × variant, timed."""
    model, variant = args.child.split(",")
    config = common.load_config(model, variant, args.batch_size, args.conv_impl[0])
    step = common.CompiledStep(config)
    step.time_steps(args.warmup, 0)
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = step.time_steps(args.steps, 0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "step_ms": 1e3 * statistics.median(times),
        "faults_per_step": (after.ru_minflt - before.ru_minflt) / args.steps,
        "user_s_per_step": (after.ru_utime - before.ru_utime) / args.steps,
        "system_s_per_step": (after.ru_stime - before.ru_stime) / args.steps,
        "tuned": args.cpu_malloc_tuned,
        "rss_mib": int(Path("/proc/self/statm").read_text().split()[1])
        * os.sysconf("SC_PAGE_SIZE")
        / 2**20,
    }


def run_child(model: str, variant: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "benchmarks.host_malloc",
        *("--child", f"{model},{variant}", "--cpu_malloc", mode),
        *("--conv_impl", args.conv_impl[0], "--batch_size", str(args.batch_size)),
        *("--steps", str(args.steps), "--warmup", str(args.warmup)),
    ]
    # without the parent's GLIBC_TUNABLES: "default" must start as glibc comes
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args)))
        return
    env = common.environment(None, args.cpu_malloc_tuned)
    rows = []
    for model in args.models:
        for variant in args.variants:
            rounds: dict[str, list[dict[str, Any]]] = {"default": [], "tuned": []}
            for _ in range(args.repeats):
                for mode, results in rounds.items():
                    results.append(run_child(model, variant, mode, args))
                    print(f"{model} {variant} {mode}: {results[-1]}", flush=True)
            best = {mode: min(r, key=lambda x: x["step_ms"]) for mode, r in rounds.items()}
            rows.append({"model": model, "variant": variant, **best, "rounds": rounds})
            common.write_json(args.json, {"env": env, "rows": rows})
    body = [
        [
            row["model"],
            row["variant"],
            *(common.fmt(row[m]["step_ms"], 1) for m in ("default", "tuned")),
            common.fmt(row["default"]["step_ms"] / row["tuned"]["step_ms"], 2),
            *(common.fmt(row[m]["faults_per_step"], 0) for m in ("default", "tuned")),
            *(common.fmt(1e3 * row[m]["system_s_per_step"], 0) for m in ("default", "tuned")),
            *(common.fmt(1e3 * row[m]["user_s_per_step"], 0) for m in ("default", "tuned")),
            *(common.fmt(row[m]["rss_mib"], 0) for m in ("default", "tuned")),
        ]
        for row in rows
    ]
    headers = [
        "model",
        "variant",
        "step ms, default",
        "tuned",
        "speed-up",
        "page faults / step, default",
        "tuned",
        "kernel CPU ms / step, default",
        "tuned",
        "user CPU ms / step, default",
        "tuned",
        "RSS MiB at the end, default",
        "tuned",
    ]
    common.emit(
        f"conv {args.conv_impl[0]}, batch {args.batch_size}, median of {args.steps} steps after "
        f"{args.warmup}; best of {args.repeats} alternating rounds\n\n"
        + common.markdown_table(headers, body),
        args.markdown,
    )


if __name__ == "__main__":
    main()
