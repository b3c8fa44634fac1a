"""oneDNN on the CPU, as XLA FFI calls: forward, input gradient and kernel gradient of an NHWC
× HWIO convolution (``csrc/onednn_conv.cc``) and the max pool (``csrc/onednn_max_pool.cc``),
in float32 (oneDNN has no float64 convolution on the CPU).

oneDNN picks its kernels for the running CPU (AVX2, AVX-512, AMX) at run time. It comes from
the ``onednn-cpu-gomp`` and ``onednn-devel-cpu-gomp`` wheels (the library and its headers,
installed under ``sys.prefix``; Linux x86-64). The FFI library is compiled on first use
against them, cached like :mod:`anodev2_jax.cpu.native`'s, and registered with XLA for the
CPU; :func:`available` says whether that worked. Where it did not (no wheel, no compiler),
:mod:`anodev2_jax.cpu.conv` uses its other formulations, the max pool XLA's, and the reason is
given once, as a warning.

:func:`takes` says which passes of which convolutions impl "cpu" gives to oneDNN;
:func:`conv`, :func:`input_grad` and :func:`kernel_grad` are those passes, each
differentiable (reverse mode, to any order) by XLA's formulation of its VJP. The max pool's
differentiable call is :mod:`anodev2_jax.cpu.max_pool`; :func:`pool_workspace` sizes what its
forward keeps for the backward.
"""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anodev2_jax import backend
from anodev2_jax.cpu import native
from anodev2_jax.nn.conv import Pads, conv_xla

SOURCES = (native.CSRC / "onednn_conv.cc", native.CSRC / "onednn_max_pool.cc")
_SYMBOLS = {  # FFI target -> handler symbol
    "anodev2_onednn_conv_forward": "Anodev2OnednnConvForward",
    "anodev2_onednn_conv_input_grad": "Anodev2OnednnConvInputGrad",
    "anodev2_onednn_conv_kernel_grad": "Anodev2OnednnConvKernelGrad",
    "anodev2_onednn_max_pool": "Anodev2OnednnMaxPool",
    "anodev2_onednn_max_pool_grad": "Anodev2OnednnMaxPoolGrad",
}
# oneDNN takes every pass from this many output channels (AlexNet's convolutions) but the
# kernel gradient of the stems (up to this many input channels). A stem's kernel gradient sums
# over every pixel of the batch with BatchNorm's zero-mean g: the hand kernel stays within
# 1e-6 of the exact result there, oneDNN's and XLA's are 7e-6 to 1.5e-5 off
# (benchmarks/conv_accuracy.py, BENCHMARKS.md).
MIN_COUT = 64
MAX_CIN_STEM = 4


def takes(
    pass_name: str, dtype: Any, kernel_shape: tuple[int, ...], stride: int, winograd: bool
) -> bool:
    """Whether oneDNN runs this pass ("fwd", "dx" or "dw") of a convolution with a kernel of
    ``kernel_shape`` (kh, kw, Cin, Cout) under impl "cpu": float32 with the CPU speed-ups
    (:func:`anodev2_jax.backend.runs_onednn`), wherever a hand-written kernel did not beat it
    on two CPU kinds (BENCHMARKS.md). That is every input gradient; every forward but, below
    :data:`MIN_COUT` channels out, Winograd's (``winograd``: the C++ kernels would run it by
    Winograd's F(4×4, 3×3)) and the strided one; the kernel gradients from :data:`MIN_COUT`
    channels out but a stem's (for accuracy, above).
    """
    if pass_name not in ("fwd", "dx", "dw"):
        raise ValueError(f"pass_name={pass_name!r}; use 'fwd', 'dx' or 'dw'")
    _, _, cin, cout = kernel_shape
    if pass_name == "dw":
        wins = cout >= MIN_COUT and cin > MAX_CIN_STEM
    elif pass_name == "fwd":
        wins = cout >= MIN_COUT or not (winograd or stride > 1)
    else:
        wins = True
    return wins and backend.runs_onednn("cpu", dtype)


# -- differentiable: each oneDNN pass is a linear map whose own VJP is XLA's -----------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x: jax.Array, w: jax.Array, stride: int, pads: Pads) -> jax.Array:
    """The convolution of x (N, H, W, Cin) with w (kh, kw, Cin, Cout) by oneDNN; ``pads``:
    ((top, bottom), (left, right)). Differentiable (reverse mode): its gradient is XLA's."""
    _, out_h, out_w, _ = _out_shape(x, w, stride, pads)
    return conv_forward(x, w, _before(pads), stride, (out_h, out_w))


def _conv_fwd(
    x: jax.Array, w: jax.Array, stride: int, pads: Pads
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return conv(x, w, stride, pads), (x, w)


def xla_conv_vjp(
    stride: int, pads: Pads, residuals: tuple[jax.Array, jax.Array], cotangent: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(dx, dw) of XLA's convolution at residuals (x, w): the custom-VJP backward of every
    convolution forward on the CPU that is not XLA's (this module's, the C++ kernels')."""
    _, vjp = jax.vjp(lambda x, w: conv_xla(x, w, stride, pads), *residuals)
    dx, dw = vjp(cotangent)
    return dx, dw


conv.defvjp(_conv_fwd, xla_conv_vjp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def input_grad(
    g: jax.Array, w: jax.Array, x_shape: tuple[int, ...], stride: int, pads: Pads
) -> jax.Array:
    """dL/dx (``x_shape``) of :func:`conv` from g = dL/dy, by oneDNN; differentiable."""
    return conv_input_grad(g, w, x_shape, _before(pads), stride)


def _input_grad_fwd(
    g: jax.Array, w: jax.Array, x_shape: tuple[int, ...], stride: int, pads: Pads
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return input_grad(g, w, x_shape, stride, pads), (g, w)


def _input_grad_bwd(
    x_shape: tuple[int, ...],
    stride: int,
    pads: Pads,
    residuals: tuple[jax.Array, jax.Array],
    cotangent: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    def xla_input_grad(g: jax.Array, w: jax.Array) -> jax.Array:
        x = jax.ShapeDtypeStruct(x_shape, g.dtype)
        (dx,) = jax.linear_transpose(lambda x: conv_xla(x, w, stride, pads), x)(g)
        return dx

    _, vjp = jax.vjp(xla_input_grad, *residuals)
    dg, dw = vjp(cotangent)
    return dg, dw


input_grad.defvjp(_input_grad_fwd, _input_grad_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def kernel_grad(
    x: jax.Array, g: jax.Array, kernel_shape: tuple[int, ...], stride: int, pads: Pads
) -> jax.Array:
    """dL/dw (``kernel_shape``) of :func:`conv` from x and g = dL/dy, by oneDNN;
    differentiable."""
    return conv_kernel_grad(x, g, kernel_shape[:2], _before(pads), stride)


def _kernel_grad_fwd(
    x: jax.Array, g: jax.Array, kernel_shape: tuple[int, ...], stride: int, pads: Pads
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return kernel_grad(x, g, kernel_shape, stride, pads), (x, g)


def _kernel_grad_bwd(
    kernel_shape: tuple[int, ...],
    stride: int,
    pads: Pads,
    residuals: tuple[jax.Array, jax.Array],
    cotangent: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    def xla_kernel_grad(x: jax.Array, g: jax.Array) -> jax.Array:
        w = jax.ShapeDtypeStruct(kernel_shape, x.dtype)
        (dw,) = jax.linear_transpose(lambda w: conv_xla(x, w, stride, pads), w)(g)
        return dw

    _, vjp = jax.vjp(xla_kernel_grad, *residuals)
    dx, dg = vjp(cotangent)
    return dx, dg


kernel_grad.defvjp(_kernel_grad_fwd, _kernel_grad_bwd)


def _before(pads: Pads) -> tuple[int, int]:
    return pads[0][0], pads[1][0]


def _out_shape(x: jax.Array, w: jax.Array, stride: int, pads: Pads) -> tuple[int, ...]:
    return jax.eval_shape(lambda x, w: conv_xla(x, w, stride, pads), x, w).shape


# -- the FFI calls: no autodiff --------------------------------------------------------------------
def conv_forward(
    x: jax.Array,
    w: jax.Array,
    pad_before: tuple[int, int],
    stride: int,
    out_hw: tuple[int, int],
) -> jax.Array:
    """y (N, Ho, Wo, Cout) = conv(x (N, H, W, Cin), w (kh, kw, Cin, Cout)); ``pad_before``:
    the zero rows and columns before the image, ``out_hw``: (Ho, Wo) (rows and columns after
    the image: zeros as the output needs, or unread)."""
    out = jax.ShapeDtypeStruct((x.shape[0], *out_hw, w.shape[3]), x.dtype)
    return _call("anodev2_onednn_conv_forward", out, x, w, pad_before, stride)


def conv_input_grad(
    g: jax.Array,
    w: jax.Array,
    x_shape: tuple[int, ...],
    pad_before: tuple[int, int],
    stride: int,
) -> jax.Array:
    """dL/dx (``x_shape``) of :func:`conv_forward` from g = dL/dy (N, Ho, Wo, Cout)."""
    out = jax.ShapeDtypeStruct(x_shape, g.dtype)
    return _call("anodev2_onednn_conv_input_grad", out, g, w, pad_before, stride)


def conv_kernel_grad(
    x: jax.Array,
    g: jax.Array,
    kernel_size: tuple[int, ...],
    pad_before: tuple[int, int],
    stride: int,
) -> jax.Array:
    """dL/dw (kh, kw, Cin, Cout) of :func:`conv_forward` from x and g = dL/dy."""
    out = jax.ShapeDtypeStruct((*kernel_size, x.shape[3], g.shape[3]), x.dtype)
    return _call("anodev2_onednn_conv_kernel_grad", out, x, g, pad_before, stride)


def _call(
    target: str,
    out: jax.ShapeDtypeStruct,
    a: jax.Array,
    b: jax.Array,
    pad_before: tuple[int, int],
    stride: int,
) -> jax.Array:
    if a.dtype != jnp.float32 or b.dtype != jnp.float32:
        raise TypeError(f"oneDNN convolutions take float32, got {a.dtype} and {b.dtype}")
    call = jax.ffi.ffi_call(target, out, vmap_method="sequential")
    top, left = pad_before
    return call(a, b, pad_top=np.int64(top), pad_left=np.int64(left), stride=np.int64(stride))


def prefix() -> Path | None:
    """Where the oneDNN wheels put ``lib/libdnnl.so`` and ``include/oneapi/dnnl``, or None."""
    for root in (Path(sys.prefix), Path(sys.base_prefix)):
        if (root / "lib" / "libdnnl.so").exists() and (root / "include" / "oneapi").is_dir():
            return root
    return None


def pool_workspace(x_shape: tuple[int, ...], size: int) -> Any:
    """The uint8 workspace (each window's argmax) that oneDNN's max pool of float32 x (N, H, W,
    C) over size × size windows returns for its backward, as a ShapeDtypeStruct: its size is
    oneDNN's to choose. Requires :func:`available`."""
    nbytes = _library.Anodev2OnednnMaxPoolWorkspaceBytes(*x_shape, size)
    if nbytes < 0:
        raise RuntimeError(f"oneDNN has no max pool of size {size} for x of shape {x_shape}")
    return jax.ShapeDtypeStruct((max(nbytes, 1),), jnp.uint8)


_available: bool | None = None  # None: not tried yet
_library: Any = None


def available() -> bool:
    """Whether oneDNN's calls (convolutions, max pool) are built and registered (builds them on
    the first call)."""
    global _available
    if _available is None:
        _available = _build_and_register()
    return _available


def _build_and_register() -> bool:
    root = prefix()
    try:
        if root is None:
            raise RuntimeError(
                "no oneDNN under sys.prefix; pip install onednn-cpu-gomp==2023.2.0 "
                "onednn-devel-cpu-gomp==2023.2.0"
            )
        # oneDNN's OpenMP threads must not spin after a call on the cores that XLA's threads
        # need next (OMP_WAIT_POLICY=ACTIVE: AlexNet conf1's step 1.9x slower; PASSIVE and
        # libgomp's default short spin measured alike). libgomp reads this when it loads,
        # with oneDNN, below; a user's own setting wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        flags = [*native.FLAGS, f"-I{root / 'include'}", f"-L{root / 'lib'}", "-ldnnl"]
        flags.append(f"-Wl,-rpath,{root / 'lib'}")
        library = ctypes.CDLL(str(native.build_library("anodev2_onednn", [*SOURCES], flags)))
    except (OSError, subprocess.CalledProcessError, RuntimeError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(
            f"anodev2_jax: oneDNN is unavailable ({detail.strip()[:300]}); conv_impl='cpu' "
            "uses its other convolutions, and XLA's max pool, instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    for target, symbol in _SYMBOLS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), "cpu")
    library.Anodev2OnednnMaxPoolWorkspaceBytes.restype = ctypes.c_int64
    library.Anodev2OnednnMaxPoolWorkspaceBytes.argtypes = [ctypes.c_int64] * 5
    global _library
    _library = library
    return True
