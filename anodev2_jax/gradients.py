"""gradient="auto": per ODE block, backprop where the train step fits in memory, else DTO.

Both are exact and equal to rounding. DTO keeps only each block's input and recomputes the
block in the backward pass (the ANODE code's checkpoint, always on there); backprop keeps every
step's activations and does not recompute: 1.2-1.4x faster train steps on XLA:CPU for every
model and variant (BENCHMARKS.md §6). :func:`choose` starts from backprop in every block and,
while XLA's peak memory of the compiled train step (:func:`peak_bytes`) exceeds the budget,
turns the block with the largest activations back to DTO, recompiling each time; the compiled
step of the choice is the one training runs, so choosing costs no extra compile when
backprop fits.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Choice:
    """``gradients``: block name -> "backprop" | "dto"; ``peak_bytes``: XLA's peak memory of
    the compiled step with them, per device; ``budget_bytes``; ``compiled``: that step."""

    gradients: dict[str, str]
    peak_bytes: int
    budget_bytes: int
    compiled: Any

    def describe(self) -> str:
        """One line for the user: what was chosen and why."""
        backprop = [b for b, g in self.gradients.items() if g == "backprop"]
        dto = [b for b, g in self.gradients.items() if g == "dto"]
        parts = [f"backprop in {', '.join(backprop)}"] if backprop else []
        parts += [f"dto (recomputing) in {', '.join(dto)}"] if dto else []
        fits = "within" if self.peak_bytes <= self.budget_bytes else "over (even with dto)"
        return (
            f"gradient auto: {'; '.join(parts)}: the train step's peak memory is "
            f"{self.peak_bytes / GIB:.2f} GiB per device (XLA's memory_analysis), {fits} the "
            f"budget of {self.budget_bytes / GIB:.2f} GiB (config.memory_budget_gb; "
            "--config.gradient=dto or backprop to choose yourself)"
        )


def peak_bytes(compiled: Any) -> int:
    """XLA's estimate of a compiled program's peak memory per device: its arguments, outputs
    (less the donated buffers they reuse) and temporaries."""
    m = compiled.memory_analysis()
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def default_budget_bytes(device: jax.Device | None = None) -> int:
    """Half of one device's memory: an accelerator's allocator limit, or on the CPU the host's
    physical memory shared by its local CPU devices."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats()
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) // 2
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // jax.local_device_count() // 2


def choose(
    blocks: Sequence[str],
    compile_with: Callable[[Mapping[str, str]], Any],
    budget_bytes: int,
    measure: Callable[[Any], int] = peak_bytes,
) -> Choice:
    """Backprop in as many blocks as the budget allows.

    blocks: the ODE blocks, largest activations first (turned to DTO in this order);
    compile_with: {block: gradient} -> the compiled train step; measure: its peak bytes.
    With DTO in every block and still over the budget, that choice is returned (describe()
    says so): it is the least memory these gradients need.
    """
    gradients = {block: "backprop" for block in blocks}
    while True:
        compiled = compile_with(gradients)
        peak = measure(compiled)
        remaining = [block for block in blocks if gradients[block] == "backprop"]
        if peak <= budget_bytes or not remaining:
            return Choice(dict(gradients), peak, budget_bytes, compiled)
        gradients[remaining[0]] = "dto"
