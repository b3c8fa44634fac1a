"""What ``config.input_pipeline`` buys: training steps fed from the host against the device.

    .venv/bin/python -m benchmarks.input_path --json input_path.json
    .venv/bin/python -m benchmarks.input_path --steps_per_dispatch 1,20 --rounds 2  # quick

For each model × variant (default ResNet-4 baseline), ``--steps`` training steps of batch
``--batch_size`` on a CIFAR-10-sized random uint8 training set (``--num_train`` images), run as
``training.train_and_evaluate`` runs them (``anodev2_jax.training.input_pipeline``): the
dispatches of :func:`~anodev2_jax.training.input_pipeline.dispatch_lengths` from the start of an
epoch, and at every log boundary (every ``--log_every_steps``) the metrics fetched to the
host, which waits for them. The pipelines:

- ``host``: one dispatch per step, each batch indexed by numpy and copied to the device;
- ``device K=…``: the training set on the device, up to K steps per dispatch in a jitted scan,
  for each K of ``--steps_per_dispatch``.

They alternate in ``--rounds`` rounds so that all see the same load; each reports its best
round, img/s = steps · batch / seconds, and the ratio to ``host``; "first round" includes
the compilations.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anodev2_jax import backend, training
from anodev2_jax.nn import conv as conv_lib
from anodev2_jax.nn import models
from anodev2_jax.training import data, input_pipeline, parallel
from benchmarks import common


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: use comma-separated integers ≥ 1, e.g. 1,5,20")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", type=common.name_list(common.BENCH_MODELS, "model"), default=["resnet4"]
    )
    parser.add_argument(
        "--variants", type=common.name_list(common.BENCH_VARIANTS, "variant"), default=["baseline"]
    )
    parser.add_argument(
        "--conv_impl",
        choices=conv_lib.IMPLS,
        default="auto",
        help="auto: the CPU formulation on the CPU, XLA's elsewhere (as training)",
    )
    parser.add_argument("--steps_per_dispatch", type=int_list, default=[1, 5, 20])
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_train", type=int, default=50_000, help="training-set images")
    parser.add_argument("--log_every_steps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the pipelines")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    common.add_cpu_malloc_arg(parser)
    args = parser.parse_args(argv)
    if min(args.batch_size, args.log_every_steps, args.steps, args.rounds) < 1:
        raise ValueError(
            f"--batch_size={args.batch_size}, --log_every_steps={args.log_every_steps}, "
            f"--steps={args.steps} and --rounds={args.rounds} must be ≥ 1"
        )
    if args.steps > args.num_train // args.batch_size:
        raise ValueError(
            f"--steps={args.steps} exceeds the {args.num_train // args.batch_size} steps of an "
            f"epoch of --num_train={args.num_train} at --batch_size={args.batch_size}"
        )
    if max(args.steps_per_dispatch) > args.log_every_steps:
        raise ValueError(
            f"--steps_per_dispatch={args.steps_per_dispatch} must be ≤ --log_every_steps="
            f"{args.log_every_steps}: a dispatch ends at every log boundary"
        )
    common.tune_malloc(args)
    return args


class Pipeline:
    """One input pipeline of one model's train step; ``call()`` runs ``--steps`` steps."""

    def __init__(self, name: str, steps_per_dispatch: int, config: Any, dataset: tuple, args):
        self.name, self.args = name, args
        model = training.model_from_config(config)
        optimizer = training.make_optimizer(config, args.num_train // args.batch_size)
        mesh = parallel.make_mesh()
        step = training.make_train_step(model, optimizer, jnp.dtype(config.dtype))
        kind = "host" if name == "host" else "device"
        self.feed = input_pipeline.make_input(kind, step, *dataset, mesh, steps_per_dispatch)
        self.state = parallel.replicate(training.create_state(model, optimizer, config), mesh)
        self.order = self.feed.epoch(data.epoch_batches(args.num_train, args.batch_size, 0, 0))
        self.lengths = input_pipeline.dispatch_lengths(
            0, args.steps, args.log_every_steps, self.feed.steps_per_dispatch
        )

    def call(self) -> float:
        """Seconds for ``--steps`` steps, logging as train_and_evaluate does."""
        start, step, pending = time.perf_counter(), 0, []
        for num_steps in self.lengths:
            self.state, metrics = self.feed.run(self.state, self.order, step, num_steps)
            step += num_steps
            pending.append((step, num_steps, metrics))
            if step % self.args.log_every_steps == 0 or step == self.args.steps:
                losses = [float(m["loss"]) for _, m in self.feed.fetch(pending)]
                if not np.all(np.isfinite(losses)):
                    raise RuntimeError(f"non-finite loss {losses} in the benchmark")
                pending = []
        jax.block_until_ready(self.state)
        return time.perf_counter() - start


def measure(model: str, variant: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    config = common.load_config(model, variant, args.batch_size, args.conv_impl)
    rng = np.random.default_rng(0)
    dataset = (
        rng.integers(0, 256, (args.num_train, *models.IMAGE_SHAPE), dtype=np.uint8),
        rng.integers(0, models.NUM_CLASSES, args.num_train).astype(np.int32),
    )
    pipelines = [Pipeline("host", 1, config, dataset, args)] + [
        Pipeline(f"device K={k}", k, config, dataset, args) for k in args.steps_per_dispatch
    ]
    first = {p.name: p.call() for p in pipelines}  # compiles every dispatch length
    rounds: dict[str, list[dict[str, float]]] = {p.name: [] for p in pipelines}
    for _ in range(args.rounds):
        for pipeline in pipelines:
            load = os.getloadavg()[0]
            seconds = pipeline.call()
            rounds[pipeline.name].append({"seconds": seconds, "load_1min_before": load})
            print(
                f"{model} {variant} {pipeline.name}: {seconds:.3f} s, load {load:.1f}",
                file=sys.stderr,
                flush=True,
            )
    images = args.steps * args.batch_size
    conv_impl = config.conv_impl
    if conv_impl == "auto":  # as conv2d resolves it
        conv_impl = backend.conv_impl("auto")
    rows = []
    for pipeline in pipelines:
        best = min(r["seconds"] for r in rounds[pipeline.name])
        rows.append(
            {
                "model": model,
                "variant": variant,
                "pipeline": pipeline.name,
                "conv_impl": conv_impl,
                "batch": args.batch_size,
                "steps": args.steps,
                "first_round_s": first[pipeline.name],
                "best_s": best,
                "img_per_s": images / best,
                "load_1min": [r["load_1min_before"] for r in rounds[pipeline.name]],
                "rounds": rounds[pipeline.name],
            }
        )
    for row in rows:
        row["vs_host"] = rows[0]["best_s"] / row["best_s"]
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    headers = ["model", "variant", "pipeline", "conv impl", "img/s", "× host", "ms/step",
               "first round s", "load"]  # fmt: skip
    return common.markdown_table(
        headers,
        [
            [
                r["model"],
                r["variant"],
                r["pipeline"],
                r["conv_impl"],
                common.fmt(r["img_per_s"]),
                common.fmt(r["vs_host"], 2),
                common.fmt(1000 * r["best_s"] / r["steps"], 2),
                common.fmt(r["first_round_s"], 1),
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
    device = jax.devices()[0].device_kind
    common.emit(
        f"### Input pipelines, batch {args.batch_size}, {args.steps} steps logged every "
        f"{args.log_every_steps} ({device}; host CPU {env['cpu']}, {env['cpu_count']} cores, "
        f"{env['date']})\n\n" + table(rows),
        args.markdown,
    )
    common.write_json(args.json, {"environment": env, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
