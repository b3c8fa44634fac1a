"""2-D convolution used by the models, NHWC × HWIO, with a selectable implementation.

``impl="xla"`` is ``lax.conv_general_dilated`` and its autodiff: the one implementation on
every backend. ``impl="cpu"`` computes the same values (up to summation order) with
formulations that XLA:CPU runs faster, C++ kernels among them, and differentiates them with a
``jax.custom_vjp`` (:mod:`anodev2_jax.cpu.conv` says which formulation takes which
convolution and why). ``impl="cpu_paired"`` also folds pairs of columns into channels where
the C++ kernel does not apply. ``impl="auto"`` is "cpu" with the CPU speed-ups and "xla"
elsewhere (:func:`anodev2_jax.backend.conv_impl`); the CPU formulations are imported only
when an impl resolves to them.

Use "xla" under ``jax.vmap`` (the CPU formulations' conditionals become selects that run
both branches, and the C++ kernels run once per batch element) and for forward-mode
autodiff (their custom VJP supports reverse mode only, to any order). BENCHMARKS.md and
``benchmarks/conv_microbench.py`` hold the timings.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from anodev2_jax import backend

IMPLS = ("xla", "cpu", "cpu_paired", "auto")
DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
_PADDING_NAMES = ("SAME", "VALID")

Pads = tuple[tuple[int, int], tuple[int, int]]


def conv2d(
    x: jax.Array, w: jax.Array, stride: int = 1, padding: str | int = "SAME", impl: str = "xla"
) -> jax.Array:
    """Cross-correlation of x (N, H, W, Cin) with w (kh, kw, Cin, Cout) -> (N, H', W', Cout).

    ``stride``: the same positive step along H and W. ``padding``: "SAME", "VALID" or a
    symmetric number of zero rows/columns per side. ``impl``: one of :data:`IMPLS`.
    """
    pads = check_args(x, w, stride, padding, impl)
    stride = int(stride)
    impl = backend.conv_impl(impl)
    if impl in ("cpu", "cpu_paired"):
        from anodev2_jax.cpu import conv as cpu_conv  # only where an impl asks for it

        return cpu_conv.conv_cpu(x, w, stride, pads, impl == "cpu_paired")
    return conv_xla(x, w, stride, pads)


def check_args(x: Any, w: Any, stride: Any, padding: Any, impl: Any) -> Pads:
    """Validate the arguments of :func:`conv2d`; return its padding as ((lo, hi), (lo, hi))."""
    if impl not in IMPLS:
        raise ValueError(f"conv impl={impl!r} is unknown; use one of {IMPLS}")
    if jnp.ndim(x) != 4 or jnp.ndim(w) != 4:
        raise ValueError(
            f"conv2d takes x (N, H, W, Cin) and w (kh, kw, Cin, Cout); got x of shape "
            f"{jnp.shape(x)} and w of shape {jnp.shape(w)}"
        )
    x_shape, w_shape = jnp.shape(x), jnp.shape(w)
    if x_shape[3] != w_shape[2]:
        raise ValueError(
            f"x has {x_shape[3]} channels but w of shape {w_shape} expects {w_shape[2]}; "
            f"use a kernel (kh, kw, {x_shape[3]}, Cout)"
        )
    if isinstance(stride, bool) or not isinstance(stride, int | np.integer) or stride < 1:
        raise ValueError(f"stride={stride!r} must be a positive int, e.g. 1 or 2")
    if isinstance(padding, str):
        if padding not in _PADDING_NAMES:
            raise ValueError(f"padding={padding!r} is unknown; use {_PADDING_NAMES} or an int")
        step = (int(stride), int(stride))
        spatial_pads = lax.padtype_to_pads(x_shape[1:3], w_shape[:2], step, padding)
        (h_lo, h_hi), (w_lo, w_hi) = spatial_pads
        return (int(h_lo), int(h_hi)), (int(w_lo), int(w_hi))
    if isinstance(padding, bool) or not isinstance(padding, int | np.integer) or padding < 0:
        raise ValueError(f"padding={padding!r} must be 'SAME', 'VALID' or an int >= 0")
    p = int(padding)
    return (p, p), (p, p)


def conv_xla(x: jax.Array, w: jax.Array, stride: int, pads: Pads) -> jax.Array:
    """XLA's convolution of x (N, H, W, Cin) with w (kh, kw, Cin, Cout) at ``stride``, with
    ``pads`` ((top, bottom), (left, right)) zero rows and columns: impl "xla"."""
    return lax.conv_general_dilated(
        x, w, (stride, stride), pads, dimension_numbers=DIMENSION_NUMBERS
    )
