"""A trained run at other step counts, methods and weight grids: exact at the training
setting, statistics carried in time, recalibration, the sweep, evaluate.py and its errors."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tree_relative_error
from test_training import tiny_config

from anodev2_jax import solve as solve_lib
from anodev2_jax import training
from anodev2_jax.nn import normalization
from anodev2_jax.training import data
from anodev2_jax.training import discretization as disc
from anodev2_jax.training import sweep as sweep_lib

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def conf1_run(tmp_path_factory):
    """Two seeds of a tiny anodev2_conf1 run (Nz = Nw = 2), the CPU's own convolution."""
    workdir = tmp_path_factory.mktemp("conf1")
    config = tiny_config(
        variant="anodev2_conf1", num_z_steps=2, num_seeds=2, conv_impl="auto", num_epochs=1
    )
    return workdir, training.train_and_evaluate(config, workdir)


def test_the_training_setting_reproduces_the_recorded_accuracy_exactly(conf1_run):
    workdir, results = conf1_run
    evaluation = disc.evaluate_run(workdir)
    recorded = results["per_seed"]
    assert evaluation.accuracy == [r["final_test_accuracy"] for r in recorded]
    assert evaluation.loss == [r["final_test_loss"] for r in recorded]
    assert (evaluation.num_z_steps, evaluation.num_w_steps, evaluation.method) == (2, 2, "euler")


def test_carrying_to_the_training_plan_is_the_identity():
    plan = solve_lib.make_plan(5, 10, "conf1", "rk4")
    np.testing.assert_array_equal(normalization.carry_matrix(plan, plan), np.eye(20))
    rows = {"bn": {"mean": jnp.arange(60.0).reshape(3, 20, 1) / 7, "var": jnp.ones((3, 20, 1))}}
    assert disc.carry_statistics(rows, plan, plan, seed_axis=True) is rows
    # the same times and stages under another step count: the same rows, exactly
    coarse, fine = solve_lib.make_plan(2, 2, "conf1", "euler"), solve_lib.make_plan(4, 4)
    weights = normalization.carry_matrix(coarse, fine)
    np.testing.assert_array_equal(weights[[0, 2]], np.eye(2))


def test_recalibration_is_the_mean_of_the_batch_moments(conf1_run):
    """The stem's recalibrated statistics, against its convolution's output computed here."""
    workdir, _ = conf1_run
    run = disc.load_run(workdir)
    model = training.model_from_config(run.config)
    stats = disc.recalibrate(run, model, run.state, num_batches=2)
    order = data.epoch_batches(96, 16, run.config.seed, 0)
    moments = []
    for i in range(2):
        images = data.augment(jax.random.key(i), jnp.asarray(run.dataset.train_images[order[i]]))
        x = data.normalize(images)
        kernel = run.state.params["conv1"]["kernel"][1]  # seed 1
        y = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        moments.append((jnp.mean(y, (0, 1, 2)), jnp.var(y, (0, 1, 2))))
    mean, var = (np.mean([m[j] for m in moments], axis=0) for j in (0, 1))
    np.testing.assert_allclose(stats["conv1"]["bn"]["mean"][1], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["conv1"]["bn"]["var"][1], var, rtol=1e-4, atol=1e-5)
    assert stats["layer1_1"]["bn1"]["mean"].shape == (2, 2, 16)  # seeds, evaluations, channels
    recalibrated = disc.evaluate_setting(run, disc.Setting(4), "recalibrate", 2)
    assert all(0.0 <= a <= 1.0 for a in recalibrated.accuracy)


def test_flops_grow_by_one_field_evaluation_per_step(conf1_run):
    """XLA's count against a count by hand: each f evaluation of ResNet-4's block is two 3x3
    16->16 convolutions at 32x32 (XLA counts the multiply-adds inside the image only)."""
    run = disc.load_run(conf1_run[0])
    two, four = (disc.evaluate_setting(run, disc.Setting(n)).flops_per_image for n in (2, 4))
    inside = (30 * 3 + 2 * 2) ** 2  # taps of a 3x3 SAME window inside a 32x32 image
    per_evaluation = 2 * (2 * inside * 16 * 16)
    assert (four - two) / 2 == pytest.approx(per_evaluation, rel=0.05)


def test_the_sweep_writes_its_table_and_plot(conf1_run, tmp_path):
    run = disc.load_run(conf1_run[0])
    rows = sweep_lib.sweep(
        run, steps=(1, 2), methods=("euler", "rk2"), recalibration_batches=3, log=lambda _: None
    )
    evaluated = [r for r in rows if "skipped" not in r]
    assert len(evaluated) == 2 * 2 * 2 and not [r for r in rows if "skipped" in r]
    trained = [r for r in evaluated if r["trained"]]
    assert {(r["num_z_steps"], r["method"]) for r in trained} == {(2, "euler")}
    assert [r["num_w_steps"] for r in evaluated if r["method"] == "rk2"] == [2, 2, 4, 4]
    out = sweep_lib.write_sweep(rows, tmp_path / "sweep", sweep_lib.title_of(run), "test")
    table = (out / "sweep.md").read_text()
    assert "| 2* | 2 | euler | interpolate |" in table and (out / "sweep.png").stat().st_size
    assert sweep_lib.read_sweep(out)["rows"][0]["accuracy"] == evaluated[0]["accuracy"]
    both = sweep_lib.comparison_markdown({"a": rows, "b": rows[:4]}).splitlines()
    assert both[0] == "| method | Nz | a | b |" and len(both) == 2 + 4  # (euler, rk2) x (1, 2)
    assert both[3].startswith("| euler | 2 | ") and "*" in both[3] and both[-1].endswith("| – |")


def test_conf2_sweeps_nz_with_theta_0_then_theta_1_and_euler_only():
    config = tiny_config(variant="anodev2_conf2")
    overrides = disc.ode_overrides(config, disc.Setting(num_z_steps=4))
    assert overrides == {"num_z_steps": 4, "method": "euler", "schedule": (0, 0, 10, 10),
                         "num_w_steps": 10}  # fmt: skip
    assert disc.ode_overrides(config, disc.Setting(num_w_steps=20))["schedule"] == "conf2"
    with pytest.raises(ValueError, match=r"conf2 schedule cannot .* method='rk2'.*method='euler'"):
        disc.ode_overrides(config, disc.Setting(method="rk2"))


def test_bad_input_is_named_before_anything_compiles(conf1_run, tmp_path):
    workdir, _ = conf1_run
    with pytest.raises(ValueError, match="holds no checkpoint"):
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "config.json").write_text(json.dumps(tiny_config().to_dict()))
        disc.load_run(tmp_path / "run")
    with pytest.raises(ValueError, match="bn_statistics='mean' is unknown"):
        disc.evaluate_setting(disc.load_run(workdir), bn_statistics="mean")
    with pytest.raises(ValueError, match=r"recalibration_batches=50: .* 6 batches of 16"):
        disc.evaluate_setting(disc.load_run(workdir), bn_statistics="recalibrate")
    with pytest.raises(ValueError, match="no ODE blocks"):
        disc.ode_overrides(tiny_config(variant="baseline"), disc.Setting(4))


def test_evaluate_command_prints_the_recorded_accuracy_and_names_bad_flags(conf1_run):
    workdir, results = conf1_run
    command = [sys.executable, "evaluate.py", f"--workdir={workdir}"]
    proc = subprocess.run([*command, "--seed_index=2"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "--seed_index=2: the run has 2 seed(s)" in proc.stderr
    proc = subprocess.run([*command, "--seed_index=1"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    recorded = results["per_seed"][1]["final_test_accuracy"]
    assert proc.stdout.startswith(f"seed 1: test accuracy {recorded:.4f}, loss")
    assert "Nz=2 Nw=2 euler, BatchNorm statistics interpolate" in proc.stdout


def test_a_step_that_draws_its_step_count_solves_at_the_drawn_one():
    """A step of an anode run (rows on Nz = 2) that draws from (3,) moves the parameters as a
    plain Nz = 3 step does; its BatchNorm rows stay two."""
    config = tiny_config(num_z_steps=2, train_num_z_steps=(3,), warmup_epochs=0.0)
    plain_config = tiny_config(num_z_steps=3, warmup_epochs=0.0)
    optimizer = training.make_optimizer(config, 6)
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(16, dtype=np.int32) % 10
    states = []
    for c, draws in ((config, training.train_draws(config)), (plain_config, [])):
        model = training.model_from_config(c)
        step = jax.jit(training.make_train_step(model, optimizer, jnp.float32, draws))
        states.append(step(training.create_state(model, optimizer, c), images, labels))
    (drawn, metrics), (plain, _) = states
    assert float(metrics["num_z_steps"]) == 3
    before = training.create_state(training.model_from_config(config), optimizer, config)
    assert (
        tree_relative_error(drawn.params["layer1_1"]["w0"], before.params["layer1_1"]["w0"]) > 1e-3
    )
    assert tree_relative_error(drawn.params, plain.params) <= 1e-6
    assert drawn.batch_stats["layer1_1"]["bn1"]["mean"].shape == (2, 16)


def test_a_run_that_draws_step_counts_logs_them_and_evaluates_at_its_own(tmp_path):
    config = tiny_config(num_z_steps=2, train_num_z_steps=(1, 2, 3), num_epochs=1)
    results = training.train_and_evaluate(config, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    drawn = [r["num_z_steps"] for r in records if r["kind"] == "train"]
    assert drawn and all(1 <= n <= 3 for n in drawn)
    evaluation = disc.evaluate_run(tmp_path)
    assert evaluation.accuracy == [results["per_seed"][0]["final_test_accuracy"]]
    assert evaluation.num_z_steps == 2
