"""Remake the figures from trained runs: the paper's Figures 1, 4, 5, and accuracy curves.

    python figures.py --workdir=runs/repro/resnet4-anodev2_conf1 --out=docs/figure4.png
    python figures.py --figure=accuracy --workdir=runs/repro --out=runs/repro/test_accuracy.png

--figure=kernel (default): plots input channel --in_channel of output filter --out_channel of
the first evolved kernel of the first ODE block (or --block, --kernel) of seed --seed_index of
the run, at every weight step of the trained block, with the learned d, v, ρ in the caption.
--figure=accuracy: the test accuracy per epoch of every run in a reproduce.py workdir, the mean
over seeds as a line and the min–max band, one colour per variant (anodev2_jax/training/figures.py).
"""

from absl import app, flags, logging

from anodev2_jax.training import figures

FLAGS = flags.FLAGS
flags.DEFINE_enum("figure", "kernel", ["kernel", "accuracy"], "Which figure to draw.")
flags.DEFINE_string(
    "workdir",
    None,
    "kernel: a run directory (train.py or one cell of reproduce.py); "
    "accuracy: a reproduce.py workdir.",
)
flags.DEFINE_string("out", None, "Output image, e.g. docs/figure4.png (format from the suffix).")
flags.DEFINE_integer("seed_index", 0, "Which seed of a num_seeds run (0 = its config.seed).")
flags.DEFINE_string("block", None, "ODE block (default: the first with evolved weights).")
flags.DEFINE_string("kernel", None, "Kernel of the block (default: its first, e.g. conv1).")
flags.DEFINE_integer("in_channel", 0, "Input channel of the kernel to plot.")
flags.DEFINE_integer("out_channel", 0, "Output channel (filter) of the kernel to plot.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:  # orbax logs every checkpoint it opens at INFO
        logging.set_verbosity(logging.WARNING)
    if FLAGS.figure == "accuracy":
        curves = figures.accuracy_curves(FLAGS.workdir)
        out = figures.save_figure(figures.plot_accuracy_curves(curves), FLAGS.out)
        print(f"{out}: " + ", ".join(f"{c.model}-{c.variant}" for c in curves))
        return
    evolution = figures.kernel_evolution(
        FLAGS.workdir,
        seed_index=FLAGS.seed_index,
        block=FLAGS.block,
        kernel=FLAGS.kernel,
        in_channel=FLAGS.in_channel,
        out_channel=FLAGS.out_channel,
    )
    out = figures.save_figure(figures.plot_kernel_evolution(evolution), FLAGS.out)
    print(f"{out}: {figures.caption(evolution)}")


if __name__ == "__main__":
    app.run(main)
