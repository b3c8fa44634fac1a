"""How far each float32 formulation of the models' convolutions is from the exact result.

    .venv/bin/python -m benchmarks.conv_accuracy --json accuracy.json

For every convolution of ``benchmarks.conv_microbench.SHAPES`` and each pass (forward,
input gradient, kernel gradient) this prints max |a − exact| / max |exact| of

- ``xla``: autodiff of ``lax.conv_general_dilated`` in float32;
- ``hand``: impl "cpu" with oneDNN given nothing (the C++ kernels, the XLA formulations of
  ``anodev2_jax.cpu.conv``);
- ``onednn``: oneDNN's FFI call alone;

where exact is XLA's float64 convolution of the same float32 inputs. The inputs are shaped
as in training: x is non-negative with a mean of about 0.4 (after ReLU; the stems get
images normalized per channel, means off zero too), and g = dL/dy sums to zero over each
output channel (BatchNorm's backward). The kernel gradient then is a small difference of
large sums over N·Ho·Wo positions (262,144 for AlexNet's stem at batch 256), which is where
summation order shows.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from anodev2_jax.cpu import onednn
from anodev2_jax.nn import conv as conv_lib
from benchmarks import common
from benchmarks.conv_microbench import SHAPES

jax.config.update("jax_enable_x64", True)  # the float64 reference; everything else is float32


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shapes", type=common.name_list(tuple(SHAPES), "shape"), default=list(SHAPES)
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def inputs(shape: tuple[int, ...], batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, w, g) in float32, as a training step meets them."""
    size, cin, cout, k, stride, padding = shape
    rng = np.random.default_rng(0)
    if cin <= onednn.MAX_CIN_STEM:  # uint8 images normalized per channel
        x = (rng.integers(0, 256, (batch, size, size, cin)) / 255 - 0.47) / 0.25
    else:  # after BatchNorm and ReLU
        x = np.maximum(rng.standard_normal((batch, size, size, cin)), 0.0)
    w = rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)
    y = jax.eval_shape(lambda x, w: conv_lib.conv2d(x, w, stride, padding, "xla"), x, w)
    g = rng.standard_normal(y.shape)
    g -= g.mean(axis=(0, 1, 2))
    return x.astype(np.float32), w.astype(np.float32), g.astype(np.float32)


ARGS = {"fwd": "xw", "dx": "xwg", "dw": "xwg"}  # each pass's arguments


def passes(shape: tuple[int, ...], impl: str) -> dict[str, Any]:
    """fwd (x, w), dx (x, w, g) and dw (x, w, g) of conv2d with ``impl``, jitted."""
    _, _, _, _, stride, padding = shape

    def conv(x: jax.Array, w: jax.Array) -> jax.Array:
        return conv_lib.conv2d(x, w, stride, padding, impl)

    def dx(x: jax.Array, w: jax.Array, g: jax.Array) -> jax.Array:
        return jax.vjp(lambda x: conv(x, w), x)[1](g)[0]

    def dw(x: jax.Array, w: jax.Array, g: jax.Array) -> jax.Array:
        return jax.vjp(lambda w: conv(x, w), w)[1](g)[0]

    return {"fwd": jax.jit(conv), "dx": jax.jit(dx), "dw": jax.jit(dw)}


def onednn_passes(shape: tuple[int, ...], x: np.ndarray, g: np.ndarray) -> dict[str, Callable]:
    """The same passes by oneDNN's FFI calls alone."""
    _, _, _, k, stride, padding = shape
    before = (padding, padding)
    return {
        "fwd": jax.jit(lambda x, w: onednn.conv_forward(x, w, before, stride, g.shape[1:3])),
        "dx": jax.jit(lambda x, w, g: onednn.conv_input_grad(g, w, x.shape, before, stride)),
        "dw": jax.jit(lambda x, w, g: onednn.conv_kernel_grad(x, g, (k, k), before, stride)),
    }


def rows(name: str, batch: int) -> list[dict]:
    shape = SHAPES[name]
    x, w, g = inputs(shape, batch)
    arrays = {"x": x, "w": w, "g": g}
    args = {p: [arrays[a] for a in names] for p, names in ARGS.items()}
    exact = passes(shape, "xla")
    takes, onednn.takes = onednn.takes, lambda *_: False  # impl "cpu" without oneDNN
    try:
        hand = {p: fn.lower(*args[p]).compile() for p, fn in passes(shape, "cpu").items()}
    finally:
        onednn.takes = takes
    formulations = {"xla": exact, "hand": hand}
    if onednn.available():
        formulations["onednn"] = onednn_passes(shape, x, g)
    out = []
    for p in ARGS:
        reference = np.asarray(exact[p](*(a.astype(np.float64) for a in args[p])))
        scale = np.abs(reference).max()
        errors = {
            f: float(np.abs(np.asarray(fns[p](*args[p]), np.float64) - reference).max() / scale)
            for f, fns in formulations.items()
        }
        out.append({"shape": name, "pass": p, "err": errors})
    return out


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    env = common.environment(None, False)
    print(f"{env['cpu']}; jax {env['jax']}")
    print(f"batch {args.batch}; max |a - exact| / max |exact|, exact: XLA in float64")
    results = []
    for name in args.shapes:
        for row in rows(name, args.batch):
            results.append(row)
            errs = "  ".join(f"{f} {e:.1e}" for f, e in row["err"].items())
            print(f"{name:10s} {row['pass']:4s} {errs}", flush=True)
    if args.json:
        common.write_json(args.json, {"environment": env, "batch": args.batch, "rows": results})


if __name__ == "__main__":
    main()
