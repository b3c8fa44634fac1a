"""What a training step that draws its ODE step count costs (``config.train_num_z_steps``).

    .venv/bin/python -m benchmarks.drawn_steps --model resnet4 --variant anode \\
        --num_z_steps 4 --draws 2,3,4,6 --plain 2 --json drawn.json

In ``--rounds`` alternating rounds, times the train step of the plain run (Nz = ``--plain``),
the step at each drawn Nz alone, and the step that draws (BatchNorm rows on
``--num_z_steps``' grid). The drawing step's mean time is checked against a second
computation of it, the mean of the fixed steps' medians at the step counts it drew, and
reported as a ratio to the plain step: what the option adds to training.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path

from benchmarks import common


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.split(","))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet4")
    parser.add_argument("--variant", default="anode")
    parser.add_argument("--num_z_steps", type=int, default=4, help="the BatchNorm rows' grid")
    parser.add_argument("--draws", type=_int_tuple, default=(2, 3, 4, 6), help="e.g. 2,3,4,6")
    parser.add_argument("--plain", type=int, default=2, help="the plain run's Nz")
    parser.add_argument("--gradient", default="backprop", help="the ODE blocks' gradient")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--conv_impl", default="auto")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round and step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    env = common.environment(None, False)
    print(f"{env['cpu']}; {env['cpu_count']} CPUs; jax {env['jax']}", flush=True)

    def step(**fields: object) -> common.CompiledStep:
        config = common.load_config(
            args.model, args.variant, args.batch_size, args.conv_impl, args.gradient, **fields
        )
        return common.CompiledStep(config)

    steps = {f"Nz={n}": step(num_z_steps=n) for n in sorted({args.plain, *args.draws})}
    drawn = "drawn from " + ",".join(map(str, args.draws))
    steps[drawn] = step(num_z_steps=args.num_z_steps, train_num_z_steps=args.draws)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, compiled in steps.items():
            times[name] += compiled.time_steps(args.steps, warmup=2)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    predicted = statistics.mean(ms[f"Nz={n}"] for n in steps[drawn].drawn)
    measured = 1e3 * statistics.mean(times[drawn])
    plain = ms[f"Nz={args.plain}"]
    rows = [
        [name, f"{v:.1f}", f"{args.batch_size / v * 1e3:.0f}", f"{v / plain:.2f}"]
        for name, v in ms.items()
    ]
    print(common.markdown_table(["step", "median ms", "img/s", "÷ plain"], rows, left=1))
    counts = {n: steps[drawn].drawn.count(n) for n in args.draws}
    print(
        f"\nthe drawing step drew {counts} in {len(steps[drawn].drawn)} timed steps: mean "
        f"{measured:.1f} ms, against {predicted:.1f} ms from the fixed steps at those Nz "
        f"({measured / predicted:.2f}); {measured / plain:.2f}x the plain step (Nz={args.plain})"
    )
    common.write_json(
        args.json,
        {
            "environment": env,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "median_ms": ms,
            "drawn": steps[drawn].drawn,
            "drawing_mean_ms": measured,
            "predicted_mean_ms": predicted,
        },
    )


if __name__ == "__main__":
    main()
