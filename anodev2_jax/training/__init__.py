"""The training app: a config in, a trained and evaluated run directory out.

config.py        the config's checks; the model, seeds and optimizer it describes
steps.py         TrainState; train and eval steps, wrapped for seeds and devices once
checkpoints.py   orbax checkpoints, and the migration of older ones
metrics.py       metrics.jsonl, TensorBoard events, atomic JSON
evaluation.py    test-set evaluation and the results a run reports
loop.py          train_and_evaluate(config, workdir)
data.py          CIFAR-10 for training: the source dispatch, augmentation, epoch order
__main__.py      python -m anodev2_jax.training fetch-lossless: the lossless copy, once
sources.py       the copies of CIFAR-10 on disk (TFDS, the lossless package, the JPEG archive)
input_pipeline.py, seeds.py, parallel.py   how batches, seeds and devices are handled
protocol.py, reproduce.py, report.py, paper.py, figures.py   the paper's tables and figures
discretization.py, sweep.py   a trained run at other step counts and methods (evaluate.py)
"""

from anodev2_jax.training.checkpoints import checkpoint_manager, restore_checkpoint
from anodev2_jax.training.config import (
    check_config,
    data_seed,
    learning_rate_schedule,
    make_optimizer,
    model_from_config,
    run_config,
    seeds_of,
    train_draws,
)
from anodev2_jax.training.evaluation import evaluate, per_seed_results
from anodev2_jax.training.loop import train_and_evaluate
from anodev2_jax.training.metrics import (
    MetricsLog,
    NonFiniteLossError,
    read_metrics,
    write_json_atomic,
)
from anodev2_jax.training.steps import (
    TrainState,
    build_steps,
    compile_train_step,
    create_state,
    cross_entropy,
    loss_and_gradient,
    make_eval_step,
    make_train_step,
    state_step,
)

__all__ = [
    "MetricsLog",
    "NonFiniteLossError",
    "TrainState",
    "build_steps",
    "check_config",
    "checkpoint_manager",
    "compile_train_step",
    "create_state",
    "cross_entropy",
    "data_seed",
    "evaluate",
    "learning_rate_schedule",
    "loss_and_gradient",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "model_from_config",
    "per_seed_results",
    "read_metrics",
    "restore_checkpoint",
    "run_config",
    "seeds_of",
    "state_step",
    "train_and_evaluate",
    "train_draws",
    "write_json_atomic",
]
