"""The C++ convolution kernel gradient for the CPU (``csrc/kernel_grad.cc``), as an XLA FFI call.

Compiled on first use with the system's C++ compiler (``$CXX``, else ``c++``) against the
FFI headers that ship with jaxlib, cached under ``$ANODEV2_CACHE`` (default
``~/.cache/anodev2_jax``) by a hash of the source, compiler, flags, jaxlib version and CPU
model (``-march=native``), and registered with XLA for the CPU platform. :func:`available`
says whether that worked; when it did not (no compiler, not Linux/macOS),
``conv2d(impl="cpu")`` falls back to XLA's own formulation and says why once, as a warning.
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

SOURCE = Path(__file__).with_name("csrc") / "kernel_grad.cc"
TARGETS = {
    jnp.dtype(jnp.float32): "anodev2_kernel_grad_f32",
    jnp.dtype(jnp.float64): "anodev2_kernel_grad_f64",
}
_SYMBOLS = {
    "anodev2_kernel_grad_f32": "Anodev2KernelGradF32",
    "anodev2_kernel_grad_f64": "Anodev2KernelGradF64",
}
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]


def kernel_grad(
    x: jax.Array, g: jax.Array, kernel_size: tuple[int, int], pads: tuple[int, int]
) -> jax.Array:
    """dw (kh, kw, Cin, Cout) of the stride-1 convolution y = conv(x, w) from x (N, H, W, Cin)
    and g = dL/dy (N, Ho, Wo, Cout); ``pads``: the zero rows and columns before the image.

    Requires :func:`available`; float32 or float64, CPU only. No autodiff of its own.
    """
    kh, kw = kernel_size
    out = jax.ShapeDtypeStruct((kh, kw, x.shape[3], g.shape[3]), x.dtype)
    call = jax.ffi.ffi_call(TARGETS[jnp.dtype(x.dtype)], out, vmap_method="sequential")
    return call(x, g, pad_h=np.int64(pads[0]), pad_w=np.int64(pads[1]))


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
            f"anodev2_jax: the C++ kernel gradient could not be built ({detail.strip()[:500]}); "
            "conv2d(impl='cpu') uses XLA's formulation instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    for target, symbol in _SYMBOLS.items():
        handler = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(target, handler, platform="cpu")
    return True


def _build() -> Path:
    if platform.system() not in ("Linux", "Darwin"):
        raise RuntimeError(f"building C++ extensions on {platform.system()} is not supported")
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    source = SOURCE.read_bytes()
    flags = [*FLAGS, f"-I{jax.ffi.include_dir()}"]
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                compiler.encode(),
                " ".join(flags).encode(),
                jaxlib.__version__.encode(),
                platform.machine().encode(),
                cpu_model().encode(),
            ]
        )
    ).hexdigest()[:16]
    cache = Path(os.environ.get("ANODEV2_CACHE", Path.home() / ".cache" / "anodev2_jax"))
    library = cache / f"kernel_grad-{key}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        built = Path(scratch) / library.name
        subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", str(built)],
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
