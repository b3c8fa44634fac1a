"""glibc malloc settings that stop XLA:CPU from page-faulting its buffers in on every step.

XLA:CPU allocates a compiled program's temporary buffer (hundreds of MiB for a training
step) with ``posix_memalign``, from one of glibc's per-thread arenas. An arena cannot hold a
block above 64 MiB, so glibc maps a fresh one with ``mmap`` on every call and unmaps it
afterwards: each step page-faults every page in anew, in kernel time (BENCHMARKS.md §2).
With a single arena, no ``mmap`` and no trimming (:data:`TUNABLES`), freed blocks stay in
the heap and the next step reuses them, without page faults.

glibc reads these settings once, at process start, from the ``GLIBC_TUNABLES`` environment
variable (``mallopt`` at run time comes too late for arenas that threads already hold).
:func:`restart_tuned` therefore re-executes the running program with them, first thing in
``train.py`` and the benchmarks; in a notebook, start Jupyter with
``GLIBC_TUNABLES=`` :func:`tunables_value`. Accelerators keep their buffers in device
memory, so ``"auto"`` tunes only when JAX will run on the CPU, as
:func:`anodev2_jax.backend.cpu_malloc` decides from ``JAX_PLATFORMS`` before JAX initializes
(and not with ``ANODEV2_CPU_SPEEDUPS=0``).

The cost is resident memory: freed blocks stay in one heap, which fragments, so the process
holds more memory than it would otherwise, growing in steps over the first hundreds of
training steps (BENCHMARKS.md §2). Set ``config.cpu_malloc="default"`` where memory is
tighter than time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Mapping

from anodev2_jax import backend

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
    alone) or "auto" (tune when JAX will run on the CPU with the CPU speed-ups, see
    :func:`anodev2_jax.backend.cpu_malloc`, and the C library is glibc). Call it
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
    return backend.cpu_malloc(mode) == "tuned"


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


def uses_glibc() -> bool:
    """Whether this process's C library is glibc."""
    name = ctypes.util.find_library("c")
    return name is not None and hasattr(ctypes.CDLL(name), "gnu_get_libc_version")
