"""2-D convolution used by the models, NHWC × HWIO, with a selectable implementation."""

from __future__ import annotations

import jax
from jax import lax

IMPLS = ("xla",)


def conv2d(
    x: jax.Array, w: jax.Array, stride: int = 1, padding: str | int = "SAME", impl: str = "xla"
) -> jax.Array:
    """Cross-correlation of x (N, H, W, Cin) with w (kh, kw, Cin, Cout) -> (N, H', W', Cout).

    ``padding``: "SAME", "VALID" or a symmetric number of zero rows/columns per side.
    """
    if impl not in IMPLS:
        raise ValueError(f"conv impl={impl!r} is unknown; use one of {IMPLS}")
    pad = padding if isinstance(padding, str) else [(padding, padding), (padding, padding)]
    return lax.conv_general_dilated(
        x, w, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
