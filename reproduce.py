"""Reproduce the paper's Tables 1-4: train every cell of a protocol, then tabulate.

    python reproduce.py --protocol=cpu --workdir=runs/repro                 # 15 runs, 5 cells
    python reproduce.py --protocol=paper --models=resnet4 --workdir=runs/paper
    python reproduce.py --protocol=cpu --workdir=runs/repro --report_only   # tables only

--protocol: a name in configs/protocols/ (cpu, paper) or the path of a file with get_config().
--models, --variants, --num_seeds, --first_seed and --epochs override the protocol;
--set FIELD=VALUE (repeatable) sets a training config field of every cell (configs/default.py),
e.g. --set seed_batching=vmap. Finished cells are skipped and interrupted ones resume, so
rerunning the same command continues a run; Ctrl-C checkpoints the running cell. The tables
go to WORKDIR/results.md and WORKDIR/results.json (see anodev2_jax/training/reproduce.py).
"""

import ast
import importlib
import importlib.util
import shlex
import sys
from pathlib import Path

from absl import app, flags, logging

from anodev2_jax.cpu import host_malloc
from anodev2_jax.nn import models
from anodev2_jax.training import reproduce as reproduce_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("protocol", None, "cpu | paper | path/to/protocol.py")
flags.DEFINE_string(
    "workdir", None, "Where the cells' runs and the tables go (default runs/PROTOCOL)."
)
flags.DEFINE_list("models", None, f"Subset of the protocol's models: {','.join(models.MODELS)}.")
flags.DEFINE_list("variants", None, f"Subset of the variants: {','.join(models.VARIANTS)}.")
flags.DEFINE_integer("num_seeds", None, "Seeds per cell (first_seed, first_seed + 1, ...).")
flags.DEFINE_integer("first_seed", None, "The first seed of every cell.")
flags.DEFINE_integer("epochs", None, "Epochs per cell; the model's step schedule is compressed.")
flags.DEFINE_multi_string("set", [], "FIELD=VALUE: a training config field of every cell.")
flags.DEFINE_bool("report_only", False, "Train nothing; rewrite results.md/json from the cells.")
flags.mark_flags_as_required(["protocol"])


def load_protocol(name: str):
    """configs/protocols/NAME.py, or the protocol file at the path ``name``."""
    if name.endswith(".py"):
        spec = importlib.util.spec_from_file_location("protocol", name)
        if spec is None or spec.loader is None or not Path(name).exists():
            raise app.UsageError(f"--protocol={name}: no such file")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(f"configs.protocols.{name}")
        except ModuleNotFoundError:
            found = sorted(p.stem for p in Path("configs/protocols").glob("[!_]*.py"))
            raise app.UsageError(
                f"--protocol={name} is unknown; use one of {found} or a path"
            ) from None
    return module.get_config()


def parse_sets(items: list[str]) -> dict:
    """['FIELD=VALUE', ...] -> {FIELD: VALUE}, the value a Python literal if it reads as one."""
    fields = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise app.UsageError(
                f"--set {item!r}: write FIELD=VALUE, e.g. --set seed_batching=vmap"
            )
        try:
            fields[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            fields[name] = text
    return fields


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:  # orbax logs every checkpoint step at INFO
        logging.set_verbosity(logging.WARNING)
    protocol = load_protocol(FLAGS.protocol)
    for name, value in (
        ("models", FLAGS.models and tuple(FLAGS.models)),
        ("variants", FLAGS.variants and tuple(FLAGS.variants)),
        ("num_seeds", FLAGS.num_seeds),
        ("first_seed", FLAGS.first_seed),
        ("num_epochs", FLAGS.epochs),
    ):
        if value is not None:
            protocol[name] = value
    reproduce_lib.check_protocol(protocol)
    model_configs = {
        model: importlib.import_module(f"configs.{model}").get_config() for model in protocol.models
    }
    workdir = FLAGS.workdir or f"runs/{protocol.name}"
    overrides = parse_sets(FLAGS.set)
    cells = reproduce_lib.make_cells(protocol, model_configs, workdir, overrides)  # validates
    host_malloc.restart_tuned(cells[0].config.cpu_malloc)
    reproduce_lib.run(
        protocol,
        model_configs,
        workdir,
        overrides=overrides,
        report_only=FLAGS.report_only,
        command=shlex.join(["python", *sys.argv]),
    )


if __name__ == "__main__":
    app.run(main)
