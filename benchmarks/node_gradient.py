"""Why the Neural ODE variant (``node``, OTD gradient) diverges: its gradient along its own run.

    .venv/bin/python -m benchmarks.node_gradient [--steps=400] [--every=20] [--grad_clip_norm=1]

Trains ResNet-4 ``node`` with the default config (the 5-epoch schedule of the BatchNorm issue,
bundled CIFAR-10, batch 256) and, every ``--every`` steps, computes on that step's batch both
the gradient the run uses (OTD, the Neural ODE adjoint) and the exact gradient of the same
discrete model (DTO, i.e. ``anode`` with the same parameters). Prints a markdown table: loss,
both gradient norms, their cosine and the relative error of OTD.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from anodev2_jax import training
from anodev2_jax.nn import models
from anodev2_jax.training import data as data_lib
from configs import resnet4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--grad_clip_norm", type=float, default=None)
    flags = parser.parse_args()

    config = resnet4.get_config().unlock()
    config.update(variant="node", num_epochs=5, lr_decay_epochs=(3, 4), data_source="bundled")
    config.grad_clip_norm = flags.grad_clip_norm
    dataset = data_lib.load_cifar10("bundled")
    steps_per_epoch = len(dataset.train_images) // config.batch_size
    node = training.model_from_config(config)
    anode = models.create_model("resnet4", "anode", conv_impl=config.conv_impl, gradient="dto")
    optimizer = training.make_optimizer(config, steps_per_epoch)
    state = training.create_state(node, optimizer, config)
    train_step = jax.jit(training.make_train_step(node, optimizer, jnp.float32))

    @functools.partial(jax.jit, static_argnames="model")
    def gradient(model, state, images, labels):
        """The train step's loss and its gradient (same augmentation) under ``model``."""
        (loss, _), grads = training.loss_and_gradient(model, state, images, labels, jnp.float32)
        return loss, grads

    print("$ " + shlex.join([sys.executable, "-m", "benchmarks.node_gradient", *sys.argv[1:]]))
    print("\n| step | lr | loss | ‖OTD‖ | ‖DTO‖ | cosine | ‖OTD − DTO‖ / ‖DTO‖ |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    schedule = training.learning_rate_schedule(config, steps_per_epoch)
    for step in range(flags.steps + 1):
        epoch, offset = divmod(step, steps_per_epoch)
        rows = data_lib.epoch_batches(len(dataset.train_images), config.batch_size, 0, epoch)
        batch = (dataset.train_images[rows[offset]], dataset.train_labels[rows[offset]])
        if step % flags.every == 0:
            loss, otd = gradient(node, state, *batch)
            _, dto = gradient(anode, state, *batch)
            dot = optax.tree.vdot(otd, dto)
            norms = [float(optax.tree.norm(g)) for g in (otd, dto)]
            error = float(optax.tree.norm(jax.tree.map(jnp.subtract, otd, dto))) / norms[1]
            print(
                f"| {step} | {float(schedule(step)):.3f} | {float(loss):.3f} | {norms[0]:.3g} | "
                f"{norms[1]:.3g} | {float(dot) / (norms[0] * norms[1]):.3f} | {error:.3f} |",
                flush=True,
            )
            if not np.isfinite(float(loss)):
                break
        state, _ = train_step(state, *batch)


if __name__ == "__main__":
    main()
