"""glibc malloc settings that stop XLA:CPU from page-faulting its buffers in on every step.

XLA:CPU allocates a compiled program's temporary buffer (274 MiB for a ResNet-4
anodev2_conf1 training step at batch 128) with ``posix_memalign``, from one of glibc's
per-thread arenas. An arena cannot hold a block above 64 MiB, so glibc maps a fresh one with
``mmap`` on every call and unmaps it afterwards: each step touches every page anew, about
70,000 minor page faults and 0.14 s of kernel time per step on that model (BENCHMARKS.md).
With a single arena, no ``mmap`` and no trimming (:data:`TUNABLES`), freed blocks stay in
the heap and the next step reuses them, without page faults.

glibc reads these settings once, at process start, from the ``GLIBC_TUNABLES`` environment
variable (``mallopt`` at run time comes too late for arenas that threads already hold).
:func:`restart_tuned` therefore re-executes the running program with them, first thing in
``train.py`` and the benchmarks; in a notebook, start Jupyter with
``GLIBC_TUNABLES=`` :func:`tunables_value`. Accelerators keep their buffers in device
memory, so ``"auto"`` tunes only when JAX will run on the CPU.

The cost is resident memory: freed blocks stay in one heap, which fragments, so the process
holds 1.2-1.6x the memory it would otherwise (ResNet-4 anodev2_conf1: 1,389 vs 863 MiB),
growing in steps over the first hundreds of training steps (BENCHMARKS.md, section 2). Set
``config.cpu_malloc="default"`` where memory is tighter than time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Mapping

MODES = ("auto", "tuned", "default")
TUNABLES = {
    "glibc.malloc.arena_max": "1",
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.trim_threshold": str(2**40),
}


def restart_tuned(mode: str = "auto") -> None:
    """Re-execute this program (same interpreter and arguments) under :data:`TUNABLES`
    when ``mode`` asks for them and the process does not run with them yet; else return.

    ``mode``: "tuned" (tune, or raise if the C library is not glibc), "default" (leave malloc
    alone) or "auto" (tune when JAX will run on the CPU and the C library is glibc). Call it
    before any work worth keeping: nothing of the current process survives the restart.
    """
    if not wants_tuning(mode) or is_tuned():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    env = {**os.environ, "GLIBC_TUNABLES": tunables_value(os.environ.get("GLIBC_TUNABLES", ""))}
    os.execve(sys.executable, list(sys.orig_argv), env)


def wants_tuning(mode: str) -> bool:
    """Whether ``mode`` (one of :data:`MODES`) asks for the tunables in this environment."""
    if mode not in MODES:
        raise ValueError(f"cpu malloc mode={mode!r} is unknown; use one of {MODES}")
    if mode == "default":
        return False
    if not uses_glibc():
        if mode == "tuned":
            raise RuntimeError(
                "cpu_malloc='tuned' needs glibc (its GLIBC_TUNABLES); use 'auto' or 'default'"
            )
        return False
    return mode == "tuned" or runs_on_cpu()


def is_tuned(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether GLIBC_TUNABLES in ``environ`` (default: this process's) holds all TUNABLES."""
    current = _parse(environ.get("GLIBC_TUNABLES", ""))
    return all(current.get(name) == value for name, value in TUNABLES.items())


def tunables_value(existing: str = "") -> str:
    """A GLIBC_TUNABLES value: ``existing`` with TUNABLES added (ours win on conflicts)."""
    merged = {**_parse(existing), **TUNABLES}
    return ":".join(f"{name}={value}" for name, value in merged.items())


def _parse(value: str) -> dict[str, str]:
    pairs = (item.split("=", 1) for item in value.split(":") if "=" in item)
    return {name: setting for name, setting in pairs}


def runs_on_cpu(platforms: str | None = None) -> bool:
    """Whether JAX's default backend will be the CPU, decided without initializing it.

    ``platforms``: as JAX_PLATFORMS, default that variable (``jax.config.jax_platforms``).
    When set, its first entry decides; otherwise JAX picks an accelerator whenever a plugin
    for one (CUDA, ROCm, ...) or libtpu is installed.
    """
    if platforms is None:
        import jax

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


def uses_glibc() -> bool:
    """Whether this process's C library is glibc."""
    name = ctypes.util.find_library("c")
    return name is not None and hasattr(ctypes.CDLL(name), "gnu_get_libc_version")
