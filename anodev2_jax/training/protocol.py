"""A reproduction protocol and its cells: one model × variant each, all seeds in one run.

A protocol (``configs/protocols/*.py``) is data: models, variants, seeds, epochs and training
fields. Each cell, one model × variant, is one :func:`anodev2_jax.training.train_and_evaluate`
run of all the protocol's seeds (``config.num_seeds``) in ``WORKDIR/MODEL-VARIANT``. A cell
with a ``results.json`` is finished; a cell that started (``config.json``, written before it
trains) resumes from its last checkpoint; both must have been made with the same config as
the protocol now asks (up to :data:`RUN_MECHANICS`), else a ``ValueError`` names the fields
that differ before anything trains.

Epochs: ``protocol.num_epochs = None`` keeps each model config's own (the paper's 350, AlexNet
120, with its decay epochs); a number compresses the model's step schedule to that length,
every decay epoch scaled by ``num_epochs / model's num_epochs`` (fractions allowed).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from anodev2_jax import training
from anodev2_jax.nn import models
from anodev2_jax.training import seeds as seeds_lib

RUN_MECHANICS = (
    "progress_bar",
    "log_every_steps",
    "checkpoint_every_epochs",
    "max_checkpoints_to_keep",
    "cpu_malloc",
    "conv_impl",
    "seed_batching",
    "input_pipeline",
    "steps_per_dispatch",
    "memory_budget_gb",
    "eval_batch_size",
    "data_dir",
    "download",
)


PROTOCOL_FIELDS = (
    "name",
    "models",
    "variants",
    "num_seeds",
    "first_seed",
    "num_epochs",
    "training",
)


CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class Cell:
    """One model × variant of a protocol: its training config and its run directory."""

    model: str
    variant: str
    config: ml_collections.ConfigDict
    workdir: Path

    @property
    def name(self) -> str:
        return f"{self.model}-{self.variant}"


def check_protocol(protocol: ml_collections.ConfigDict) -> None:
    """ValueError naming the bad protocol field, before anything is built or trained."""
    missing = [name for name in PROTOCOL_FIELDS if name not in protocol]
    if missing:
        raise ValueError(f"the protocol lacks the fields {missing}; see configs/protocols/cpu.py")
    for name, allowed in (("models", models.MODELS), ("variants", models.VARIANTS)):
        chosen = list(protocol[name])
        unknown = [value for value in chosen if value not in allowed]
        if unknown or not chosen or len(set(chosen)) != len(chosen):
            raise ValueError(
                f"protocol.{name}={tuple(chosen)} must be distinct names out of {allowed} "
                f"(unknown: {unknown}); e.g. --{name}={','.join(allowed[:2])}"
            )
    if not isinstance(protocol.num_seeds, int) or protocol.num_seeds < 1:
        raise ValueError(f"protocol.num_seeds={protocol.num_seeds!r} must be a positive integer")
    if not isinstance(protocol.first_seed, int) or protocol.first_seed < 0:
        raise ValueError(
            f"protocol.first_seed={protocol.first_seed!r} must be a non-negative integer"
        )
    epochs = protocol.num_epochs
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise ValueError(
            f"protocol.num_epochs={epochs!r} must be a positive integer, or None for each "
            "model config's own"
        )


def cell_config(
    protocol: ml_collections.ConfigDict,
    base: ml_collections.ConfigDict,
    variant: str,
    overrides: Mapping[str, Any] | None = None,
) -> ml_collections.ConfigDict:
    """The training config of one cell: ``base`` (configs/MODEL.py) with the protocol's
    variant, seeds, epochs (schedule compressed), training fields and the variant's own
    training fields, then ``overrides``."""
    config = copy.deepcopy(base)
    config.variant = variant
    config.seed = protocol.first_seed
    config.num_seeds = protocol.num_seeds
    if protocol.num_epochs is not None and protocol.num_epochs != base.num_epochs:
        scale = protocol.num_epochs / base.num_epochs
        config.num_epochs = protocol.num_epochs
        config.lr_decay_epochs = tuple(epoch * scale for epoch in base.lr_decay_epochs)
    per_variant = protocol.variant_training.get(variant, {})
    sources = (
        ("protocol.training", dict(protocol.training)),
        (f"protocol.variant_training.{variant}", dict(per_variant)),
        ("--set", overrides or {}),
    )
    for source, fields in sources:
        for name, value in fields.items():
            if name not in config:
                raise ValueError(
                    f"{source} sets {name}={value!r}, which is not a training config field "
                    "(configs/default.py)"
                )
            try:
                config[name] = value
            except TypeError as error:
                raise ValueError(f"{source} sets {name}={value!r}: {error}") from None
    training.check_config(config)
    return config


def make_cells(
    protocol: ml_collections.ConfigDict,
    model_configs: Mapping[str, ml_collections.ConfigDict],
    workdir: str | Path,
    overrides: Mapping[str, Any] | None = None,
) -> list[Cell]:
    """Every model × variant of ``protocol``, model-major, each validated (check_config).

    model_configs: model name -> its config (``configs/MODEL.py``'s get_config()).
    """
    check_protocol(protocol)
    absent = [model for model in protocol.models if model not in model_configs]
    if absent:
        raise ValueError(f"no training config for the models {absent}; pass configs/MODEL.py's")
    root = Path(workdir)
    cells = []
    for model in protocol.models:
        for variant in protocol.variants:
            config = cell_config(protocol, model_configs[model], variant, overrides)
            cells.append(Cell(model, variant, config, root / f"{model}-{variant}"))
    return cells


def plain(config: ml_collections.ConfigDict | dict) -> dict:
    """A config as results.json holds it (JSON types: lists for tuples)."""
    raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    return json.loads(json.dumps(raw, default=str))


def config_differences(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """'FIELD: SAVED -> NOW' for each field (not in RUN_MECHANICS) that differs."""
    now = plain(config)
    return [
        f"{name}: {saved.get(name)!r} -> {now.get(name)!r}"
        for name in sorted(set(saved) | set(now))
        if name not in RUN_MECHANICS and saved.get(name) != now.get(name)
    ]


def cell_status(cell: Cell) -> str:
    """'finished' (results.json), 'started' (config.json: resumes) or 'pending'.

    Raises ValueError when the cell was made with another config than ``cell.config``.
    """
    for status, name in (("finished", "results.json"), ("started", CONFIG_FILE)):
        path = cell.workdir / name
        if not path.exists():
            continue
        saved = json.loads(path.read_text())
        differences = config_differences(
            saved["config"] if status == "finished" else saved, cell.config
        )
        if differences:
            raise ValueError(
                f"cell {cell.name} in {cell.workdir} was {status} with another config than "
                f"this protocol asks ({'; '.join(differences)}). Use another --workdir, or "
                "move that directory away to train the cell again."
            )
        return status
    return "pending"


def seed_range_text(cell: Cell) -> str:
    """'0–2' (or '0' for one seed): the seeds of a cell."""
    seeds = seeds_lib.seed_list(cell.config.seed, cell.config.num_seeds)
    return f"{seeds[0]}–{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])
