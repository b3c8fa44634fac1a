"""C++ kernels for the CPU, as XLA FFI calls: the convolution (``csrc/conv_forward.cc``),
the 3×3 stride-1 one by Winograd's F(4×4, 3×3) (``csrc/winograd.cc``) and the kernel
gradient (``csrc/kernel_grad.cc``); training-mode BatchNorm with an optional ReLU, and its
gradient (``csrc/batch_norm.cc``).

Compiled on first use with the system's C++ compiler (``$CXX``, else ``c++``) against the
FFI headers that ship with jaxlib into one library, cached under ``$ANODEV2_CACHE`` (default
``~/.cache/anodev2_jax``) by a hash of the sources, compiler, flags, jaxlib version and CPU
model (``-march=native``), and registered with XLA for the CPU platform. :func:`available`
says whether that worked; when it did not (no compiler, not Linux/macOS), the ops that would
call them (:func:`anodev2_jax.backend.runs_cpu_kernels`) use XLA's own formulations and say
why once, as a warning. The differentiable ops built on these calls are in
:mod:`anodev2_jax.cpu.conv` and :mod:`anodev2_jax.cpu.batch_norm`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

CSRC = Path(__file__).with_name("csrc")
_KERNELS = ("kernel_grad", "conv_forward", "winograd", "batch_norm")
SOURCES = tuple(CSRC / f"{name}.cc" for name in _KERNELS)
HEADERS = (CSRC / "chunks.h",)
_SYMBOLS = {  # FFI target -> handler symbol
    "anodev2_kernel_grad_f32": "Anodev2KernelGradF32",
    "anodev2_kernel_grad_f64": "Anodev2KernelGradF64",
    "anodev2_conv_forward_f32": "Anodev2ConvForwardF32",
    "anodev2_conv_forward_f64": "Anodev2ConvForwardF64",
    "anodev2_winograd_f32": "Anodev2WinogradF32",
    "anodev2_winograd_f64": "Anodev2WinogradF64",
    "anodev2_winograd_kernel_grad_f32": "Anodev2WinogradKernelGradF32",
    "anodev2_winograd_kernel_grad_f64": "Anodev2WinogradKernelGradF64",
    "anodev2_batch_norm_f32": "Anodev2BatchNormF32",
    "anodev2_batch_norm_f64": "Anodev2BatchNormF64",
    "anodev2_batch_norm_grad_f32": "Anodev2BatchNormGradF32",
    "anodev2_batch_norm_grad_f64": "Anodev2BatchNormGradF64",
}
_SUFFIX = {jnp.dtype(jnp.float32): "f32", jnp.dtype(jnp.float64): "f64"}
# -fno-trapping-math: comparisons and selects in loops vectorize (BatchNorm's ReLU mask).
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]
FLAGS += ["-fno-trapping-math"]


def kernel_grad(
    x: jax.Array,
    g: jax.Array,
    kernel_size: tuple[int, int],
    pads: tuple[int, int],
    stride: int = 1,
) -> jax.Array:
    """dw (kh, kw, Cin, Cout) of the convolution y = conv(x, w) from x (N, H, W, Cin) and
    g = dL/dy (N, Ho, Wo, Cout); ``pads``: the zero rows and columns before the image.

    Requires :func:`available`; float32 or float64, CPU only. No autodiff of its own.
    """
    kh, kw = kernel_size
    out = jax.ShapeDtypeStruct((kh, kw, x.shape[3], g.shape[3]), x.dtype)
    target = f"anodev2_kernel_grad_{_SUFFIX[jnp.dtype(x.dtype)]}"
    call = jax.ffi.ffi_call(target, out, vmap_method="sequential")
    return call(
        x, g, pad_top=np.int64(pads[0]), pad_left=np.int64(pads[1]), stride=np.int64(stride)
    )


def conv_forward(
    x: jax.Array,
    w: jax.Array,
    pads: tuple[tuple[int, int], tuple[int, int]],
    stride: int = 1,
) -> jax.Array:
    """The convolution of x (N, H, W, Cin) with w (kh, kw, Cin, Cout) -> (N, Ho, Wo, Cout);
    ``pads``: ((top, bottom), (left, right)) zero rows and columns, ≥ 0.

    Requires :func:`available`, float32 or float64, Cout a multiple of 64 bytes' worth of
    values (16 float32, 8 float64); CPU only. No autodiff of its own.
    """
    (top, bottom), (left, right) = pads
    kh, kw, _, cout = w.shape
    n, h, width, _ = x.shape
    out_h = (h + top + bottom - kh) // stride + 1
    out_w = (width + left + right - kw) // stride + 1
    out = jax.ShapeDtypeStruct((n, out_h, out_w, cout), x.dtype)
    target = f"anodev2_conv_forward_{_SUFFIX[jnp.dtype(x.dtype)]}"
    call = jax.ffi.ffi_call(target, out, vmap_method="sequential")
    return call(x, w, pad_top=np.int64(top), pad_left=np.int64(left), stride=np.int64(stride))


def winograd(
    x: jax.Array, w: jax.Array, pads: tuple[tuple[int, int], tuple[int, int]]
) -> jax.Array:
    """The stride-1 convolution of x (N, H, W, Cin) with a 3×3 w (3, 3, Cin, Cout) by
    Winograd's F(4×4, 3×3) -> (N, Ho, Wo, Cout); ``pads`` as in
    :func:`conv_forward`.

    Requires :func:`available`, float32 or float64, Cin and Cout multiples of 64 bytes' worth
    of values; CPU only. float32 results differ from the direct sum by a few 1e-6 of their
    magnitude. No autodiff of its own.
    """
    (top, bottom), (left, right) = pads
    n, h, width, _ = x.shape
    k = w.shape[0]
    out = jax.ShapeDtypeStruct(
        (n, h + top + bottom - k + 1, width + left + right - k + 1, w.shape[3]), x.dtype
    )
    target = f"anodev2_winograd_{_SUFFIX[jnp.dtype(x.dtype)]}"
    call = jax.ffi.ffi_call(target, out, vmap_method="sequential")
    return call(x, w, pad_top=np.int64(top), pad_left=np.int64(left), stride=np.int64(1))


def winograd_kernel_grad(
    x: jax.Array, g: jax.Array, kernel_size: int, pads: tuple[int, int]
) -> jax.Array:
    """dw (3, 3, Cin, Cout), ``kernel_size`` 3, of the stride-1 convolution y = conv(x, w)
    from x (N, H, W, Cin) and g = dL/dy (N, Ho, Wo, Cout) by Winograd's F(4×4, 3×3);
    ``pads``: the zero rows and columns before the image.

    Requires :func:`available`, float32 or float64, Cin a multiple of 16 and Cout of 64
    bytes' worth of values; CPU only. No autodiff of its own.
    """
    out = jax.ShapeDtypeStruct((kernel_size, kernel_size, x.shape[3], g.shape[3]), x.dtype)
    target = f"anodev2_winograd_kernel_grad_{_SUFFIX[jnp.dtype(x.dtype)]}"
    call = jax.ffi.ffi_call(target, out, vmap_method="sequential")
    return call(x, g, pad_top=np.int64(pads[0]), pad_left=np.int64(pads[1]), stride=np.int64(1))


def batch_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, relu: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode BatchNorm of x (..., C) over all but its last axis: (y, mean, var), y
    of x's shape (ReLU applied if ``relu``), the biased moments (C,). ``scale``, ``bias``:
    (C,). Requires :func:`available`, float32 or float64; CPU only. No autodiff of its own.
    """
    c = jax.ShapeDtypeStruct(scale.shape, x.dtype)
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), c, c)
    target = f"anodev2_batch_norm_{_SUFFIX[jnp.dtype(x.dtype)]}"
    call = jax.ffi.ffi_call(target, out, vmap_method="sequential")
    y, mean, var = call(x, scale, bias, epsilon=np.float64(epsilon), relu=np.int64(relu))
    return y, mean, var


def batch_norm_grad(
    x: jax.Array,
    g: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    moments: tuple[jax.Array, jax.Array],
    dmoments: tuple[jax.Array, jax.Array],
    epsilon: float,
    relu: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dx, dscale, dbias) of :func:`batch_norm` at x, from g = dL/dy and the cotangents
    (dmean, dvar) of its moments; ``moments``: the (mean, var) it returned. Requires
    :func:`available`; CPU only. No autodiff of its own.
    """
    c = jax.ShapeDtypeStruct(scale.shape, x.dtype)
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), c, c)
    target = f"anodev2_batch_norm_grad_{_SUFFIX[jnp.dtype(x.dtype)]}"
    call = jax.ffi.ffi_call(target, out, vmap_method="sequential")
    attrs = {"epsilon": np.float64(epsilon), "relu": np.int64(relu)}
    dx, dscale, dbias = call(x, g, scale, bias, *moments, *dmoments, **attrs)
    return dx, dscale, dbias


_available: bool | None = None  # None: not tried yet


def available() -> bool:
    """Whether the kernel is built and registered (builds it on the first call)."""
    global _available
    if _available is None:
        _available = _build_and_register()
    return _available


def _build_and_register() -> bool:
    try:
        library = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.CalledProcessError, RuntimeError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(
            f"anodev2_jax: the C++ kernels could not be built ({detail.strip()[:500]}); "
            "conv_impl='cpu' (convolution, BatchNorm) uses XLA's formulations instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    for target, symbol in _SYMBOLS.items():
        handler = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(target, handler, platform="cpu")
    return True


def _build() -> Path:
    return build_library("anodev2_native", [*SOURCES, *HEADERS], FLAGS)


def find_compiler() -> str:
    """$CXX, else ``c++`` or ``g++`` on the PATH; RuntimeError naming the fix without one."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    return compiler


def build_library(stem: str, sources: list[Path], flags: list[str]) -> Path:
    """The shared library ``stem-<hash>.so`` compiled from the ``.cc`` files among ``sources``
    (the others, headers, count for the hash only) with ``flags`` and jaxlib's FFI headers,
    built once per hash of sources, compiler, flags, jaxlib version and CPU model and cached
    under ``$ANODEV2_CACHE`` (default ``~/.cache/anodev2_jax``). Raises RuntimeError without
    a compiler or on an unsupported OS, CalledProcessError when compiling fails."""
    if platform.system() not in ("Linux", "Darwin"):
        raise RuntimeError(f"building C++ extensions on {platform.system()} is not supported")
    compiler = find_compiler()
    flags = [*flags, f"-I{jax.ffi.include_dir()}"]
    key = hashlib.sha256(
        b"\0".join(
            [
                *(path.read_bytes() for path in sources),
                compiler.encode(),
                " ".join(flags).encode(),
                jaxlib.__version__.encode(),
                platform.machine().encode(),
                cpu_model().encode(),
            ]
        )
    ).hexdigest()[:16]
    cache = Path(os.environ.get("ANODEV2_CACHE", Path.home() / ".cache" / "anodev2_jax"))
    library = cache / f"{stem}-{key}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    compiled = [str(path) for path in sources if path.suffix == ".cc"]
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        built = Path(scratch) / library.name
        subprocess.run(
            [compiler, *compiled, "-o", str(built), *flags],
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(built, library)  # atomic: concurrent builders leave one complete file
    return library


def cpu_model() -> str:
    """The CPU model (-march=native code is specific to it); empty where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
