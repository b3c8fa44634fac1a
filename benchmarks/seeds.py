"""What ``config.num_seeds`` buys: k seeds' train steps in one program against k separate ones.

    .venv/bin/python -m benchmarks.seeds --json seeds.json
    .venv/bin/python -m benchmarks.seeds --num_seeds 3 --variants anode --rounds 3 --steps 5

For each model × variant (default ResNet-4 anode) and each strategy, one call trains all k
seeds one step on the same uint8 batch (augmented inside the step, as in training):

- ``separate``: k single-seed train steps (``training.make_train_step``, jitted as training
  jits it), called one after another: what k independent runs do.
- ``loop``: ``seeds.over_seeds(step, k, "loop")``, the k steps one after another inside one
  jitted program, unrolled (what ``seed_batching="auto"`` picks on the CPU).
- ``map``: the same by ``jax.lax.map`` (one copy of the step in the program), for comparison.
- ``vmap``: ``seeds.over_seeds(step, k, "vmap")``: one batched program (``"auto"`` on GPU/TPU).

The strategies alternate in ``--rounds`` rounds so that all see the same load; each reports
its best round's median call time and img/s = k · batch / median; "first call" is
compilation plus one step. ``--conv_impl auto``
resolves as training does (the CPU formulation except under vmap, where XLA's).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from anodev2_jax import backend, training
from anodev2_jax.nn import conv as conv_lib
from anodev2_jax.training import parallel, seeds
from benchmarks import common

STRATEGIES = ("separate", "loop", "map", "vmap")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", type=common.name_list(common.BENCH_MODELS, "model"), default=["resnet4"]
    )
    parser.add_argument(
        "--variants", type=common.name_list(common.BENCH_VARIANTS, "variant"), default=["anode"]
    )
    parser.add_argument(
        "--strategies", type=common.name_list(STRATEGIES, "strategy"), default=list(STRATEGIES)
    )
    parser.add_argument(
        "--conv_impl",
        choices=conv_lib.IMPLS,
        default="auto",
        help="auto: as training resolves it (XLA's convolution under vmap, else the CPU one)",
    )
    parser.add_argument("--num_seeds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed calls per round (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the strategies")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    common.add_cpu_malloc_arg(parser)
    args = parser.parse_args(argv)
    if min(args.num_seeds, args.batch_size, args.steps, args.rounds) < 1 or args.warmup < 0:
        raise ValueError(
            f"--num_seeds={args.num_seeds}, --batch_size={args.batch_size}, --steps="
            f"{args.steps} and --rounds={args.rounds} must be ≥ 1, --warmup={args.warmup} ≥ 0"
        )
    common.tune_malloc(args)
    return args


class Strategy:
    """One way of stepping k seeds: ``call()`` runs one step of every seed, blocking."""

    def __init__(self, name: str, model: str, variant: str, args: argparse.Namespace):
        self.name = name
        k = args.num_seeds
        batching = "vmap" if name == "vmap" else "loop"
        config = common.load_config(model, variant, args.batch_size, args.conv_impl)
        config.num_seeds, config.seed_batching = k, batching
        net = training.model_from_config(config)
        self.conv_impl = net.conv_impl
        if self.conv_impl == "auto":  # as conv2d resolves it
            self.conv_impl = backend.conv_impl("auto")
        optimizer = training.make_optimizer(config, common.TRAIN_EXAMPLES // args.batch_size)
        state = training.create_state(net, optimizer, config)
        step = training.make_train_step(net, optimizer, jnp.dtype(config.dtype))
        mesh = parallel.make_mesh()
        jit = lambda fn: parallel.jit_data_parallel(fn, mesh, num_batch_args=2, donate_state=True)
        images, labels = common.random_batch(args.batch_size)
        self.batch = parallel.global_batch((images, labels), mesh)
        start = time.perf_counter()  # the first call: compilation and one step
        if name == "separate":
            single = jit(step)
            self.states = [parallel.replicate(seeds.select(state, i), mesh) for i in range(k)]
            self.states = [single(s, *self.batch)[0] for s in self.states]  # compiles
            self.fn = single
        else:
            if name == "map":
                fn = lambda state, *batch: jax.lax.map(lambda one: step(one, *batch), state)
            else:
                fn = seeds.over_seeds(step, k, batching)
            self.fn = jit(fn)
            self.states = [self.fn(parallel.replicate(state, mesh), *self.batch)[0]]
        jax.block_until_ready(self.states)
        self.first_call_s = time.perf_counter() - start

    def call(self) -> None:
        self.states = [self.fn(s, *self.batch)[0] for s in self.states]
        jax.block_until_ready(self.states)


def measure(model: str, variant: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    strategies = [Strategy(name, model, variant, args) for name in args.strategies]
    rounds: dict[str, list[dict[str, Any]]] = {s.name: [] for s in strategies}
    for _ in range(args.rounds):
        for strategy in strategies:
            load = os.getloadavg()[0]
            times = common.time_calls(strategy.call, args.steps, args.warmup)
            rounds[strategy.name].append(
                {"median_s": statistics.median(times), "all_s": times, "load_1min_before": load}
            )
            print(
                f"{model} {variant} {strategy.name}: median {statistics.median(times):.3f} s, "
                f"load {load:.1f}",
                file=sys.stderr,
                flush=True,
            )
    images = args.num_seeds * args.batch_size
    rows = []
    for strategy in strategies:
        best = min(rounds[strategy.name], key=lambda r: r["median_s"])
        rows.append(
            {
                "model": model,
                "variant": variant,
                "strategy": strategy.name,
                "conv_impl": strategy.conv_impl,
                "num_seeds": args.num_seeds,
                "batch": args.batch_size,
                "first_call_s": strategy.first_call_s,
                "median_s": best["median_s"],
                "img_per_s": images / best["median_s"],
                "load_1min": [r["load_1min_before"] for r in rounds[strategy.name]],
                "rounds": rounds[strategy.name],
            }
        )
    separate = next((r for r in rows if r["strategy"] == "separate"), None)
    for row in rows:
        row["vs_separate"] = separate["median_s"] / row["median_s"] if separate else None
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    headers = ["model", "variant", "strategy", "conv impl", "img/s", "× separate", "call s",
               "first call s", "load"]  # fmt: skip
    return common.markdown_table(
        headers,
        [
            [
                r["model"],
                r["variant"],
                r["strategy"],
                r["conv_impl"],
                common.fmt(r["img_per_s"]),
                common.fmt(r["vs_separate"], 2),
                common.fmt(r["median_s"], 3),
                common.fmt(r["first_call_s"], 1),
                ", ".join(f"{x:.1f}" for x in r["load_1min"]),
            ]
            for r in rows
        ],
        left=4,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = common.environment(None, args.cpu_malloc_tuned)
    rows = [row for m in args.models for v in args.variants for row in measure(m, v, args)]
    common.emit(
        f"### k = {args.num_seeds} seeds, batch {args.batch_size} each ({env['cpu']}, "
        f"{env['cpu_count']} cores, {env['date']})\n\n" + table(rows),
        args.markdown,
    )
    common.write_json(args.json, {"environment": env, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
