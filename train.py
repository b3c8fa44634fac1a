"""Train an ANODEV2 model on CIFAR-10.

    python train.py --config=configs/resnet4.py --config.variant=anodev2_conf1 --workdir=runs/r4

Any config field can be overridden with --config.FIELD=VALUE (see configs/default.py).
Restarting with the same --workdir resumes from its last checkpoint.

One process uses every local device. For several processes (hosts), start the same command
in each with --coordinator_address=HOST0:PORT --num_processes=N --process_id=I, or with
--distributed alone on SLURM and TPU VMs, where JAX finds these itself.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from anodev2_jax import training
from anodev2_jax.cpu import host_malloc

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string(
    "workdir", None, "Where checkpoints, logs and results go (default: runs/MODEL-VARIANT)."
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (auto-detects SLURM, TPU, ...)."
)
flags.DEFINE_integer(
    "initialization_timeout", 300, "Multi-process: seconds to wait for all processes to connect."
)
flags.DEFINE_integer(
    "heartbeat_timeout_seconds",
    100,
    "Multi-process: a process silent this long counts as dead, and all others stop with an error.",
)
flags.DEFINE_integer(
    "shutdown_timeout_seconds",
    300,
    "Multi-process: how long a process that ends (or fails) waits for the others to end too.",
)
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:  # orbax logs every checkpoint step at INFO
        logging.set_verbosity(logging.WARNING)
    config = FLAGS.config
    training.check_config(config)
    # glibc reads its malloc settings at start-up: this restarts the process with them when
    # config.cpu_malloc asks for them (on the CPU, by default) and they are not set yet.
    host_malloc.restart_tuned(config.cpu_malloc)
    explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if FLAGS.distributed or any(value is not None for value in explicit):
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
            initialization_timeout=FLAGS.initialization_timeout,
            heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds,
            shutdown_timeout_seconds=FLAGS.shutdown_timeout_seconds,
        )
    workdir = FLAGS.workdir or f"runs/{config.model}-{config.variant}"
    training.train_and_evaluate(config, workdir)


if __name__ == "__main__":
    app.run(main)
