"""Training: outputs, bit-identical resume, signals, NaN stop, config errors, real data."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tree_allclose

from anodev2_jax import training
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
        (dict(variant="baseline", norm_params="per_evaluation"), "takes no ODE options"),
        (dict(kernel="gauss"), r"config.kernel='gauss' is unknown; use one of \('dirac'"),
        (dict(kernel="exponential", kernel_rate=0.0), "config.kernel_rate=0.0 must be"),
        (dict(kernel_rate=2.0), "kernel='dirac' has no rate; use --config.kernel=exponential"),
    ],
)
def test_config_errors_name_the_field_before_compiling(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        training.train_and_evaluate(tiny_config(**overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


LEGACY_RUN = Path(__file__).parents[1] / "benchmarks" / "checkpoints" / "resnet4-anode-1epoch"


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
    with pytest.raises(ValueError, match=r"written by a different config\.model or variant"):
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
