"""A run's config: its checks, and the model, seeds and optimizer it describes.

A config is an ``ml_collections.ConfigDict`` of ``configs/default.py``'s fields. Everything a
run builds from it before training starts is here, so a bad field fails before any data is
loaded or anything compiled.
"""

from __future__ import annotations

import dataclasses
import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_collections
import optax

from anodev2_jax import coupling as coupling_lib
from anodev2_jax import stepping
from anodev2_jax.cpu import host_malloc
from anodev2_jax.nn import models
from anodev2_jax.training import data as data_lib
from anodev2_jax.training import input_pipeline as input_lib
from anodev2_jax.training import seeds as seeds_lib


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fail fast, before any data loading or compilation, naming the bad field."""
    if config.model not in models.MODELS:
        raise ValueError(f"config.model={config.model!r} is unknown; use one of {models.MODELS}")
    if config.variant not in models.VARIANTS:
        raise ValueError(
            f"config.variant={config.variant!r} is unknown; use one of {models.VARIANTS}"
        )
    if config.data_source not in data_lib.SOURCES:
        raise ValueError(
            f"config.data_source={config.data_source!r} is unknown; use one of {data_lib.SOURCES}"
        )
    if config.cpu_malloc not in host_malloc.MODES:
        raise ValueError(
            f"config.cpu_malloc={config.cpu_malloc!r} is unknown; use one of {host_malloc.MODES}"
        )
    if config.dtype not in ("float32", "float64"):
        raise ValueError(f"config.dtype={config.dtype!r} must be 'float32' or 'float64'")
    for name in ("batch_size", "eval_batch_size", "num_epochs", "log_every_steps", "num_seeds"):
        value = config[name]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{name}={value!r} must be a positive integer")
    for name in ("seed", "data_seed"):
        value = config[name]
        if not (value is None and name == "data_seed") and (
            not isinstance(value, int) or value < 0
        ):
            raise ValueError(f"config.{name}={value!r} must be a non-negative integer")
    if config.seed_batching not in seeds_lib.BATCHINGS:
        raise ValueError(
            f"config.seed_batching={config.seed_batching!r} is unknown; use one of "
            f"{seeds_lib.BATCHINGS}"
        )
    if config.input_pipeline not in input_lib.PIPELINES:
        raise ValueError(
            f"config.input_pipeline={config.input_pipeline!r} is unknown; use one of "
            f"{input_lib.PIPELINES}"
        )
    per_dispatch = config.steps_per_dispatch
    if not isinstance(per_dispatch, int) or not 0 <= per_dispatch <= config.log_every_steps:
        raise ValueError(
            f"config.steps_per_dispatch={per_dispatch!r} must be an integer from 1 to "
            f"config.log_every_steps={config.log_every_steps} (a dispatch ends at every log "
            "boundary), or 0 for log_every_steps"
        )
    if config.input_pipeline == "host" and per_dispatch > 1:
        raise ValueError(
            f"config.steps_per_dispatch={per_dispatch} is read by the device input pipeline "
            "only; config.input_pipeline='host' dispatches every step. Use "
            "--config.input_pipeline=device, or leave steps_per_dispatch at 0"
        )
    if config.learning_rate <= 0:
        raise ValueError(f"config.learning_rate={config.learning_rate} must be positive")
    if config.memory_budget_gb is not None and not config.memory_budget_gb > 0:
        raise ValueError(
            f"config.memory_budget_gb={config.memory_budget_gb} must be positive (or None: half "
            "of one device's memory)"
        )
    if config.grad_clip_norm is not None and not config.grad_clip_norm > 0:
        raise ValueError(
            f"config.grad_clip_norm={config.grad_clip_norm} must be positive (or None: no clipping)"
        )
    if config.warmup_epochs < 0:
        raise ValueError(f"config.warmup_epochs={config.warmup_epochs} must be ≥ 0")
    decay_epochs = list(config.lr_decay_epochs)
    if not all(isinstance(e, int | float) and e >= 0 for e in decay_epochs):
        raise ValueError(
            f"config.lr_decay_epochs={config.lr_decay_epochs} must hold epochs ≥ 0 (fractions "
            "allowed, e.g. (6.43, 12.86))"
        )
    if decay_epochs != sorted(decay_epochs):
        raise ValueError(f"config.lr_decay_epochs={config.lr_decay_epochs} must be increasing")
    # Builds the ODE plan, which validates step counts, schedule and method.
    model_from_config(config)
    train_draws(config)


def model_from_config(config: ml_collections.ConfigDict, **ode_overrides: Any) -> Any:
    """The Flax model of ``config``: model, variant, ODE overrides, conv impl and dtype;
    ``ode_overrides`` (ODEConfig fields, e.g. an explicit ``schedule``) replace the config's.

    conv_impl "auto" is XLA's convolution when the seeds of a run are vmapped: under vmap the
    conditionals of the CPU formulations (anodev2_jax.cpu.conv) run both branches.
    """
    overrides = {
        name: config[name]
        for name in ("num_z_steps", "num_w_steps", "method", "gradient", "norm_params")
        if config[name] is not None
    }
    conv_impl = config.conv_impl
    vmapped = config.num_seeds > 1 and seeds_lib.resolve_batching(config.seed_batching) == "vmap"
    if conv_impl == "auto" and vmapped:
        conv_impl = "xla"
    # The time kernel K of θ = ∫ K(t-τ) w(τ) dτ; "dirac" (θ = w) is every variant's own.
    if config.kernel == "dirac" and config.kernel_rate is not None:
        raise ValueError(
            f"config.kernel_rate={config.kernel_rate} is set, but config.kernel='dirac' has no "
            "rate; use --config.kernel=exponential (or dirac+exponential), or drop kernel_rate"
        )
    if config.kernel != "dirac":
        rate = 1.0 if config.kernel_rate is None else config.kernel_rate
        try:
            overrides["coupling"] = coupling_lib.make_coupling(config.kernel, rate)
        except ValueError as e:
            raise ValueError(f"config.{e}") from e
    return models.create_model(
        config.model,
        config.variant,
        conv_impl=conv_impl,
        dtype=jnp.dtype(config.dtype),
        **(overrides | ode_overrides),
    )


@dataclasses.dataclass(frozen=True)
class Setting:
    """Where the ODE blocks are solved: None keeps the run's own (how Nw follows Nz:
    :mod:`anodev2_jax.training.discretization`)."""

    num_z_steps: int | None = None
    num_w_steps: int | None = None
    method: str | None = None


def ode_overrides(config: ml_collections.ConfigDict, setting: Setting) -> dict[str, Any]:
    """The ODEConfig fields (num_z_steps, num_w_steps, method, schedule) of ``setting`` for
    the run of ``config``; ValueError naming the bad value and the fix when the run's
    schedule cannot take it (checked by building the model, before anything compiles)."""
    ode = model_from_config(config).ode
    asked = {k: v for k, v in dataclasses.asdict(setting).items() if v is not None}
    if ode is None:
        if asked:
            raise ValueError(
                f"the run is config.variant='baseline', which has no ODE blocks to evaluate at "
                f"{asked}; pass the workdir of an ODE variant (node, anode, anodev2_*)"
            )
        return {}
    trained = ode.plan()
    num_z = setting.num_z_steps or trained.num_z_steps
    method = setting.method or trained.method
    if method not in stepping.METHODS:
        raise ValueError(f"method={method!r} is unknown; use one of {stepping.METHODS}")
    overrides: dict[str, Any] = {"num_z_steps": num_z, "method": method}
    if ode.schedule == "conf2":
        num_w = setting.num_w_steps or trained.num_w_steps
        # θ(0) on [0, 1/2), θ(1) after: conf2 itself at Nz = 2.
        schedule = tuple(0 if 2 * n < num_z else num_w for n in range(num_z))
        overrides["schedule"] = "conf2" if num_z == 2 else schedule
    else:
        stages = math.lcm(
            *(Fraction(c).limit_denominator().denominator for c in stepping.TABLEAUS[method].c)
        )
        ratio = trained.num_w_steps // trained.num_z_steps
        num_w = setting.num_w_steps or num_z * math.lcm(ratio, stages)
    overrides["num_w_steps"] = num_w
    try:
        model_from_config(config, **overrides)
    except ValueError as error:
        raise ValueError(
            f"the run's {ode.schedule if isinstance(ode.schedule, str) else 'custom'} schedule "
            f"cannot be solved with num_z_steps={num_z}, num_w_steps={num_w}, "
            f"method={method!r}: {error}"
        ) from None
    return overrides


def train_draws(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """The ODEConfig overrides of each step count a training step may draw
    (``config.train_num_z_steps``), [] when it draws none; ValueError naming the bad value."""
    draws = config.get("train_num_z_steps")
    if draws is None:
        return []
    if not (
        isinstance(draws, tuple | list)
        and draws
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in draws)
    ):
        raise ValueError(
            f"config.train_num_z_steps={draws!r} must be a tuple of positive step counts, "
            "e.g. (2, 3, 4), or None"
        )
    if model_from_config(config).ode is None:
        raise ValueError(
            f"config.train_num_z_steps={tuple(draws)} draws step counts for ODE blocks, and "
            f"config.variant={config.variant!r} has none; drop it or use an ODE variant"
        )
    try:
        return [ode_overrides(config, Setting(num_z_steps=n)) for n in draws]
    except ValueError as error:
        raise ValueError(f"config.train_num_z_steps={tuple(draws)}: {error}") from None


def seeds_of(config: ml_collections.ConfigDict) -> list[int]:
    """The seeds a run trains: config.seed, …, config.seed + config.num_seeds - 1."""
    return seeds_lib.seed_list(config.seed, config.num_seeds)


def data_seed(config: ml_collections.ConfigDict) -> int:
    """The seed of the data order (and of the synthetic data): config.data_seed or config.seed."""
    return config.seed if config.data_seed is None else config.data_seed


def learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
    """Linear warm-up from 0, then the paper's step decay at ``lr_decay_epochs``.

    Epochs may be fractional (a compressed schedule): a boundary falls on the step
    int(epoch · steps_per_epoch).
    """
    warmup_steps = int(config.warmup_epochs * steps_per_epoch)
    # join_schedules hands the second schedule steps counted from the end of the warm-up.
    boundaries: dict[int, float] = {}
    for epoch in config.lr_decay_epochs:
        step = max(int(epoch * steps_per_epoch) - warmup_steps, 0)
        boundaries[step] = boundaries.get(step, 1.0) * config.lr_decay_factor
    decay = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
    warmup = optax.linear_schedule(0.0, config.learning_rate, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
    """SGD with momentum and (PyTorch-style, coupled) weight decay on every parameter; the
    loss gradient first clipped to global norm ``config.grad_clip_norm`` when it is set."""
    clip = (
        [] if config.grad_clip_norm is None else [optax.clip_by_global_norm(config.grad_clip_norm)]
    )
    return optax.chain(
        *clip,
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=config.momentum),
    )


def run_config(workdir: Path) -> ml_collections.ConfigDict:
    """The training config of a run: its results.json's, or the harness's config.json."""
    for name, key in (("results.json", "config"), ("config.json", None)):
        path = workdir / name
        if path.exists():
            saved = json.loads(path.read_text())
            return ml_collections.ConfigDict(saved[key] if key else saved)
    raise ValueError(
        f"{workdir} has neither results.json nor config.json: pass the --workdir of a run "
        "(train.py or reproduce.py)"
    )
