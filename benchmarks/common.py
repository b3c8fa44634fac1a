"""What the benchmark scripts share: configs, the compiled train step, timing, the fp32 peak,
the PyTorch reference as a subprocess, and markdown tables.

Not part of the package. Run the scripts from the repository root as modules,
``.venv/bin/python -m benchmarks.<script>``, so that ``configs`` and ``benchmarks`` import.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from anodev2_jax import training
from anodev2_jax.cpu import host_malloc, native
from anodev2_jax.nn import conv as conv_lib
from anodev2_jax.nn import models
from anodev2_jax.training import data as data_lib
from anodev2_jax.training import parallel

BENCH_MODELS = ("resnet4", "resnet10", "alexnet")
BENCH_VARIANTS = ("baseline", "anode", "anodev2_conf1", "anodev2_conf2")
# torch_ref.py's names for our variants, with the flags that make them the same model.
TORCH_VARIANTS = {
    "baseline": ["baseline"],
    "anode": ["anode", "--nt", "2"],
    "anodev2_conf1": ["anodev2_c1"],
    "anodev2_conf2": ["anodev2_c2"],
}
# ../shared/bench/torch_ref.py beside the repository.
DEFAULT_TORCH_REF = Path(__file__).resolve().parents[2] / "shared" / "bench" / "torch_ref.py"
# Recommended by the reference's README: stops glibc from unmapping large buffers every step
# (without it torch CPU training is up to 1.5x slower). Set for the torch subprocesses only.
TORCH_GLIBC_TUNABLES = (
    "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736"
)
TRAIN_EXAMPLES = 50_000  # CIFAR-10's training set: sets steps_per_epoch for the lr schedule


# -- command line ----------------------------------------------------------------------------------
def name_list(allowed: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """argparse type: a comma-separated subset of ``allowed``, validated before any work."""

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"{what} {unknown or text!r} unknown; use a comma-separated subset of "
                f"{','.join(allowed)}"
            )
        return names

    return parse


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models",
        type=name_list(BENCH_MODELS, "model"),
        default=list(BENCH_MODELS),
        help="comma-separated, default all: " + ",".join(BENCH_MODELS),
    )
    parser.add_argument(
        "--variants",
        type=name_list(BENCH_VARIANTS, "variant"),
        default=list(BENCH_VARIANTS),
        help="comma-separated, default all: " + ",".join(BENCH_VARIANTS),
    )
    parser.add_argument(
        "--conv_impl",
        type=name_list(conv_lib.IMPLS, "conv impl"),
        default=["xla"],
        help="comma-separated anodev2_jax.nn.conv.IMPLS to compare; now: "
        + ",".join(conv_lib.IMPLS),
    )
    parser.add_argument("--batch_size", type=int, default=128)
    add_cpu_malloc_arg(parser)
    parser.add_argument(
        "--torch_python",
        type=Path,
        default=None,
        help="python of a venv with torch: run torch_ref.py beside each row",
    )
    parser.add_argument("--torch_ref", type=Path, default=DEFAULT_TORCH_REF)
    parser.add_argument("--json", type=Path, default=None, help="write the raw numbers here")
    parser.add_argument(
        "--markdown", type=Path, default=None, help="also write the tables to this file"
    )


def add_cpu_malloc_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cpu_malloc",
        choices=host_malloc.MODES,
        default="auto",
        help="malloc settings of this process (anodev2_jax.cpu.host_malloc; train.py's default)",
    )


def tune_malloc(args: argparse.Namespace) -> None:
    """Restart under host_malloc's GLIBC_TUNABLES when --cpu_malloc asks for them."""
    host_malloc.restart_tuned(args.cpu_malloc)
    args.cpu_malloc_tuned = host_malloc.is_tuned()


def check_common_args(args: argparse.Namespace) -> None:
    """ValueErrors for arguments argparse cannot check, before any compilation; then the
    malloc settings (a restart, see host_malloc)."""
    if args.batch_size < 1:
        raise ValueError(f"--batch_size={args.batch_size} must be a positive integer")
    if args.torch_python is not None:
        if not args.torch_python.exists():
            raise ValueError(
                f"--torch_python={args.torch_python} does not exist; create the venv as "
                "../shared/bench/README.md says, or leave the flag out for JAX rows alone"
            )
        if not args.torch_ref.exists():
            raise ValueError(f"--torch_ref={args.torch_ref} does not exist; pass torch_ref.py")
    tune_malloc(args)


# -- the real training step ------------------------------------------------------------------------
def load_config(
    model: str,
    variant: str,
    batch_size: int,
    conv_impl: str,
    gradient: str | None = "dto",
    **ode_overrides: Any,
) -> ml_collections.ConfigDict:
    """configs/<model>.py with the variant, batch size, conv impl and ODE fields overridden.

    gradient: of the ODE variants but node (default "dto", the algorithm of the reference's
    checkpointed blocks; None keeps the variant's own, "auto")."""
    config = importlib.import_module(f"configs.{model}").get_config()
    config.variant = variant
    config.batch_size = batch_size
    config.conv_impl = conv_impl
    if variant not in ("baseline", "node"):
        config.gradient = gradient
    for name, value in ode_overrides.items():
        config[name] = value
    training.check_config(config)
    return config


def random_batch(batch_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images (B, 32, 32, 3) and int32 labels (B,), like torch_ref's random input."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch_size, *models.IMAGE_SHAPE), dtype=np.uint8)
    labels = rng.integers(0, models.NUM_CLASSES, batch_size).astype(np.int32)
    return images, labels


class CompiledStep:
    """training.make_train_step for a config, jitted (state donated, as in training), compiled.

    Attributes: ``model``, ``state`` (fresh), ``images``/``labels`` (device arrays),
    ``compiled`` (call it as ``compiled(state, images, labels)``), ``lower_s``/``compile_s``
    (seconds to trace+lower and to compile), ``flops`` (XLA's count for one step),
    ``gradients`` (block -> the gradient it uses; gradient "auto" resolved as training does,
    by an extra compile of training.compile_train_step).
    """

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.model = training.model_from_config(config)
        optimizer = training.make_optimizer(config, TRAIN_EXAMPLES // config.batch_size)
        self.state = training.create_state(self.model, optimizer, config)
        blocks = models.ode_block_inputs(self.model)
        self.gradients = {block: self.model.ode.gradient_of(block) for block in blocks}
        if blocks and self.model.ode.gradient == "auto":
            mesh = parallel.make_mesh(jax.local_devices()[:1])
            state = parallel.replicate(self.state, mesh)
            _, self.model, self.gradients = training.compile_train_step(
                config, self.model, optimizer, state, mesh
            )
        step = training.make_train_step(
            self.model, optimizer, jnp.dtype(config.dtype), training.train_draws(config)
        )
        images, labels = random_batch(config.batch_size)
        self.images, self.labels = jnp.asarray(images), jnp.asarray(labels)
        start = time.perf_counter()
        lowered = jax.jit(step, donate_argnums=0).lower(self.state, self.images, self.labels)
        self.lower_s = time.perf_counter() - start
        start = time.perf_counter()
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - start
        self.flops = flops_of(self.compiled)
        self.drawn: list[int] = []

    def loss_function(self) -> Callable[[Any], jax.Array]:
        """params -> the train step's loss on this batch (normalized, not augmented), with
        batch statistics in training mode, as in ``training.make_train_step``."""
        state, model, labels = self.state, self.model, self.labels
        inputs = data_lib.normalize(self.images).astype(jnp.dtype(self.config.dtype))

        def loss(params: Any) -> jax.Array:
            variables = {"params": params, "batch_stats": state.batch_stats}
            logits, _ = model.apply(variables, inputs, train=True, mutable=["batch_stats"])
            return jnp.mean(training.cross_entropy(logits, labels))

        return loss

    def time_steps(self, steps: int, warmup: int) -> list[float]:
        """Seconds of each of ``steps`` train steps after ``warmup`` untimed ones; with
        ``config.train_num_z_steps``, the step count each timed step drew is appended to
        ``self.drawn``."""
        state = self.state
        times = []
        for i in range(warmup + steps):
            start = time.perf_counter()
            state, metrics = self.compiled(state, self.images, self.labels)
            jax.block_until_ready((state, metrics))
            if i >= warmup:
                times.append(time.perf_counter() - start)
                if "num_z_steps" in metrics:
                    self.drawn.append(int(metrics["num_z_steps"]))
        if not np.isfinite(float(metrics["loss"])):
            raise RuntimeError(f"non-finite loss {float(metrics['loss'])} in the benchmark")
        self.state = state
        return times


def flops_of(compiled: Any) -> float:
    """XLA's FLOP count of a compiled function (cost_analysis is a dict, or a list of one)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost["flops"])


def time_calls(fn: Callable[[], Any], reps: int, warmup: int = 2) -> list[float]:
    """Seconds of ``reps`` calls of ``fn`` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


# -- fp32 matmul peak ------------------------------------------------------------------------------
def matmul_peak(n: int = 4096, reps: int = 5) -> list[dict[str, Any]]:
    """fp32 (n, n) @ (n, n) GFLOP/s: a jitted JAX matmul (XLA) and numpy's (its BLAS)."""
    rows = []
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), jnp.float32)
    b = jax.random.normal(key_b, (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    times = time_calls(lambda: matmul(a, b).block_until_ready(), reps)
    rows.append(_peak_row("jax-xla", n, times))
    a_np, b_np = np.asarray(a), np.asarray(b)
    out = np.empty((n, n), np.float32)
    times = time_calls(lambda: np.matmul(a_np, b_np, out=out), reps)
    rows.append(_peak_row(f"numpy-{_numpy_blas()}", n, times))
    return rows


def _peak_row(backend: str, n: int, times: list[float]) -> dict[str, Any]:
    flop = 2.0 * n**3
    return {
        "backend": backend,
        "n": n,
        "gflops_median": flop / statistics.median(times) / 1e9,
        "gflops_best": flop / min(times) / 1e9,
    }


def _numpy_blas() -> str:
    try:
        info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return str(info["name"])
    except (TypeError, KeyError):
        return "blas"


def torch_peak(torch_python: Path, torch_ref: Path) -> list[dict[str, Any]]:
    """The reference's peak_flops.py (torch/MKL at 1 and 2 threads), 2-thread rows only."""
    script = torch_ref.parent / "peak_flops.py"
    if not script.exists():
        return []
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2", "GLIBC_TUNABLES": TORCH_GLIBC_TUNABLES}
    result = subprocess.run(
        [str(torch_python), str(script), "torch"], capture_output=True, text=True, env=env
    )
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return [
        {
            "backend": row["backend"],
            "n": row["n"],
            "gflops_median": row["gflops_median"],
            "gflops_best": row["gflops_best"],
        }
        for row in rows
        if row.get("threads") == 2
    ]


# -- the PyTorch reference -------------------------------------------------------------------------
def torch_command(torch_python: Path, torch_ref: Path, *args: str) -> list[str]:
    return [str(torch_python), str(torch_ref), *args]


def torch_bench_command(
    args: argparse.Namespace, model: str, variant: str, iters: int
) -> list[str]:
    """``torch_ref.py bench --json`` of our ``variant`` (its name and flags there)."""
    name, *flags = TORCH_VARIANTS[variant]
    return torch_command(
        args.torch_python,
        args.torch_ref,
        "bench",
        "--model",
        model,
        "--variant",
        name,
        *flags,
        "--batch",
        str(args.batch_size),
        "--iters",
        str(iters),
        "--json",
    )


def run_torch(command: list[str]) -> list[dict[str, Any]]:
    """Run torch_ref.py with the recommended GLIBC_TUNABLES; its JSON lines, parsed."""
    env = {**os.environ, "GLIBC_TUNABLES": TORCH_GLIBC_TUNABLES}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{shell_line(command)} failed:\n{result.stderr[-2000:]}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def torch_version(torch_python: Path) -> str:
    result = subprocess.run(
        [str(torch_python), "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def shell_line(command: Sequence[str]) -> str:
    """The command as one would type it, with the GLIBC_TUNABLES torch ran under."""
    return f"GLIBC_TUNABLES={TORCH_GLIBC_TUNABLES} " + " ".join(command)


# -- reporting -------------------------------------------------------------------------------------
def environment(torch_python: Path | None, cpu_malloc_tuned: bool) -> dict[str, Any]:
    """Date, command line, versions and machine of this run."""
    import jaxlib

    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "-m", _module_name(), *sys.argv[1:]]),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "devices": [str(d) for d in jax.devices()],
        "cpu": native.cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "jax_process_glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "jax_process_malloc_tuned": cpu_malloc_tuned,
    }
    if torch_python is not None:
        env["torch"] = torch_version(torch_python)
        env["torch_glibc_tunables"] = TORCH_GLIBC_TUNABLES
    return env


def _module_name() -> str:
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else sys.argv[0]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 2) -> str:
    """A GitHub markdown table: the first ``left`` columns left-aligned (names), the rest
    right-aligned (numbers); None is shown as an en dash."""
    align = ["---" if i < left else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join("–" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 0) -> str | None:
    return None if value is None else f"{value:,.{digits}f}"


def emit(text: str, markdown: Path | None) -> None:
    """Print a report section now (long runs are polled) and append it to ``markdown``."""
    print(text + "\n", flush=True)
    if markdown is not None:
        with markdown.open("a") as file:
            file.write(text + "\n\n")


def write_json(path: Path | None, payload: Any) -> None:
    if path is not None:
        path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


MIB = 2**20
