"""The training app: configs to models, steps, checkpoints, metrics, the loop, data, seeds."""

from anodev2_jax.training.loop import *  # noqa: F403
from anodev2_jax.training.loop import _best_accuracies  # noqa: F401
