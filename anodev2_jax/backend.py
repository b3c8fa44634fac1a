"""Which backend JAX runs on, and what each ``"auto"`` setting means there.

This is the one module that asks: the rest of the library calls the resolvers below and
never names a platform. With the CPU speed-ups (JAX's default backend is the CPU and
``ANODEV2_CPU_SPEEDUPS`` is not 0), ``"auto"`` means the speed-ups of
:mod:`anodev2_jax.cpu` and the strategies that suit XLA:CPU; otherwise (a GPU, a TPU, or
the speed-ups off) it means the plain JAX path:

- convolution ``conv_impl`` (:func:`conv_impl`): "cpu", else "xla";
- the C++ kernels of the convolution and BatchNorm (:func:`runs_cpu_kernels`): for
  float32/64 under any conv impl but "xla", else never, whatever the conv impl; and oneDNN's
  convolutions and max pool (:func:`runs_onednn`) likewise, for float32;
- seed batching (:func:`seed_batching`): "loop", else "vmap";
- input pipeline (:func:`input_pipeline`): "host", else "device";
- the RDA's transform (:func:`rda_transform`): "matrix" up to 64 taps, else "fft";
- ``cpu_malloc`` (:func:`cpu_malloc`, decided before JAX initializes): "tuned", else
  "default".

``ANODEV2_CPU_SPEEDUPS=0`` in the environment turns the CPU speed-ups off: on the CPU every
``"auto"`` then resolves as on a GPU or TPU (XLA's convolution, jnp BatchNorm and max pool,
vmapped seeds, the device input pipeline, the FFT, malloc left alone) and no C++ kernel
runs, so that the library can be checked whole and correct without :mod:`anodev2_jax.cpu`.
An explicit ``conv_impl="cpu"`` still runs its pure-JAX formulations, as it does on a GPU.
``1`` or unset leaves the speed-ups on; any other value is an error. The variable is read
each time a setting is resolved (when a function is traced): set it before the first call.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil
from typing import Any

import jax
import jax.numpy as jnp

SPEEDUPS_VARIABLE = "ANODEV2_CPU_SPEEDUPS"
# "auto": the RDA applies its DFT as a matrix to kernels of up to this many taps (8x8) on the
# CPU, where a (taps, taps) matmul beats XLA:CPU's FFT; its cost grows as taps².
RDA_MATRIX_MAX_TAPS = 64
_KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))  # what the C++ kernels take


def speedups_enabled() -> bool:
    """Whether ``ANODEV2_CPU_SPEEDUPS`` leaves the CPU speed-ups on ("1" or unset) or turns
    them off ("0"); raises ValueError on any other value."""
    value = os.environ.get(SPEEDUPS_VARIABLE, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(
            f"{SPEEDUPS_VARIABLE}={value!r}; set it to 0 (CPU speed-ups off) or 1 (on, the default)"
        )
    return value == "1"


def cpu_speedups() -> bool:
    """Whether JAX's default backend is the CPU and the CPU speed-ups are on: the question
    every ``"auto"`` below asks."""
    return speedups_enabled() and jax.default_backend() == "cpu"


def conv_impl(impl: str) -> str:
    """The convolution ``impl`` (one of ``anodev2_jax.nn.conv.IMPLS``) means here: "auto" is
    "cpu" with the CPU speed-ups and "xla" elsewhere; any other impl is itself."""
    if impl != "auto":
        return impl
    return "cpu" if cpu_speedups() else "xla"


def runs_cpu_kernels(impl: str, dtype: Any) -> bool:
    """Whether an op given the conv impl ``impl`` runs its C++ kernel on arrays of ``dtype``:
    impl "cpu", "cpu_paired" or "auto", with the CPU speed-ups, float32 or float64, and the
    kernels built (:func:`anodev2_jax.cpu.native.available`, which builds them on first use)."""
    if impl == "xla" or not cpu_speedups() or jnp.dtype(dtype) not in _KERNEL_DTYPES:
        return False
    from anodev2_jax.cpu import native  # the CPU package only where it can run

    return native.available()


def runs_onednn(impl: str, dtype: Any) -> bool:
    """Whether an op given the conv impl ``impl`` (a convolution, the max pool) may run by
    oneDNN: impl "cpu", "cpu_paired" or "auto", with the CPU speed-ups, float32 (oneDNN has no
    float64 convolution on the CPU), and oneDNN's calls built
    (:func:`anodev2_jax.cpu.onednn.available`, which builds them on first use)."""
    if impl == "xla" or not cpu_speedups() or jnp.dtype(dtype) != jnp.float32:
        return False
    from anodev2_jax.cpu import onednn  # the CPU package only where it can run

    return onednn.available()


def seed_batching(batching: str) -> str:
    """How the seeds of a run share a step (``anodev2_jax.training.seeds``): "auto" is
    "loop" with the CPU speed-ups (XLA:CPU runs vmapped weights as slow grouped
    convolutions) and "vmap" elsewhere; "loop" and "vmap" are themselves."""
    if batching != "auto":
        return batching
    return "loop" if cpu_speedups() else "vmap"


def input_pipeline(pipeline: str) -> str:
    """How batches reach the train step (``anodev2_jax.training.input_pipeline``): "auto" is
    "host" with the CPU speed-ups and "device" elsewhere; "host" and "device" are
    themselves."""
    if pipeline != "auto":
        return pipeline
    return "host" if cpu_speedups() else "device"


def rda_transform(transform: str, taps: int) -> str:
    """How the RDA applies its Fourier symbol to a kernel of ``taps`` = kh·kw taps
    (``anodev2_jax.RDA``): "auto" is "matrix" with the CPU speed-ups for kernels of at most
    :data:`RDA_MATRIX_MAX_TAPS` taps, else "fft"; "fft" and "matrix" are themselves."""
    if transform != "auto":
        return transform
    return "matrix" if cpu_speedups() and taps <= RDA_MATRIX_MAX_TAPS else "fft"


def cpu_malloc(mode: str) -> str:
    """Whether to tune glibc's malloc (``anodev2_jax.cpu.host_malloc``): "auto" is "tuned"
    when JAX will run on the CPU (:func:`will_run_on_cpu`, decided before JAX initializes)
    with the CPU speed-ups, else "default"; "tuned" and "default" are themselves."""
    if mode != "auto":
        return mode
    return "tuned" if speedups_enabled() and will_run_on_cpu() else "default"


def will_run_on_cpu(platforms: str | None = None) -> bool:
    """Whether JAX's default backend will be the CPU, decided without initializing it.

    ``platforms``: as JAX_PLATFORMS, default that variable (``jax.config.jax_platforms``).
    When set, its first entry decides; otherwise JAX picks an accelerator whenever a plugin
    for one (CUDA, ROCm, ...) or libtpu is installed.
    """
    if platforms is None:
        platforms = jax.config.values.get("jax_platforms")
    if platforms:
        return str(platforms).split(",")[0].strip() == "cpu"
    try:
        import jax_plugins

        if any(pkgutil.iter_modules(jax_plugins.__path__)):
            return False
    except ImportError:
        pass
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    return importlib.util.find_spec("libtpu") is None
