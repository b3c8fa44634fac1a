"""Data parallelism on forced CPU devices: 4 devices and 2 processes give the 1-device numbers.

The device count is fixed when JAX starts, so every run here is a subprocess: the 1-device
reference and the 2-process runs through train.py, the 4-device run through
tests/parallel_worker.py, which also reports the shardings its train step saw.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tree_relative_error

from anodev2_jax import training
from anodev2_jax.training import parallel
from configs import resnet4

ROOT = Path(__file__).resolve().parents[2]
# ResNet-4 ANODE, 4 steps of a global batch of 8: each of 4 devices holds 2 rows.
CONFIG = dict(
    variant="anode",
    conv_impl="xla",
    data_source="synthetic",
    num_train=32,
    num_test=8,
    batch_size=8,
    eval_batch_size=8,
    num_epochs=1,
    log_every_steps=2,
    progress_bar=False,
    learning_rate=0.02,
)
STEPS = 4
TIMEOUT = 180  # seconds for any one launch; JAX start-up and compiling take ~5-20 s each


def environment(num_devices: int, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        # The launches share compiled programs: on 2 cores compiling is most of their time.
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONPATH=str(ROOT),
    )
    return env


def train_command(workdir: Path, config: dict | None = None, **flags) -> list[str]:
    config = {**CONFIG, **(config or {})}
    return [
        sys.executable,
        str(ROOT / "train.py"),
        f"--config={ROOT / 'configs' / 'resnet4.py'}",
        *(f"--config.{name}={value}" for name, value in config.items()),
        f"--workdir={workdir}",
        *(f"--{name}={value}" for name, value in flags.items()),
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Launch:
    """Subprocesses with their output in log files; killed on exit if still running."""

    def __init__(self, logs: Path, cache: Path):
        self.logs, self.cache, self.processes, self.files = logs, cache, [], []
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, command: list[str], num_devices: int) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed in __exit__
        self.files.append(log)
        process = subprocess.Popen(
            command,
            env=environment(num_devices, self.cache),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        process.log_path = self.logs / f"{name}.log"
        self.processes.append(process)
        return process

    def start_processes(self, workdir: Path, config: dict | None = None, **flags) -> list:
        """Two processes of 2 devices each on 127.0.0.1, both running train.py."""
        address = f"127.0.0.1:{free_port()}"
        return [
            self.start(
                f"process{i}",
                train_command(
                    workdir,
                    config,
                    coordinator_address=address,
                    num_processes=2,
                    process_id=i,
                    **flags,
                ),
                num_devices=2,
            )
            for i in range(2)
        ]

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        for log in self.files:
            log.close()


def output(process: subprocess.Popen) -> str:
    return process.log_path.read_text()


def wait_all(processes: list, timeout: float = TIMEOUT) -> list[int]:
    deadline = time.time() + timeout
    return [p.wait(timeout=max(deadline - time.time(), 1)) for p in processes]


def wait_for_first_metrics(workdir: Path, processes: list) -> None:
    """Until process 0 has logged a train step, so every process is inside the training loop."""
    metrics, deadline = workdir / "metrics.jsonl", time.time() + TIMEOUT
    while not (metrics.exists() and metrics.read_text()):
        assert time.time() < deadline and all(p.poll() is None for p in processes), [
            output(p)[-3000:] for p in processes
        ]
        time.sleep(0.02)


def final_state(workdir: Path) -> training.TrainState:
    """The last checkpoint of ``workdir`` on this process's one device."""
    config = resnet4.get_config()
    config.unlock()
    config.update(CONFIG)
    model = training.model_from_config(config)
    optimizer = training.make_optimizer(config, CONFIG["num_train"] // CONFIG["batch_size"])
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        jax.eval_shape(lambda: training.create_state(model, optimizer, config)),
    )
    with ocp.CheckpointManager(workdir / "checkpoints") as manager:
        return manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(target))


def records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    """The 1-device reference, the 4-device worker and the 2-process run; all must exit 0."""
    root = tmp_path_factory.mktemp("parallel")
    with Launch(root / "logs", cache) as launch:
        # All at once: they overlap their start-up and their waits on each other.
        processes = launch.start_processes(root / "two_processes")
        reference = launch.start("one_device", train_command(root / "one_device"), 1)
        worker = launch.start(
            "four_devices",
            [
                sys.executable,
                str(ROOT / "tests" / "parallel_worker.py"),
                json.dumps(CONFIG),
                str(root / "four_devices"),
                str(root / "report.json"),
            ],
            4,
        )
        everything = [reference, worker, *processes]
        assert wait_all(everything) == [0] * 4, [output(p)[-3000:] for p in everything]
    return {
        "reference": root / "one_device",
        "four_devices": root / "four_devices" / "run",
        "report": json.loads((root / "report.json").read_text()),
        "two_processes": root / "two_processes",
        "process_outputs": [output(p) for p in processes],
    }


def assert_same_run(workdir: Path, reference: Path) -> None:
    """Final train state (float32) and every logged loss agree to 1e-5 relative."""
    state, expected = final_state(workdir), final_state(reference)
    assert int(state.step) == int(expected.step) == STEPS
    assert tree_relative_error(state, expected) <= 1e-5
    got, want = records(workdir), records(reference)
    assert [(r["step"], r["kind"]) for r in got] == [(r["step"], r["kind"]) for r in want]
    for name in ("loss", "grad_norm"):
        assert (
            tree_relative_error([r.get(name, 0.0) for r in got], [r.get(name, 0.0) for r in want])
            <= 1e-5
        ), name
    results = json.loads((workdir / "results.json").read_text())
    reference_results = json.loads((reference / "results.json").read_text())
    assert results["final_test_loss"] == pytest.approx(
        reference_results["final_test_loss"], rel=1e-5
    )
    assert results["final_test_accuracy"] == reference_results["final_test_accuracy"]


def test_four_devices_give_the_one_device_result(runs):
    assert runs["report"]["device_count"] == 4
    assert runs["report"]["results"]["devices"] == 4
    assert json.loads((runs["reference"] / "results.json").read_text())["devices"] == 1
    assert_same_run(runs["four_devices"], runs["reference"])


def test_the_train_and_eval_steps_see_a_sharded_batch_and_replicated_state(runs):
    for step in ("train_step", "eval_step"):
        seen = runs["report"][step]
        for batch in seen["batch"]:
            assert batch["spec"] == "P('data',)" and batch["num_devices"] == 4
            assert not batch["fully_replicated"]
            assert batch["shard_shape"][0] == 2
        assert all(rows == [2, 2, 2, 2] for rows in seen["batch_shard_rows"])
        placed = seen["state_in"] + seen["outputs"]
        assert all(x["fully_replicated"] and x["num_devices"] == 4 for x in placed)
    assert len(runs["report"]["train_step"]["state_in"]) > 10  # params, BN stats, momenta


def test_augmentation_does_not_depend_on_the_sharding(runs):
    """Same crops and flips on 1 and 4 devices; partitionable threefry draws rows locally."""
    augment = runs["report"]["augment"]
    assert runs["report"]["threefry_partitionable_default"] is True
    for partitionable in ("True", "False"):
        assert augment[partitionable]["changed_images"]
        assert augment[partitionable]["bit_equal"], partitionable
    assert augment["True"]["collectives"] == []
    assert augment["False"]["collectives"]  # the other setting gathers: the check can fail


def test_an_indivisible_batch_fails_before_compiling(runs):
    for name, value, suggestion in (
        ("batch_size", 10, "8 or 12"),
        ("eval_batch_size", 6, "4 or 8"),
    ):
        error = runs["report"][f"{name}_error"]
        assert error["message"].startswith(
            f"config.{name}={value} is the global batch and does not divide by the 4 devices"
        )
        assert f"--config.{name}={suggestion}" in error["message"]
        assert error["compile_events"] == []
        assert not error["workdir_created"]


def test_the_device_pipeline_gathers_locally_and_gives_the_one_device_result(tmp_path, cache):
    """input_pipeline=device on 2 devices and on 2 processes of 2 devices. With the training
    set replicated each device gathers its own rows of every batch, so the dispatch's only
    collectives are the train step's float all-reduces (a sharded training set adds an
    all-gather of the row indices and an all-reduce of the uint8 batch); each process places
    its columns of the epoch's order. Both runs equal the device pipeline's on one device.

    At lr 0.02 this tiny run diverges (loss 3 -> 19 in 8 steps) and amplifies the float32
    rounding differences between the compiled programs (measured: 8e-3 on a BatchNorm bias
    after 4 steps, with every logged loss within 1e-7); at lr 0.002 they stay within 7e-6."""
    device = dict(input_pipeline="device", learning_rate=0.002)
    with Launch(tmp_path / "logs", cache) as launch:
        processes = launch.start_processes(tmp_path / "two_processes", device)
        reference = launch.start("one_device", train_command(tmp_path / "one", device), 1)
        worker = launch.start(
            "two_devices",
            [
                sys.executable,
                str(ROOT / "tests" / "parallel_worker.py"),
                json.dumps({**CONFIG, **device}),
                str(tmp_path / "two"),
                str(tmp_path / "report.json"),
            ],
            2,
        )
        everything = [reference, worker, *processes]
        assert wait_all(everything) == [0] * 4, [output(p)[-3000:] for p in everything]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["results"]["devices"] == 2
    collectives = report["device_input_collectives"]
    assert {c["op"] for c in collectives} == {"all-reduce"}
    assert not [c for c in collectives if "u8[" in c["type"] or "s32[" in c["type"]]
    assert_same_run(tmp_path / "two" / "run", tmp_path / "one")
    assert_same_run(tmp_path / "two_processes", tmp_path / "one")


def test_two_processes_give_the_one_device_result_and_only_process_0_writes(runs):
    workdir = runs["two_processes"]
    assert_same_run(workdir, runs["reference"])
    results = json.loads((workdir / "results.json").read_text())
    assert (results["devices"], results["processes"]) == (4, 2)
    # One writer: no duplicated metrics lines (checked above), one event file, one printer.
    assert len(list((workdir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in workdir.iterdir()) == [
        "checkpoints",
        "metrics.jsonl",
        "results.json",
        "tensorboard",
    ]
    process0, process1 = runs["process_outputs"]
    assert "epoch 1: test loss" in process0
    assert "epoch 1: test loss" not in process1


def test_a_sigterm_to_one_process_stops_both_at_one_step_with_a_checkpoint(tmp_path, cache):
    with Launch(tmp_path / "logs", cache) as launch:
        processes = launch.start_processes(tmp_path, config=dict(num_epochs=100))
        wait_for_first_metrics(tmp_path, processes)
        processes[1].send_signal(signal.SIGTERM)
        assert wait_all(processes) == [1, 1]
    stops = [
        re.findall(r"Stopped by (.+) at step (\d+); .* to resume", output(p)) for p in processes
    ]
    assert stops[0][0][0] == "a signal to another process"
    assert stops[1][0][0] == f"signal {int(signal.SIGTERM)}"
    step = int(stops[0][0][1])
    assert int(stops[1][0][1]) == step and 0 < step < 100 * STEPS
    assert max(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == step


def test_a_dead_process_makes_the_other_exit_with_an_error(tmp_path, cache):
    """Process 1 is killed mid-run; process 0 stops once its heartbeats time out (5 s)."""
    with Launch(tmp_path / "logs", cache) as launch:
        processes = launch.start_processes(
            tmp_path, config=dict(num_epochs=100), heartbeat_timeout_seconds=5
        )
        wait_for_first_metrics(tmp_path, processes)
        processes[1].kill()
        killed = time.time()
        returncode = processes[0].wait(timeout=60)  # JAX's default heartbeat timeout is 100 s
        elapsed = time.time() - killed
    assert returncode != 0
    assert elapsed < 60


def test_process_slices_tile_every_global_batch_in_order():
    for count in (1, 2, 4):
        rows = [np.arange(24)[parallel.process_slice(24, i, count)] for i in range(count)]
        assert {len(r) for r in rows} == {24 // count}
        np.testing.assert_array_equal(np.concatenate(rows), np.arange(24))
