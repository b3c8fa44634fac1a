"""Per-convolution timings of the models' convolutions: forward, input and kernel gradient.

    .venv/bin/python -m benchmarks.conv_microbench --json conv.json
    .venv/bin/python -m benchmarks.conv_microbench --shapes res16 --reps 7 --step  # quick

Every row is one convolution of the models at batch 128 in float32. Each formulation of a
pass is one jitted function, checked against XLA's own result (``err``: max |a − b| / max |b|)
and timed round-robin with the other formulations of its row, so that the load of the shared
machine hits them alike: compare within a row only. Times are the median of ``--reps`` calls
after ``--warmup``. Formulations (``anodev2_jax.cpu.conv``):

- ``xla``: autodiff of ``lax.conv_general_dilated`` (the input/kernel gradient alone, by jax.vjp);
- ``cpu``, ``cpu_paired``: what ``conv2d`` runs with that impl, each pass by jax.vjp of it
  (the kernel gradient behind its conditional, the same for both; oneDNN's where
  ``anodev2_jax.cpu.onednn.takes`` gives it the pass);
- ``hand``: impl "cpu" with oneDNN off, traced with ``onednn.takes`` false: the hand-written
  kernels and XLA formulations it falls back on, for every row;
- ``onednn``: oneDNN's FFI call alone (``anodev2_jax.cpu.onednn``), for every row;
- ``conv``: the stride-1 kernel gradient as one convolution, without the conditional;
- ``taps``: the kernel gradient as one matmul per shifted (strided) slice of the padded input;
- with ``--extra``, two more kernel gradients that lost: ``taps_barrier``, the taps chained by
  ``lax.optimization_barrier`` so that each is its own computation, and ``im2col``, the
  (kh·kw·Cin, N·Ho·Wo) patches of x stacked, then one matmul.

Passes: ``fwd``; ``dx``; ``dw`` with x and g given as arrays; ``dw+bn``: the same, with x and
g made inside the function by a per-channel affine map and ReLU (its mask for g), as BatchNorm
and ReLU make them in a model, and returned too (a model keeps them for its other uses):
there XLA:CPU fuses their producers into the kernel gradient's transposes.
``--step`` times the gradient of a ResNet-like block (10 Euler steps of
conv3x3-BN-ReLU-conv3x3-BN, 16 channels, 32×32) with each ``conv2d`` impl. ``cpu_paired``
wins when XLA gets about one core and loses on two idle ones: note the load.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from anodev2_jax.cpu import conv as cpu_conv
from anodev2_jax.cpu import onednn
from anodev2_jax.nn import conv as conv_lib
from benchmarks import common

# name: (spatial size, Cin, Cout, kernel, stride, padding) as the models call conv2d
SHAPES = {
    "stem3": (32, 3, 16, 3, 1, 1),  # ResNet-4/10 conv1
    "res16": (32, 16, 16, 3, 1, 1),  # ResNet-4/10 ODE blocks
    "down3": (32, 16, 32, 3, 2, 1),  # ResNet-10 layer2_1 conv1
    "down1": (32, 16, 32, 1, 2, 0),  # ResNet-10 layer2_1 shortcut
    "res32": (16, 32, 32, 3, 1, 1),  # ResNet-10 layer2_1 conv2 and layer2_2
    "alex_stem": (32, 3, 64, 5, 1, 2),  # AlexNet conv1
    "alex64": (16, 64, 64, 5, 1, 2),  # AlexNet ODE block
}
FORMULATIONS = (
    "xla",
    "cpu",
    "cpu_paired",
    "hand",
    "onednn",
    "conv",
    "taps",
    "taps_barrier",
    "im2col",
)
TOLERANCE = 1e-4  # float32 sums of up to 131072 products, in a different order


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shapes", type=common.name_list(tuple(SHAPES), "shape"), default=list(SHAPES)
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7, help="timed calls per formulation")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--extra", action="store_true", help="also time the losing formulations")
    parser.add_argument("--step", action="store_true", help="also time the ResNet-like step")
    common.add_cpu_malloc_arg(parser)
    parser.add_argument(
        "--torch_python",
        type=Path,
        default=None,
        help="python of a venv with torch: time the same passes in PyTorch (torch_conv.py)",
    )
    parser.add_argument("--step_reps", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    return parser.parse_args(argv)


def round_robin(
    fns: dict[str, Callable[[], Any]], reps: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds of ``reps`` calls of each fn, interleaved call by call."""
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return times


def relative_error(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _tap_slices(
    x: jax.Array, g: jax.Array, k: int, stride: int, pads: conv_lib.Pads
) -> Iterator[jax.Array]:
    """For every tap (i, j), row-major: the (R, Cin) rows of the padded x that it reads."""
    n, ho, wo, _ = g.shape
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    for i in range(k):
        for j in range(k):
            limit = (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, x.shape[3])
            x_ij = lax.slice(xp, (0, i, j, 0), limit, (1, stride, stride, 1))
            yield x_ij.reshape(n * ho * wo, x.shape[3])


def kernel_grad_taps_barrier(
    x: jax.Array, g: jax.Array, k: int, stride: int, pads: conv_lib.Pads
) -> jax.Array:
    g_rows = g.reshape(-1, g.shape[3])
    taps = []
    for x_ij in _tap_slices(x, g, k, stride, pads):
        tap = x_ij.T @ g_rows
        tap, g_rows = lax.optimization_barrier((tap, g_rows))
        taps.append(tap)
    return jnp.stack(taps).reshape(k, k, x.shape[3], g.shape[3])


def kernel_grad_im2col(
    x: jax.Array, g: jax.Array, k: int, stride: int, pads: conv_lib.Pads
) -> jax.Array:
    patches = jnp.concatenate([x_ij.T for x_ij in _tap_slices(x, g, k, stride, pads)])
    return (patches @ g.reshape(-1, g.shape[3])).reshape(k, k, x.shape[3], g.shape[3])


def hand(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn traced with oneDNN off: impl "cpu" on its hand-written kernels alone."""

    def traced(*args: Any) -> Any:
        with mock.patch.object(onednn, "takes", lambda *args, **kwargs: False):
            return fn(*args)

    return traced


def _channels(v: jax.Array) -> jax.Array:
    return v.reshape(1, 1, 1, -1)


def pass_functions(
    shape: tuple[int, int, int, int, int, int], batch: int, extra: bool = False
) -> dict[str, tuple[dict[str, Callable[..., Any]], tuple[jax.Array, ...]]]:
    """For each pass: {formulation: jitted fn} and the arguments they all take."""
    size, cin, cout, k, stride, padding = shape
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (batch, size, size, cin), jnp.float32)
    w = jax.random.normal(keys[1], (k, k, cin, cout), jnp.float32) / float(np.sqrt(k * k * cin))
    y_shape = jax.eval_shape(lambda x, w: conv_lib.conv2d(x, w, stride, padding), x, w).shape
    g = jax.random.normal(keys[2], y_shape, jnp.float32)
    scale_in = 1.0 + 0.1 * jax.random.normal(keys[3], (cin,), jnp.float32)
    scale_out = 1.0 + 0.1 * jax.random.normal(keys[4], (cout,), jnp.float32)
    pads = conv_lib.check_args(x, w, stride, padding, "xla")

    def conv(impl: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
        return lambda x, w: conv_lib.conv2d(x, w, stride, padding, impl)

    dw_of: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
        "xla": lambda x, g: jax.vjp(lambda w: conv("xla")(x, w), w)[1](g)[0],
        "cpu": lambda x, g: jax.vjp(lambda w: conv("cpu")(x, w), w)[1](g)[0],
        "taps": lambda x, g: cpu_conv.kernel_grad_taps(x, g, w.shape, stride, pads),
    }
    if stride == 1 and k > 1:
        dw_of["conv"] = lambda x, g: cpu_conv.kernel_grad_conv(x, g, w.shape, pads)
    if extra:
        dw_of["taps_barrier"] = lambda x, g: kernel_grad_taps_barrier(x, g, k, stride, pads)
        dw_of["im2col"] = lambda x, g: kernel_grad_im2col(x, g, k, stride, pads)

    def with_bn(dw: Callable[..., jax.Array]) -> Callable[..., tuple[jax.Array, ...]]:
        # x and g are outputs too: a model keeps x for the forward convolution and feeds g to
        # the input gradient, so they exist in memory whatever the kernel gradient does
        def fn(x: jax.Array, g: jax.Array) -> tuple[jax.Array, ...]:
            x = jax.nn.relu(x * _channels(scale_in) + 0.1)
            g = g * _channels(scale_out) * (g > -1)
            return dw(x, g), x, g

        return fn

    fwd_of = {impl: conv(impl) for impl in ("xla", "cpu", "cpu_paired")}
    dx_of: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
        "xla": lambda w, g: jax.vjp(lambda x: conv("xla")(x, w), x)[1](g)[0],
        "cpu": lambda w, g: jax.vjp(lambda x: conv("cpu")(x, w), x)[1](g)[0],
        "cpu_paired": lambda w, g: jax.vjp(lambda x: conv("cpu_paired")(x, w), x)[1](g)[0],
    }
    if onednn.available():  # oneDNN alone, and the hand kernels alone, whatever "cpu" picks
        fwd_of["hand"], dx_of["hand"], dw_of["hand"] = map(
            hand, (fwd_of["cpu"], dx_of["cpu"], dw_of["cpu"])
        )
        before, out_hw = (pads[0][0], pads[1][0]), y_shape[1:3]
        fwd_of["onednn"] = lambda x, w: onednn.conv_forward(x, w, before, stride, out_hw)
        dx_of["onednn"] = lambda w, g: onednn.conv_input_grad(g, w, x.shape, before, stride)
        dw_of["onednn"] = lambda x, g: onednn.conv_kernel_grad(x, g, (k, k), before, stride)
    passes = {
        "fwd": (fwd_of, (x, w)),
        "dx": (dx_of, (w, g)),
        "dw": (dw_of, (x, g)),
        "dw+bn": ({name: with_bn(fn) for name, fn in dw_of.items()}, (x, g)),
    }
    return {
        name: ({f: jax.jit(fn) for f, fn in sorted(fns.items(), key=_order)}, args)
        for name, (fns, args) in passes.items()
    }


def _first(result: Any) -> jax.Array:
    return result[0] if isinstance(result, tuple) else result


def _order(item: tuple[str, Any]) -> int:
    return FORMULATIONS.index(item[0])


def time_shape(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for pass_name, (fns, fn_args) in pass_functions(SHAPES[name], args.batch, args.extra).items():
        reference = _first(fns["xla"](*fn_args))
        errors = {f: relative_error(_first(fn(*fn_args)), reference) for f, fn in fns.items()}
        times = round_robin(
            {f: functools.partial(fn, *fn_args) for f, fn in fns.items()}, args.reps, args.warmup
        )
        rows.append(
            {
                "shape": name,
                "pass": pass_name,
                "ms": {f: 1e3 * statistics.median(t) for f, t in times.items()},
                "ms_min": {f: 1e3 * min(t) for f, t in times.items()},
                "err": errors,
                "ok": all(e <= TOLERANCE for e in errors.values()),
            }
        )
    return rows


def step_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Gradient w.r.t. both kernels of 10 Euler steps of a ResNet block, per conv2d impl."""
    keys = jax.random.split(jax.random.key(1), 3)
    channels = 16
    z0 = jax.random.normal(keys[0], (args.batch, 32, 32, channels), jnp.float32)
    kernels = tuple(
        jax.random.normal(key, (3, 3, channels, channels), jnp.float32) / 12.0 for key in keys[1:]
    )

    def batch_norm(h: jax.Array) -> jax.Array:
        mean = jnp.mean(h, axis=(0, 1, 2), keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=(0, 1, 2), keepdims=True)
        return (h - mean) * lax.rsqrt(var + 1e-5)

    def loss(kernels: tuple[jax.Array, jax.Array], z: jax.Array, impl: str) -> jax.Array:
        w1, w2 = kernels
        for _ in range(10):
            h = jax.nn.relu(batch_norm(conv_lib.conv2d(z, w1, 1, 1, impl)))
            z = z + 0.1 * batch_norm(conv_lib.conv2d(h, w2, 1, 1, impl))
        return jnp.mean(jnp.square(z))

    impls = [impl for impl in conv_lib.IMPLS if impl != "auto"]
    grads = {impl: jax.jit(jax.grad(lambda k, z, impl=impl: loss(k, z, impl))) for impl in impls}
    reference = grads["xla"](kernels, z0)
    errors = {
        impl: max(map(relative_error, grad(kernels, z0), reference)) for impl, grad in grads.items()
    }
    times = round_robin(
        {impl: (lambda grad=grad: grad(kernels, z0)) for impl, grad in grads.items()},
        args.step_reps,
        args.warmup,
    )
    return [
        {
            "impl": impl,
            "ms": 1e3 * statistics.median(times[impl]),
            "ms_min": 1e3 * min(times[impl]),
            "vs_xla": statistics.median(times["xla"]) / statistics.median(times[impl]),
            "err": errors[impl],
        }
        for impl in impls
    ]


def add_torch_times(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """row["torch_ms"], row["torch_cl_ms"]: torch_conv.py's time of the row's pass (dw+bn: its
    dw) in NCHW and in channels_last."""
    shapes = [[name, *SHAPES[name]] for name in args.shapes]
    command = [
        str(args.torch_python),
        str(Path(__file__).with_name("torch_conv.py")),
        *("--batch", str(args.batch), "--reps", str(args.reps), "--warmup", str(args.warmup)),
        *("--shapes", json.dumps(shapes)),
    ]
    for key, extra in (("torch_ms", []), ("torch_cl_ms", ["--channels_last"])):
        torch_ms = {r["shape"]: r["ms"] for r in common.run_torch(command + extra)}
        for row in rows:
            row[key] = torch_ms[row["shape"]][row["pass"].removesuffix("+bn")]


def shape_label(name: str) -> str:
    size, cin, cout, k, stride, padding = SHAPES[name]
    return f"{name}: {cin}→{cout} {k}×{k}/{stride} p{padding} at {size}×{size}"


def table(rows: list[dict[str, Any]]) -> str:
    formulations = [f for f in FORMULATIONS if any(f in row["ms"] for row in rows)]
    with_torch = all("torch_ms" in row for row in rows)
    body = []
    for row in rows:
        ms, err = row["ms"], row["err"]
        cells = [common.fmt(ms.get(f), 2) for f in formulations]
        best = min((f for f in ms if f != "xla"), key=ms.__getitem__, default=None)
        ratio = ms["xla"] / ms["cpu"]
        worst = max(err.values())
        flag = "" if row["ok"] else " (!)"
        torch_cells = []
        if with_torch:
            torch_ms, torch_cl_ms = row["torch_ms"], row["torch_cl_ms"]
            torch_cells = [
                common.fmt(torch_ms, 2),
                common.fmt(torch_cl_ms, 2),
                common.fmt(ms["cpu"] / torch_ms, 2),
                common.fmt(ms["cpu"] / torch_cl_ms, 2),
            ]
        body.append(
            [
                shape_label(row["shape"]),
                row["pass"],
                *cells,
                common.fmt(ratio, 2),
                best,
                *torch_cells,
                f"{worst:.0e}{flag}",
            ]
        )
    headers = ["conv", "pass", *(f"{f} ms" for f in formulations), "xla ÷ cpu", "fastest"]
    if with_torch:
        headers += ["torch ms", "torch CL ms", "cpu ÷ torch (time)", "cpu ÷ torch CL (time)"]
    headers.append("err")
    return common.markdown_table(headers, body, left=2)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.reps < 1 or args.warmup < 0 or args.step_reps < 1:
        raise ValueError(
            f"--reps={args.reps}, --step_reps={args.step_reps} and --warmup={args.warmup}: "
            "use reps ≥ 1 and warmup ≥ 0"
        )
    if args.torch_python is not None and not args.torch_python.exists():
        raise ValueError(f"--torch_python={args.torch_python} does not exist")
    common.tune_malloc(args)
    env = common.environment(args.torch_python, args.cpu_malloc_tuned)
    rows: list[dict[str, Any]] = []
    for name in args.shapes:
        rows += time_shape(name, args)
        print(f"{shape_label(name)}: done", flush=True)
    if args.torch_python is not None:
        add_torch_times(rows, args)
    common.emit(
        f"Batch {args.batch}, float32, median of {args.reps} (ms)\n\n" + table(rows), args.markdown
    )
    payload: dict[str, Any] = {"environment": env, "rows": rows}
    if args.step:
        step = step_rows(args)
        payload["step"] = step
        step_table = common.markdown_table(
            ["impl", "ms", "min ms", "speed-up vs xla", "err"],
            [
                [
                    r["impl"],
                    common.fmt(r["ms"], 1),
                    common.fmt(r["ms_min"], 1),
                    common.fmt(r["vs_xla"], 2),
                    f"{r['err']:.0e}",
                ]
                for r in step
            ],
            left=1,
        )
        common.emit(
            "ResNet-like block gradient (10 Euler steps, 16 ch, 32×32)\n\n" + step_table,
            args.markdown,
        )
    payload["load_average_at_end"] = os.getloadavg()
    start, end = env["load_average_at_start"][0], payload["load_average_at_end"][0]
    cores = os.cpu_count()
    print(f"1-minute load average: {start:.1f} at the start, {end:.1f} at the end ({cores} cores)")
    common.write_json(args.json, payload)
    bad = [f"{r['shape']}/{r['pass']}" for r in rows if not r["ok"]]
    if bad:
        raise SystemExit(f"formulations differ from XLA's result by more than {TOLERANCE}: {bad}")


if __name__ == "__main__":
    main()
