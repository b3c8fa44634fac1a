"""Subprocess of tests/training/test_parallel.py: observations on forced CPU devices, then a run.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
        python tests/parallel_worker.py OVERRIDES_JSON WORKDIR REPORT_JSON

Builds configs/resnet4.py with the overrides, records what the test asserts (the shardings
the train step sees, augmentation on a sharded batch, the batch-size error and, with
input_pipeline=device, the collectives of the device pipeline's dispatch) and trains into
WORKDIR with train_and_evaluate. Writes the observations to REPORT_JSON; asserts nothing.
"""

import json
import sys
import types
from pathlib import Path

import jax
import numpy as np

from anodev2_jax import training
from anodev2_jax.training import data, input_pipeline, parallel
from configs import resnet4

COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def make_config(overrides: dict):
    config = resnet4.get_config()
    config.unlock()
    config.update(overrides)
    return config.lock()


def describe(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> dict:
    """What the test needs to know of one array's placement."""
    return {
        "spec": str(getattr(sharding, "spec", None)),
        "num_devices": len(sharding.device_set),
        "fully_replicated": sharding.is_fully_replicated,
        "shard_shape": list(sharding.shard_shape(shape)),
    }


class Recorded:
    """A jitted or compiled step that notes the placement of its first call's arguments in
    ``report[name]``; anything else (``memory_analysis``, ...) is the step's own."""

    def __init__(self, run, name: str, report: dict):
        self.run, self.name, self.report = run, name, report

    def __call__(self, state, *batch):
        if self.name in self.report:
            return self.run(state, *batch)
        self.report[self.name] = {
            "batch": [describe(x.sharding, x.shape) for x in batch],
            "batch_shard_rows": [[s.data.shape[0] for s in x.addressable_shards] for x in batch],
            "state_in": [describe(x.sharding, x.shape) for x in jax.tree.leaves(state)],
        }
        outputs = self.run(state, *batch)
        self.report[self.name]["outputs"] = [
            describe(x.sharding, x.shape) for x in jax.tree.leaves(outputs)
        ]
        return outputs

    def lower(self, *args):
        """training.compile_train_step compiles ahead of time: record the compiled step."""
        lowered = self.run.lower(*args)
        compile_recorded = lambda: Recorded(lowered.compile(), self.name, self.report)
        return types.SimpleNamespace(compile=compile_recorded)

    def __getattr__(self, attribute):
        return getattr(self.run, attribute)


def record_step_shardings(report: dict) -> None:
    """Make training's jitted steps note the placement of their first call's arguments."""
    original = parallel.jit_data_parallel

    def recording(step, mesh, num_batch_args, **kwargs):
        return Recorded(original(step, mesh, num_batch_args, **kwargs), step.__name__, report)

    parallel.jit_data_parallel = recording


def augmentation_on_meshes(partitionable: bool) -> dict:
    """Augment one batch on a 1-device and on the all-device mesh; bit-equal? collectives?"""
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    key = jax.random.key(3)
    outputs, hlo = [], ""
    with jax.threefry_partitionable(partitionable):
        for mesh in (parallel.make_mesh(jax.devices()[:1]), parallel.make_mesh()):
            augment = jax.jit(
                data.augment,
                in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                out_shardings=parallel.batch_sharded(mesh),
            )
            batch = jax.device_put(images, parallel.batch_sharded(mesh))
            compiled = augment.lower(key, batch).compile()
            outputs.append(np.asarray(compiled(key, batch)))
            hlo = compiled.as_text()
    return {
        "bit_equal": bool(np.array_equal(*outputs)),
        "changed_images": bool(not np.array_equal(outputs[1], images)),
        "collectives": [name for name in COLLECTIVES if name in hlo],
    }


def device_input_collectives(overrides: dict) -> list[dict]:
    """The collectives of the device input pipeline's compiled dispatch (the run's first
    length, compiled as the run compiles it, so the run finds it in the compilation cache):
    each one's op and result type."""
    config = make_config(overrides)
    seed = training.data_seed(config)
    dataset = data.synthetic_cifar10(config.num_train, config.num_test, seed=seed)
    steps_per_epoch = config.num_train // config.batch_size
    model = training.model_from_config(config)
    optimizer = training.make_optimizer(config, steps_per_epoch)
    mesh = parallel.make_mesh()
    feed = input_pipeline.DeviceInput(
        training.make_train_step(model, optimizer, jax.numpy.dtype(config.dtype)),
        dataset.train_images,
        dataset.train_labels,
        mesh,
        config.steps_per_dispatch or config.log_every_steps,
    )
    state = parallel.replicate(training.create_state(model, optimizer, config), mesh)
    order = feed.epoch(data.epoch_batches(config.num_train, config.batch_size, seed, 0))
    lowered = feed.multi_step(feed.steps_per_dispatch).lower(
        state, feed.images, feed.labels, order, np.int32(0)
    )
    found = []
    for line in lowered.compile().as_text().splitlines():
        for op in COLLECTIVES:
            if f" {op}(" in line or f" {op}-start(" in line:
                found.append({"op": op, "type": line.split(" = ", 1)[1].split(f" {op}")[0]})
    return found


def batch_size_error(overrides: dict, workdir: Path) -> dict:
    """train_and_evaluate with an indivisible batch: the message, and compile events before it."""
    events: list[str] = []
    on_duration = lambda event, duration, **kwargs: events.append(event)
    on_event = lambda event, **kwargs: events.append(event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    try:
        training.train_and_evaluate(make_config(overrides), workdir)
        message = None
    except ValueError as error:
        message = str(error)
    jax.monitoring.unregister_event_duration_listener(on_duration)
    jax.monitoring.unregister_event_listener(on_event)
    return {
        "message": message,
        # /jax/core/compile/* (tracing, lowering, compiling) and /jax/compilation_cache/*
        "compile_events": sorted({event for event in events if "compil" in event}),
        "workdir_created": workdir.exists(),
    }


def main(overrides_json: str, workdir: str, report_path: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    overrides = json.loads(overrides_json)
    report: dict = {
        "device_count": jax.device_count(),
        "threefry_partitionable_default": jax.config.jax_threefry_partitionable,
        "augment": {str(p): augmentation_on_meshes(p) for p in (True, False)},
        "batch_size_error": batch_size_error(
            {**overrides, "batch_size": 10}, Path(workdir) / "bad_batch"
        ),
        "eval_batch_size_error": batch_size_error(
            {**overrides, "eval_batch_size": 6}, Path(workdir) / "bad_eval_batch"
        ),
    }
    if overrides.get("input_pipeline") == "device":
        report["device_input_collectives"] = device_input_collectives(overrides)
    record_step_shardings(report)
    report["results"] = training.train_and_evaluate(make_config(overrides), Path(workdir) / "run")
    Path(report_path).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:])
