"""Evaluate a trained run at other step counts, methods and weight grids (is it an ODE?).

    python evaluate.py --workdir=reproduction/cpu/resnet4-anodev2_conf1            # as trained
    python evaluate.py --workdir=RUN --num_z_steps=10 --method=rk4 --bn_statistics=recalibrate
    python evaluate.py --workdir=RUN --data_source=lossless          # on another copy of CIFAR-10
    python evaluate.py --workdir=RUN --sweep --out=docs/continuous_depth/RUN   # the whole grid

Any run directory that train.py or reproduce.py wrote (every seed of a num_seeds run is
evaluated; --seed_index prints one). Without overrides it reproduces the run's recorded final
test accuracy. --bn_statistics: interpolate (the trained per-evaluation BatchNorm statistics,
carried to the new evaluation times) or recalibrate (recomputed on training batches with the
new solver). See anodev2_jax/training/discretization.py.
"""

import shlex
import sys

from absl import app, flags, logging

from anodev2_jax.training import discretization as disc
from anodev2_jax.training import sweep as sweep_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A run directory (train.py's, or a cell of reproduce.py's).")
flags.DEFINE_integer("num_z_steps", None, "Activation steps Nz (default: the run's).")
flags.DEFINE_integer("num_w_steps", None, "Weight steps Nw (default: as the schedule ties it).")
flags.DEFINE_enum("method", None, list(sweep_lib.METHODS), "RK method (default: the run's).")
flags.DEFINE_list("bn_statistics", ["interpolate"], f"One or more of {disc.BN_STATISTICS}.")
flags.DEFINE_integer("recalibration_batches", 50, "Training batches that recalibrate BatchNorm.")
flags.DEFINE_string("data_source", None, "Another CIFAR-10 copy: lossless, bundled, tfds.")
flags.DEFINE_integer("seed_index", None, "Print this seed only (0-based; default: every seed).")
flags.DEFINE_bool("sweep", False, "Sweep --steps x --methods x --bn_statistics, --weight_steps.")
flags.DEFINE_list("steps", [str(n) for n in sweep_lib.STEPS], "Nz values of the sweep.")
flags.DEFINE_list("methods", list(sweep_lib.METHODS), "Methods of the sweep.")
flags.DEFINE_list("weight_steps", [], "Nw values of the sweep at the trained Nz (conf2 runs).")
flags.DEFINE_integer("max_evaluations", None, "Sweep: skip settings of more f evaluations.")
flags.DEFINE_string("out", None, "Folder of sweep.json, .md, .png (default WORKDIR/sweep).")
flags.mark_flags_as_required(["workdir"])


def check_flags(num_seeds: int) -> None:
    """Bad values, named before anything is compiled."""
    for mode in FLAGS.bn_statistics:
        if mode not in disc.BN_STATISTICS:
            raise app.UsageError(f"--bn_statistics={mode}: use one of {disc.BN_STATISTICS}")
    if FLAGS.seed_index is not None and not 0 <= FLAGS.seed_index < num_seeds:
        raise app.UsageError(
            f"--seed_index={FLAGS.seed_index}: the run has {num_seeds} seed(s); use 0 … "
            f"{num_seeds - 1}"
        )
    for method in FLAGS.methods:
        if method not in sweep_lib.METHODS:
            raise app.UsageError(f"--methods: {method!r} is not one of {sweep_lib.METHODS}")


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        run = disc.load_run(FLAGS.workdir, FLAGS.data_source)
        check_flags(run.config.num_seeds)
        setting = disc.Setting(FLAGS.num_z_steps, FLAGS.num_w_steps, FLAGS.method)
        disc.ode_overrides(run.config, setting)  # a setting the schedule cannot take stops here
        if "recalibrate" in FLAGS.bn_statistics or FLAGS.sweep:
            disc.recalibration_order(run, FLAGS.recalibration_batches)
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    modes = FLAGS.bn_statistics
    if FLAGS.sweep and not FLAGS["bn_statistics"].present:
        modes = list(disc.BN_STATISTICS)
    if FLAGS.sweep:
        rows = sweep_lib.sweep(
            run,
            [int(n) for n in FLAGS.steps],
            FLAGS.methods,
            modes,
            [int(n) for n in FLAGS.weight_steps],
            FLAGS.recalibration_batches,
            FLAGS.max_evaluations,
        )
        out = FLAGS.out or f"{FLAGS.workdir}/sweep"
        command = shlex.join(["python", *sys.argv])
        sweep_lib.write_sweep(rows, out, sweep_lib.title_of(run), command)
        print(f"wrote {out}/sweep.md, sweep.json, sweep.png")
        return
    seeds = range(run.config.num_seeds) if FLAGS.seed_index is None else [FLAGS.seed_index]
    for mode in modes:
        result = disc.evaluate_setting(run, setting, mode, FLAGS.recalibration_batches)
        where = "no ODE blocks"
        if result.num_z_steps is not None:
            where = f"Nz={result.num_z_steps} Nw={result.num_w_steps} {result.method}"
        for i in seeds:
            print(
                f"seed {result.seeds[i]}: test accuracy {result.accuracy[i]:.4f}, loss "
                f"{result.loss[i]:.4f} ({run.dataset.source}, {where}, BatchNorm statistics "
                f"{mode}, {result.flops_per_image / 1e6:.1f} MFLOP/image)"
            )


if __name__ == "__main__":
    app.run(main)
