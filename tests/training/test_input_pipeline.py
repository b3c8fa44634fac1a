"""The input pipelines: dispatch lengths, and the device pipeline against the host one in
train_and_evaluate (the same numbers, a bit-identical resume from mid-epoch, the NaN guard's
step, config errors). The device pipeline on several devices is in
tests/training/test_parallel.py."""

import itertools
import json
import os
import re
import signal

import numpy as np
import pytest
from conftest import tree_allclose, tree_relative_error
from test_training import restore, tiny_config

from anodev2_jax import training
from anodev2_jax.training import input_pipeline


def config(**overrides):
    """The tiny run with the CPU's own convolution, with which the device pipeline is
    bit-identical to the host one on XLA:CPU (see anodev2_jax.training.input_pipeline), logging
    every 4 steps: each 6-step epoch logs at its steps 4 and 6."""
    return tiny_config(conv_impl="cpu", log_every_steps=4, **overrides)


# Dispatches of 3, 1 and 2 steps in every epoch.
DEVICE = dict(input_pipeline="device", steps_per_dispatch=3)


def train_records(workdir):
    """The train records of metrics.jsonl without their timing."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [
        {k: v for k, v in r.items() if k != "images_per_sec"}
        for r in records
        if r["kind"] == "train"
    ]


@pytest.mark.parametrize(
    "offset,steps_per_epoch,log_every,per_dispatch,expected",
    [
        (0, 6, 4, 3, [3, 1, 2]),
        (3, 6, 4, 3, [3]),
        (0, 195, 20, 20, [20] * 9 + [15]),  # CIFAR-10 at batch 256, the default config
        (7, 20, 5, 1, [1] * 13),
    ],
)
def test_dispatches_end_at_every_log_boundary_and_the_epoch_end(
    offset, steps_per_epoch, log_every, per_dispatch, expected
):
    assert (
        input_pipeline.dispatch_lengths(offset, steps_per_epoch, log_every, per_dispatch)
        == expected
    )


def test_dispatch_lengths_tile_the_epoch_with_at_most_three_lengths():
    for offset, steps_per_epoch, log_every, per_dispatch in itertools.product(
        range(5), range(5, 23), range(1, 9), range(1, 9)
    ):
        if per_dispatch > log_every:
            continue
        lengths = input_pipeline.dispatch_lengths(offset, steps_per_epoch, log_every, per_dispatch)
        ends = set(offset + np.cumsum(lengths))
        assert max(ends) == steps_per_epoch and max(lengths) <= per_dispatch
        assert set(range(offset + log_every, steps_per_epoch, log_every)) <= ends
        assert len(set(lengths)) <= 3


def test_auto_is_the_host_pipeline_on_the_cpu():
    assert input_pipeline.resolve_pipeline("auto") == "host"
    with pytest.raises(ValueError, match="input_pipeline='tpu' is unknown"):
        input_pipeline.resolve_pipeline("tpu")


@pytest.fixture(scope="module")
def host_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("host")
    return workdir, training.train_and_evaluate(config(), workdir)


@pytest.fixture(scope="module")
def device_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("device")
    return workdir, training.train_and_evaluate(config(**DEVICE), workdir)


def test_the_device_pipeline_trains_bit_identically_to_the_host_pipeline(host_run, device_run):
    (host_dir, host), (device_dir, device) = host_run, device_run
    assert device["steps"] == host["steps"] == 12
    assert tree_allclose(restore(device_dir, config()), restore(host_dir, config()), rtol=0)
    records = train_records(device_dir)
    assert [r["step"] for r in records] == [4, 6, 10, 12]  # the host pipeline's log cadence
    assert records == train_records(host_dir)
    assert device["final_test_loss"] == host["final_test_loss"]


def test_a_device_run_stopped_mid_epoch_resumes_bit_identically(device_run, tmp_path, monkeypatch):
    """A SIGTERM during the first dispatch stops the run after it, at step 3 (mid-epoch,
    between log boundaries); the rerun resumes there and ends where the straight run does."""
    run = input_pipeline.DeviceInput.run

    def run_then_sigterm(self, state, order, start, num_steps):
        out = run(self, state, order, start, num_steps)
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(input_pipeline.DeviceInput, "run", run_then_sigterm)
    with pytest.raises(SystemExit, match="at step 3; checkpoint saved"):
        training.train_and_evaluate(config(**DEVICE), tmp_path)
    monkeypatch.undo()
    assert int(restore(tmp_path, config()).step) == 3
    training.train_and_evaluate(config(**DEVICE), tmp_path)
    straight_dir, straight = device_run
    assert tree_allclose(restore(tmp_path, config()), restore(straight_dir, config()), rtol=0)
    # The stop logs its 3 steps; the resumed epoch logs from there, as the host pipeline does.
    assert [r["step"] for r in train_records(tmp_path)] == [3, 6, 10, 12]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["final_test_loss"] == straight["final_test_loss"]


def test_the_nan_guard_names_the_step_inside_a_dispatch(tmp_path):
    """A diverging run stops naming the same step with either pipeline, a step that does not
    end its dispatch (dispatches end at steps 3, 4, 6, 9, 10, 12, ...)."""
    diverging = dict(learning_rate=1e30, warmup_epochs=0.0, num_epochs=3)
    steps = []
    for name, pipeline in (("host", {}), ("device", DEVICE)):
        with pytest.raises(training.NonFiniteLossError) as error:
            training.train_and_evaluate(config(**diverging, **pipeline), tmp_path / name)
        steps.append(int(re.search(r"at step (\d+); training stopped", str(error.value))[1]))
    assert steps[0] == steps[1]
    assert steps[1] % 6 not in (0, 3, 4)


def test_a_seeds_run_on_the_device_pipeline_equals_the_host_pipeline(tmp_path):
    """To float32 rounding, not bit for bit: with the two seeds' steps in one program inside
    the device pipeline's loop, XLA:CPU sums some of the seeds' BatchNorm and loss terms in
    another order (1e-5 apart after 6 steps, measured)."""
    seeds = dict(num_seeds=2, seed_batching="loop", num_epochs=1)
    runs = {}
    for name, pipeline in (("host", {}), ("device", dict(input_pipeline="device"))):
        training.train_and_evaluate(config(**seeds, **pipeline), tmp_path / name)
        runs[name] = restore(tmp_path / name, config(**seeds))
    assert runs["device"].step.shape == (2,)
    assert tree_relative_error(runs["device"], runs["host"]) <= 1e-4
    device, host = train_records(tmp_path / "device"), train_records(tmp_path / "host")
    assert [(r["step"], r["seed"]) for r in device] == [(r["step"], r["seed"]) for r in host]
    for d, h in zip(device, host, strict=True):
        np.testing.assert_allclose(d["loss"], h["loss"], rtol=1e-4)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(input_pipeline="gpu"), r"config.input_pipeline='gpu' is unknown; use one of \("),
        (dict(steps_per_dispatch=-1), r"config.steps_per_dispatch=-1 must be an integer from 1"),
        (
            dict(input_pipeline="device", steps_per_dispatch=5),
            r"steps_per_dispatch=5 must be an integer from 1 to config.log_every_steps=4",
        ),
        (
            dict(input_pipeline="host", steps_per_dispatch=2),
            r"steps_per_dispatch=2 is read by the device input pipeline only.*"
            "--config.input_pipeline=device",
        ),
    ],
)
def test_input_config_errors_name_the_field_before_compiling(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        training.train_and_evaluate(config(**overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
