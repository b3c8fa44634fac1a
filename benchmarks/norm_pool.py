"""BatchNorm and the max pool on the models' shapes: XLA's, impl "cpu"'s, and oneDNN's alone.

    .venv/bin/python -m benchmarks.norm_pool --json norm_pool.json

Per shape, forward and forward + backward of training-mode BatchNorm with a ReLU
(``anodev2_jax.nn.normalization.batch_norm``) and of the max pool
(``anodev2_jax.nn.pooling.max_pool``), each jitted alone with impl "xla" and with impl "cpu"
(the C++ BatchNorm, ``anodev2_jax.cpu.batch_norm``; oneDNN's max pool through our FFI call,
``anodev2_jax.cpu.max_pool``), beside oneDNN's primitives called directly on the same NHWC
float32 shape (``benchmarks/onednn_norm_pool.cc``, compiled here against the oneDNN wheel
and run as a child process, over preallocated buffers).
This process runs with train.py's malloc settings (``--cpu_malloc``). Median ms of
``--reps`` calls; the three alternate for ``--rounds`` rounds and each keeps its best
median. Needs a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from anodev2_jax.cpu import native, onednn
from anodev2_jax.nn import normalization, pooling
from benchmarks import common

SOURCE = Path(__file__).with_name("onednn_norm_pool.cc")
# name: (H, W, C, pool size or 0 for BatchNorm)
SHAPES = {
    "bn 32x32x16": (32, 32, 16, 0),  # ResNet-4/10 stem and blocks
    "bn 16x16x32": (16, 16, 32, 0),  # ResNet-10 layer2
    "bn 32x32x64": (32, 32, 64, 0),  # AlexNet conv1
    "bn 16x16x64": (16, 16, 64, 0),  # AlexNet ODE block
    "pool 8 at 32x32x16": (32, 32, 16, 8),  # ResNet-4
    "pool 8 at 16x16x32": (16, 16, 32, 8),  # ResNet-10
    "pool 2 at 32x32x64": (32, 32, 64, 2),  # AlexNet after conv1
    "pool 2 at 16x16x64": (16, 16, 64, 2),  # AlexNet after the ODE block
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shapes", type=common.name_list(tuple(SHAPES), "shape"), default=list(SHAPES)
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=2)
    common.add_cpu_malloc_arg(parser)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def build(workdir: Path) -> Path:
    """The oneDNN timing program, compiled against the wheel under sys.prefix."""
    root = onednn.prefix()
    if root is None:
        raise SystemExit("needs the oneDNN wheels (the README's install)")
    compiler = native.find_compiler()
    binary = workdir / "onednn_norm_pool"
    lib = root / "lib"
    flags = ["-O2", "-std=c++17", f"-I{root / 'include'}", f"-L{lib}", f"-Wl,-rpath,{lib}"]
    subprocess.run([compiler, *flags, str(SOURCE), "-ldnnl", "-o", str(binary)], check=True)
    return binary


def onednn_ms(binary: Path, shape: tuple[int, int, int, int], batch: int, reps: int):
    h, w, c, size = shape
    args = ["pool", batch, h, w, c, size] if size else ["bn", batch, h, w, c]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # as anodev2_jax.cpu.onednn sets it
    command = [str(binary), *map(str, args), str(reps)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    values = dict(line.split() for line in out.splitlines())
    return {"fwd": float(values["fwd"]), "fwd+bwd": float(values["fwd+bwd"])}


def jitted(
    shape: tuple[int, int, int, int], batch: int, impl: str
) -> dict[str, Callable[[], jax.Array]]:
    """The op's forward and forward + backward with ``impl`` on this shape, ready to call."""
    h, w, c, size = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, h, w, c)), jnp.float32)
    fn: Callable[..., jax.Array]
    if size:
        fn = lambda x: pooling.max_pool(x, size, impl)
        params: tuple[jax.Array, ...] = ()
    else:
        fn = lambda x, s, b: normalization.batch_norm(
            x, {"scale": s, "bias": b}, True, relu=True, impl=impl
        )[0]
        params = (jnp.ones((c,), jnp.float32), jnp.full((c,), 0.1, jnp.float32))
    y = jax.eval_shape(fn, x, *params)
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    forward = jax.jit(fn)
    both = jax.jit(lambda x, g, *p: jax.vjp(fn, x, *p)[1](g))
    return {
        "fwd": lambda: jax.block_until_ready(forward(x, *params)),
        "fwd+bwd": lambda: jax.block_until_ready(both(x, g, *params)),
    }


def median_ms(fn: Callable[[], object], reps: int) -> float:
    return 1e3 * statistics.median(common.time_calls(fn, reps, warmup=3))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    common.tune_malloc(args)  # as train.py runs: freed buffers are reused, not faulted in again
    if not onednn.available():
        raise SystemExit("oneDNN's calls did not build; see the warning above")
    env = common.environment(None, args.cpu_malloc_tuned)
    print(f"{env['cpu']}; {env['cpu_count']} CPUs; batch {args.batch}; median ms", flush=True)
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        binary = build(Path(tmp))
        for name in args.shapes:
            fns = {impl: jitted(SHAPES[name], args.batch, impl) for impl in ("xla", "cpu")}
            best: dict[str, dict[str, float]] = {"xla": {}, "cpu": {}, "onednn": {}}
            for _ in range(args.rounds):
                times = {"onednn": onednn_ms(binary, SHAPES[name], args.batch, args.reps)}
                for impl, passes in fns.items():
                    times[impl] = {step: median_ms(fn, args.reps) for step, fn in passes.items()}
                for impl, ms in times.items():
                    for step, t in ms.items():
                        best[impl][step] = min(best[impl].get(step, t), t)
            for step in fns["cpu"]:
                xla, cpu, alone = (best[impl][step] for impl in ("xla", "cpu", "onednn"))
                rows.append(
                    [name, step, *(f"{t:.2f}" for t in (xla, cpu, alone)), f"{xla / cpu:.2f}"]
                )
                print(f"{name:20s} {step:8s} xla {xla:7.2f}  cpu {cpu:7.2f}  oneDNN {alone:7.2f}")
            results.append({"shape": name, **best})
    print()
    headers = ["op", "pass", "xla ms", "cpu ms", "oneDNN alone ms", "xla ÷ cpu"]
    print(common.markdown_table(headers, rows))
    common.write_json(args.json, {"environment": env, "batch": args.batch, "rows": results})


if __name__ == "__main__":
    main()
