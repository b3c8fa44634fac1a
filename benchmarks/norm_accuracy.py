"""How far training-mode BatchNorm (+ ReLU) and its VJP are from the exact result, per impl.

    .venv/bin/python -m benchmarks.norm_accuracy

On the models' BatchNorm shapes, x with per-channel means up to a few standard deviations
from zero (as after a convolution) and a random g: impl "xla" (the jnp formula) and impl
"cpu" (what ``anodev2_jax.nn.normalization.batch_norm`` runs on the CPU) in float32, each
against the jnp formula in float64 on the same inputs: max |err| / max |exact| of the
moments, y, and dx, dscale, dbias. Deterministic, so it may run beside other work.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anodev2_jax.nn import normalization

jax.config.update("jax_enable_x64", True)

# (N, H, W, C), the per-channel mean's offset
SHAPES = [((128, 32, 32, 16), 3.0), ((128, 16, 16, 32), 3.0), ((256, 32, 32, 64), 1.0)]
OUTPUTS = ("mean", "var", "y", "dx", "dscale", "dbias")


@functools.partial(jax.jit, static_argnames=("impl", "dtype"))
def run(x: jax.Array, g: jax.Array, norm: dict, impl: str, dtype: Any) -> dict[str, jax.Array]:
    norm = {k: v.astype(dtype) for k, v in norm.items()}

    def bn(x, scale, bias):
        return normalization.batch_norm(
            x, {"scale": scale, "bias": bias}, True, relu=True, impl=impl
        )

    (y, moments), vjp = jax.vjp(bn, x.astype(dtype), norm["scale"], norm["bias"])
    dx, dscale, dbias = vjp((g.astype(dtype), jax.tree.map(jnp.zeros_like, moments)))
    return {**moments, "y": y, "dx": dx, "dscale": dscale, "dbias": dbias}


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"{jax.devices()[0].device_kind}; max |a - exact| / max |exact|, exact: float64")
    for shape, offset in SHAPES:
        c = shape[-1]
        x = jnp.asarray(rng.standard_normal(shape) * 0.5 + offset + rng.standard_normal(c))
        g = jnp.asarray(rng.standard_normal(shape))
        norm = {
            "scale": jnp.asarray(1 + 0.1 * rng.standard_normal(c)),
            "bias": jnp.asarray(0.1 * rng.standard_normal(c)),
        }
        exact = run(x, g, norm, "xla", jnp.float64)
        for impl in ("xla", "cpu"):
            ours = run(x, g, norm, impl, jnp.float32)
            errors = [
                float(jnp.max(jnp.abs(ours[k] - exact[k])) / jnp.max(jnp.abs(exact[k])))
                for k in OUTPUTS
            ]
            cells = "  ".join(f"{k} {e:.1e}" for k, e in zip(OUTPUTS, errors, strict=True))
            print(f"{shape!s:18s} mean ~{offset:.0f}  {impl:4s} {cells}", flush=True)


if __name__ == "__main__":
    main()
