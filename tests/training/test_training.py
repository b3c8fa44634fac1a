"""Training: outputs, bit-identical resume, signals, NaN stop, config errors, real data, and
several seeds in one program (config.num_seeds)."""

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tree_allclose, tree_relative_error

from anodev2_jax import training
from anodev2_jax.training import data, metrics, parallel, seeds
from configs import resnet4


def tiny_config(**overrides):
    config = resnet4.get_config()
    config.unlock()
    config.update(
        variant="anode",
        conv_impl="xla",
        data_source="synthetic",
        num_train=96,
        num_test=40,
        batch_size=16,
        eval_batch_size=32,  # 40 test images: the last batch is padded and masked
        num_epochs=2,
        log_every_steps=2,
        progress_bar=False,
        learning_rate=0.02,
        eval_batch_statistics=False,
    )
    config.update(overrides)
    return config.lock()


def restore(workdir: Path, config) -> training.TrainState:
    """The last checkpoint of ``workdir`` as a TrainState on the host."""
    model = training.model_from_config(config)
    optimizer = training.make_optimizer(config, config.num_train // config.batch_size)
    abstract = jax.eval_shape(lambda: training.create_state(model, optimizer, config))
    with training.checkpoint_manager(workdir / "checkpoints") as manager:
        return training.restore_checkpoint(manager, abstract)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    results = training.train_and_evaluate(tiny_config(eval_batch_statistics=True), workdir)
    return workdir, results


def test_a_run_writes_metrics_results_checkpoints_and_events(straight_run):
    workdir, results = straight_run
    assert json.loads((workdir / "results.json").read_text()) == json.loads(
        json.dumps(results, default=str)
    )
    assert results["steps"] == 12 and results["data_source"] == "synthetic"
    assert results["num_params"] == 7706
    assert 0.0 <= results["final_test_accuracy"] <= 1.0
    assert 0.0 <= results["final_test_accuracy_batch_statistics"] <= 1.0
    assert results["config"]["variant"] == "anode"
    assert results["gradients"] == {"layer1_1": "backprop"}  # gradient auto: fits easily
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "test"] == [1, 2]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]
    assert all(np.isfinite(r["loss"]) and r["images_per_sec"] > 0 for r in train)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["12", "6"]
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


def test_one_epoch_then_resume_is_bit_identical_to_two_straight(straight_run, tmp_path):
    straight_dir, _ = straight_run
    training.train_and_evaluate(tiny_config(num_epochs=1), tmp_path)
    training.train_and_evaluate(tiny_config(), tmp_path)
    straight, resumed = restore(straight_dir, tiny_config()), restore(tmp_path, tiny_config())
    # (the straight run's batch-statistics check at its end does not touch its state)
    assert int(resumed.step) == 12
    assert tree_allclose(resumed, straight, rtol=0, atol=0)


def test_sigterm_checkpoints_mid_epoch_and_the_rerun_resumes(straight_run, tmp_path):
    """A SIGTERM during epoch 1 saves a checkpoint at that step; rerunning finishes the run."""
    metrics = tmp_path / "metrics.jsonl"

    def send_sigterm_after_first_log():
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.exists() and metrics.read_text()):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_sigterm_after_first_log, daemon=True).start()
    with pytest.raises(SystemExit, match="Run the same command to resume"):
        training.train_and_evaluate(tiny_config(), tmp_path)
    stopped = int(restore(tmp_path, tiny_config()).step)
    assert 0 < stopped < 12
    training.train_and_evaluate(tiny_config(), tmp_path)
    straight = restore(straight_run[0], tiny_config())
    assert tree_allclose(restore(tmp_path, tiny_config()), straight, rtol=0, atol=0)


def test_read_metrics_keeps_the_later_of_repeated_records(tmp_path):
    """A resumed run re-logs the steps after its checkpoint; a killed one cuts a line short."""
    lines = [
        {"kind": "train", "step": 2, "seed": 0, "loss": 3.0},
        {"kind": "test", "step": 2, "seed": 0, "accuracy": 0.1},
        {"kind": "train", "step": 4, "seed": 0, "loss": 2.0},
        {"kind": "train", "step": 4, "seed": 0, "loss": 1.5},
        {"kind": "train", "step": 4, "seed": 1, "loss": 1.0},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(map(json.dumps, lines)) + '\n{"kind": "tr')
    assert training.read_metrics(path) == [lines[0], lines[1], lines[3], lines[4]]
    assert training.read_metrics(tmp_path / "absent.jsonl") == []


def test_training_time_sums_the_logged_windows_across_a_resumption():
    """Windows of 20, 20, 5 (stopped at 45) and 15 steps (resumed), 10 images per step."""
    records = [
        {"kind": "train", "step": step, "seed": seed, "images_per_sec": rate}
        for step, rate in ((20, 100.0), (40, 50.0), (45, 25.0), (60, 100.0))
        for seed in (0, 1)
    ] + [{"kind": "test", "step": 40, "seed": 0, "accuracy": 0.5}]
    expected = 20 * 10 / 100 + 20 * 10 / 50 + 5 * 10 / 25 + 15 * 10 / 100
    assert metrics.training_seconds(records[::-1], 10) == pytest.approx(expected)
    assert metrics.training_seconds([], 10) == 0.0


def test_non_finite_loss_stops_with_the_step_and_last_checkpoint(tmp_path):
    config = tiny_config(learning_rate=1e30, warmup_epochs=0.0, num_epochs=3)
    with pytest.raises(training.NonFiniteLossError, match=r"at step \d+; training stopped"):
        training.train_and_evaluate(config, tmp_path)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(model="resnet5"), "config.model='resnet5' is unknown"),
        (dict(variant="anodev3"), "config.variant='anodev3' is unknown"),
        (dict(data_source="imagenet"), "config.data_source='imagenet' is unknown"),
        (dict(variant="anodev2_conf2", num_z_steps=3), "needs num_z_steps=2"),
        (dict(variant="anodev2_conf1", method="rk2"), "multiple of 10"),
        (dict(batch_size=0), "config.batch_size=0 must be a positive integer"),
        (dict(batch_size=128), "config.batch_size=128 exceeds the 96 training images"),
        (dict(lr_decay_epochs=(3, 1)), "must be increasing"),
        (dict(dtype="bfloat16"), "config.dtype='bfloat16'"),
        (dict(cpu_malloc="fast"), "config.cpu_malloc='fast' is unknown"),
        (dict(norm_params="per_step"), "norm_params='per_step' is unknown"),
        (dict(grad_clip_norm=0.0), "config.grad_clip_norm=0.0 must be positive"),
        (dict(memory_budget_gb=-1.0), "config.memory_budget_gb=-1.0 must be positive"),
        (dict(gradient="exact"), "gradient='exact' is unknown"),
        (dict(variant="baseline", norm_params="per_evaluation"), "takes no ODE options"),
        (dict(kernel="gauss"), r"config.kernel='gauss' is unknown; use one of \('dirac'"),
        (dict(kernel="exponential", kernel_rate=0.0), "config.kernel_rate=0.0 must be"),
        (dict(kernel_rate=2.0), "kernel='dirac' has no rate; use --config.kernel=exponential"),
        (dict(train_num_z_steps=(0, 2)), r"train_num_z_steps=\(0, 2\) must be a tuple of pos"),
        (dict(variant="baseline", train_num_z_steps=(1, 2)), "variant='baseline' has none"),
    ],
)
def test_config_errors_name_the_field_before_compiling(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        training.train_and_evaluate(tiny_config(**overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


LEGACY_RUN = Path(__file__).parents[2] / "benchmarks" / "checkpoints" / "resnet4-anode-1epoch"


def test_a_checkpoint_with_shared_ode_statistics_is_converted_with_a_warning():
    """The committed ResNet-4 anode run predates per-evaluation statistics: (16,) per ODE
    BatchNorm where the model now keeps (2, 16); each row starts from the shared set."""
    import orbax.checkpoint as ocp

    config = tiny_config()
    with ocp.CheckpointManager(LEGACY_RUN.absolute() / "checkpoints") as manager:
        raw = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
    old = raw["batch_stats"]["layer1_1"]
    assert old["bn1"]["mean"].shape == (16,)
    with pytest.warns(UserWarning, match="one shared set of BatchNorm running statistics"):
        state = restore(LEGACY_RUN, config)
    new = state.batch_stats["layer1_1"]
    for name in ("bn1", "bn2"):
        for moment in ("mean", "var"):
            np.testing.assert_array_equal(new[name][moment], np.stack([old[name][moment]] * 2))
    np.testing.assert_array_equal(
        state.batch_stats["conv1"]["bn"]["mean"], raw["batch_stats"]["conv1"]["bn"]["mean"]
    )
    assert tree_allclose(state.params, raw["params"], rtol=0)


def test_a_checkpoint_of_another_model_is_refused_by_name():
    with pytest.raises(ValueError, match=r"written by a different config\.model"):
        restore(LEGACY_RUN, tiny_config(model="resnet10"))


def test_learning_rate_warms_up_then_decays():
    config = tiny_config(learning_rate=0.1, warmup_epochs=1.0, lr_decay_epochs=(2, 3))
    schedule = training.learning_rate_schedule(config, steps_per_epoch=10)
    np.testing.assert_allclose(
        [schedule(s) for s in (0, 5, 10, 19, 20, 30)], [0, 0.05, 0.1, 0.1, 0.01, 0.001], rtol=1e-6
    )


@pytest.mark.slow
def test_resnet4_baseline_learns_real_cifar10(tmp_path):
    """The bundled real CIFAR-10: a short schedule reaches ≥ 35 % on the 10,000 test images."""
    config = tiny_config(
        variant="baseline",
        data_source="bundled",
        num_train=None,
        num_test=None,
        batch_size=256,
        eval_batch_size=1000,
        num_epochs=1,
        learning_rate=0.1,
        warmup_epochs=1.0,
        lr_decay_epochs=(),
        log_every_steps=50,
    )
    start = time.time()
    results = training.train_and_evaluate(config, tmp_path)
    print(f"real CIFAR-10, ResNet-4 baseline, 1 epoch: {results['final_test_accuracy']:.4f} "
          f"test accuracy in {time.time() - start:.0f} s")  # fmt: skip
    assert results["data_source"] == "bundled-jpeg"
    assert results["final_test_accuracy"] >= 0.35


def test_grad_clip_norm_clips_the_loss_gradient_before_weight_decay():
    params = {"w": jnp.array([3.0, 4.0])}  # |grad| = 5 below
    config = tiny_config(grad_clip_norm=1.0, weight_decay=0.5, momentum=0.0, warmup_epochs=0.0)
    optimizer = training.make_optimizer(config, steps_per_epoch=10)
    updates, _ = optimizer.update({"w": jnp.array([3.0, 4.0])}, optimizer.init(params), params)
    # -lr·(grad/|grad| + weight_decay·w)
    np.testing.assert_allclose(
        updates["w"], -0.02 * (np.array([0.6, 0.8]) + 0.5 * np.array([3.0, 4.0])), rtol=1e-6
    )


def test_no_warmup_starts_at_the_full_learning_rate():
    schedule = training.learning_rate_schedule(tiny_config(warmup_epochs=0.0), steps_per_epoch=10)
    assert float(schedule(0)) == pytest.approx(0.02)


# -- several seeds in one program (config.num_seeds) -----------------------------------------------
def seeds_config(**overrides):
    return tiny_config(**{"num_seeds": 2, "seed_batching": "loop", **overrides})


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("seeds")
    config = seeds_config(eval_batch_statistics=True)
    return workdir, training.train_and_evaluate(config, workdir)


def test_a_seeds_run_writes_per_seed_metrics_results_and_tags(seeds_run):
    workdir, results = seeds_run
    assert results["seeds"] == [0, 1] and "final_test_accuracy" not in results
    assert results["num_params"] == 7706 and results["steps"] == 12
    per_seed = results["per_seed"]
    assert [r["seed"] for r in per_seed] == [0, 1]
    for name in ("final_test_accuracy", "final_test_accuracy_batch_statistics"):
        values = [r[name] for r in per_seed]
        assert results["summary"][name] == pytest.approx(
            {"min": min(values), "max": max(values), "mean": np.mean(values)}
        )
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for seed in (0, 1):
        train = [r for r in records if r["kind"] == "train" and r["seed"] == seed]
        test = [r for r in records if r["kind"] == "test" and r["seed"] == seed]
        assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]
        assert [r["epoch"] for r in test] == [1, 2]
        assert test[-1]["accuracy"] == per_seed[seed]["final_test_accuracy"]
    events = b"".join(p.read_bytes() for p in (workdir / "tensorboard").glob("events.*"))
    assert b"train/loss/seed_0" in events and b"test/accuracy/seed_1" in events
    state = restore(workdir, seeds_config())
    assert state.step.shape == (2,) and state.params["fc"]["kernel"].shape == (2, 256, 10)


def test_each_seed_of_a_seeds_run_is_the_separate_run_of_that_seed(
    straight_run, seeds_run, tmp_path
):
    """Seed 0 is the straight run; seed 1 is a run with seed=1 on the data order of seed 0."""
    config = tiny_config(seed=1, data_seed=0, eval_batch_statistics=True)
    seed1 = training.train_and_evaluate(config, tmp_path)
    separate = {0: straight_run, 1: (tmp_path, seed1)}
    together = restore(seeds_run[0], seeds_config())
    for index, (run_dir, results) in separate.items():
        alone = restore(run_dir, tiny_config(seed=index, data_seed=0))
        assert tree_relative_error(seeds.select(together, index), alone) <= 1e-5
        mine = seeds_run[1]["per_seed"][index]
        assert mine["final_test_accuracy"] == results["final_test_accuracy"]
        assert mine["final_test_accuracy_batch_statistics"] == pytest.approx(
            results["final_test_accuracy_batch_statistics"]
        )


def test_vmapped_seeds_equal_separate_steps_after_a_few_steps():
    """seed_batching="vmap" over 2 seeds equals two single-seed steps (float32, 3 steps; the
    loop is checked against separate runs above). Later steps can part further (measured:
    5e-2 after 7 steps): vmap changes how XLA fuses and rounds the float32 parts of a step,
    and training amplifies such differences."""
    config = seeds_config(seed_batching="vmap")
    dataset = data.synthetic_cifar10(96, 40, seed=0)
    model = training.model_from_config(config)
    optimizer = training.make_optimizer(config, steps_per_epoch=6)
    step = training.make_train_step(model, optimizer, jax.numpy.float32)
    # As train_and_evaluate jits them (the single step is then the straight run's program).
    mesh = parallel.make_mesh()
    jit = lambda fn: parallel.jit_data_parallel(fn, mesh, num_batch_args=2, donate_state=True)
    vmapped, single = jit(seeds.over_seeds(step, 2, "vmap")), jit(step)
    together = training.create_state(model, optimizer, config)
    alone = [seeds.select(together, i) for i in range(2)]
    for rows in data.epoch_batches(96, 16, 0, 0)[:3]:
        batch = (dataset.train_images[rows], dataset.train_labels[rows])
        together = vmapped(together, *batch)[0]
        alone = [single(state, *batch)[0] for state in alone]
    for i in range(2):
        assert tree_relative_error(seeds.select(together, i), alone[i]) <= 1e-5
    assert not tree_allclose(alone[0].params, alone[1].params, rtol=1e-3)  # the seeds differ


def test_a_seeds_run_resumes_bit_identically(seeds_run, tmp_path):
    config = lambda epochs: seeds_config(num_epochs=epochs, eval_batch_statistics=False)
    training.train_and_evaluate(config(1), tmp_path)
    training.train_and_evaluate(config(2), tmp_path)
    assert tree_allclose(restore(tmp_path, config(2)), restore(seeds_run[0], config(2)), rtol=0)


def test_resuming_with_another_num_seeds_names_it(straight_run, tmp_path):
    shutil.copytree(straight_run[0] / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(ValueError, match=r"num_seeds=2\).*resume it with that config"):
        training.train_and_evaluate(seeds_config(), tmp_path)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(num_seeds=0), "config.num_seeds=0 must be a positive integer"),
        (dict(seed_batching="pmap"), "config.seed_batching='pmap' is unknown"),
        (dict(seed=-1), "config.seed=-1 must be a non-negative integer"),
        (dict(lr_decay_epochs=(-1.0, 2.0)), "must hold epochs ≥ 0"),
    ],
)
def test_seed_and_schedule_errors_name_the_field(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        training.train_and_evaluate(tiny_config(**overrides), tmp_path)


def test_fractional_decay_epochs_fall_on_their_steps():
    """The CPU protocol's compressed schedule: ÷10 at 15·150/350 and 15·300/350 epochs."""
    config = tiny_config(learning_rate=0.1, warmup_epochs=1.0, lr_decay_epochs=(6.43, 12.86))
    schedule = training.learning_rate_schedule(config, steps_per_epoch=100)
    np.testing.assert_allclose(
        [schedule(s) for s in (642, 643, 1285, 1286)], [0.1, 0.01, 0.01, 0.001], rtol=1e-6
    )


def test_images_per_second_count_the_steps_until_their_metrics_arrive(tmp_path, monkeypatch):
    """Dispatches return before their steps end: a logged rate must include the wait for
    the metrics (here made 0.5 s per log boundary), not only the dispatching."""
    from anodev2_jax.training import input_pipeline

    fetch = input_pipeline.HostInput.fetch

    def slow_fetch(self, pending):
        time.sleep(0.5)
        return fetch(self, pending)

    monkeypatch.setattr(input_pipeline.HostInput, "fetch", slow_fetch)
    config = tiny_config(num_epochs=1, input_pipeline="host")
    training.train_and_evaluate(config, tmp_path)
    records = training.read_metrics(tmp_path / "metrics.jsonl")
    rates = [r["images_per_sec"] for r in records if r["kind"] == "train"]
    # each boundary logs 2 steps of 16 images after at least 0.5 s
    assert rates and max(rates) <= 2 * 16 / 0.5
