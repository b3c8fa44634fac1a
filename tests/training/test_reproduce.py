"""The reproduction harness and the figures on tiny synthetic runs: cells, skip, resume, the
report recomputed from the cells, the protocols, bad input; Figure 4 from a num_seeds run."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
import tiny_protocol

from anodev2_jax import training
from anodev2_jax.nn import models
from anodev2_jax.training import figures, paper, reproduce, seeds
from configs import alexnet, resnet4, resnet10
from configs.protocols import alexnet as alexnet_protocol
from configs.protocols import cpu
from configs.protocols import paper as paper_protocol

ROOT = Path(__file__).parents[2]
MODEL_CONFIGS = {"alexnet": alexnet, "resnet4": resnet4, "resnet10": resnet10}


def model_configs():
    return {name: module.get_config() for name, module in MODEL_CONFIGS.items()}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """The tiny protocol, run once: 2 cells × 2 seeds. Returns (workdir, report, log lines)."""
    workdir = tmp_path_factory.mktemp("repro")
    lines: list[str] = []
    report = reproduce.run(
        tiny_protocol.get_config(), model_configs(), workdir, command="test", log=lines.append
    )
    return workdir, report, lines


def test_the_harness_trains_every_cell_and_shows_progress(harness):
    workdir, report, lines = harness
    assert report["cells_finished"] == 2
    for variant in ("baseline", "anodev2_conf1"):
        results = json.loads((workdir / f"resnet4-{variant}" / "results.json").read_text())
        assert results["seeds"] == [0, 1] and results["steps"] == 12
        assert results["config"]["num_epochs"] == 2
        assert results["config"]["lr_decay_epochs"] == pytest.approx([2 * 150 / 350, 2 * 300 / 350])
    assert lines[0].startswith("0/2 cells of protocol 'tiny' finished")
    assert "[0/2 done" in lines[1] and "ETA after the first cell" in lines[1]
    assert "[1/2 done" in lines[2] and "ETA 0:" in lines[2] and "per epoch measured" in lines[2]
    assert lines[-1].startswith("2/2 cells finished")


def _row(markdown: str, *cells: str) -> str:
    """The one table row of ``markdown`` that starts with these cells."""
    prefix = "| " + " | ".join(cells) + " |"
    rows = [line for line in markdown.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, (prefix, rows)
    return rows[0]


def _range(values: list[float]) -> str:
    values = [100 * v for v in values]
    return f"{min(values):.2f} / {max(values):.2f}, {np.mean(values):.2f}"


def test_the_report_is_recomputed_from_the_cells_results(harness):
    workdir, report, _ = harness
    markdown = (workdir / "results.md").read_text()
    assert json.loads((workdir / "results.json").read_text()) == json.loads(json.dumps(report))
    means = {}
    for variant, counts in (("baseline", (7706, 7706)), ("anodev2_conf1", (7714, 7970))):
        results = json.loads((workdir / f"resnet4-{variant}" / "results.json").read_text())
        runs = results["per_seed"]
        accuracy = [r["final_test_accuracy"] for r in runs]
        batch_statistics = [r["final_test_accuracy_batch_statistics"] for r in runs]
        means[variant] = 100 * np.mean(accuracy)
        low, high, mean = paper.ACCURACY[("resnet4", variant)]
        row = _row(markdown, "ResNet-4", variant, paper.TABLES[variant], "2", "2")
        assert f"| {_range(accuracy)} | {low:.2f} / {high:.2f}, {mean:.2f} |" in row
        assert row.endswith(f"| {_range(batch_statistics)} |")
        for r in runs:
            numbers = [
                f"{100 * r[name]:.2f}"
                for name in (
                    "final_test_accuracy",
                    "final_test_accuracy_batch_statistics",
                    "best_test_accuracy",
                )
            ]
            _row(markdown, "ResNet-4", variant, str(r["seed"]), *numbers)
        assert results["num_params"] == counts[0]
        params_row = _row(markdown, "ResNet-4", variant, f"{counts[0]:,}", f"{counts[1]:,}")
        assert f"{paper.PARAMS_K[('resnet4', variant)]:.2f}K" in params_row
    row = _row(markdown, "ResNet-4", "anodev2_conf1", "1", "2", "2")
    difference = f"{means['anodev2_conf1'] - means['baseline']:+.2f}".replace("-", "−")
    assert f"| {difference} | +1.16 |" in row  # ours and the paper's, minus the baselines
    worst = min(r["test_accuracy"] for r in report["cells"][1]["per_seed"])
    best = max(r["test_accuracy"] for r in report["cells"][0]["per_seed"])
    signed = [f"{value:+.2f}".replace("-", "−") for value in (worst - best, 77.27 - 77.35)]
    _row(markdown, "ResNet-4", "anodev2_conf1", *signed)  # worst seed minus best baseline seed
    for cell in report["cells"]:  # the logged training time: not zero, within the wall clock
        assert 0 < cell["training_time_sec"] <= cell["wall_time_sec"]
        assert _row(markdown, "ResNet-4", cell["variant"], "0").endswith(
            f"| {reproduce.duration(cell['training_time_sec'])} |"
        )
    assert "lr ÷10 at epochs 0.857143, 1.71429 of 2" in markdown


def test_finished_cells_are_skipped(harness, monkeypatch):
    workdir, report, _ = harness
    stamps = {p: p.stat().st_mtime_ns for p in workdir.glob("*/results.json")}
    monkeypatch.setattr(training, "train_and_evaluate", lambda *a: pytest.fail("trained"))
    lines: list[str] = []
    again = reproduce.run(
        tiny_protocol.get_config(), model_configs(), workdir, command="test", log=lines.append
    )
    assert lines[0] == f"2/2 cells of protocol 'tiny' finished in {workdir}; 0 to train"
    assert again["cells"] == report["cells"]
    assert stamps == {p: p.stat().st_mtime_ns for p in workdir.glob("*/results.json")}


def test_an_interrupted_cell_resumes_and_ends_where_the_straight_run_did(harness, tmp_path):
    """A cell killed after epoch 1 (a checkpoint, no results.json) trains epoch 2 only."""
    workdir = tmp_path / "repro"
    shutil.copytree(harness[0], workdir)
    cell = workdir / "resnet4-baseline"
    (cell / "results.json").unlink()
    shutil.rmtree(cell / "checkpoints" / "12")
    lines: list[str] = []
    reproduce.run(
        tiny_protocol.get_config(), model_configs(), workdir, command="test", log=lines.append
    )
    assert "resnet4-baseline: resuming" in lines[1]
    resumed = json.loads((cell / "results.json").read_text())
    straight = json.loads((harness[0] / "resnet4-baseline" / "results.json").read_text())
    assert resumed["per_seed"] == straight["per_seed"]  # resume is bit-identical
    lines = (cell / "metrics.jsonl").read_text().splitlines()
    assert sum('"kind": "test"' in line for line in lines) == 6  # epoch 2 logged twice
    curve, before = figures.accuracy_curve(cell), figures.accuracy_curve(harness[0] / cell.name)
    np.testing.assert_array_equal(curve.epochs, [1, 2])
    np.testing.assert_array_equal(curve.accuracy, before.accuracy)


def test_a_cell_made_with_another_config_stops_before_training(harness, monkeypatch):
    monkeypatch.setattr(training, "train_and_evaluate", lambda *a: pytest.fail("trained"))
    protocol = tiny_protocol.get_config()
    protocol.num_epochs = 3
    with pytest.raises(ValueError, match=r"resnet4-baseline .* num_epochs: 2 -> 3.*--workdir"):
        reproduce.run(protocol, model_configs(), harness[0], log=lambda line: None)


def test_the_committed_cpu_run_resumes_with_the_current_configs():
    """reproduction/cpu's cells were made by older code: a config field added since (a run
    mechanic such as input_pipeline) must not make them 'made with another config'."""
    cells = reproduce.make_cells(cpu.get_config(), model_configs(), ROOT / "reproduction" / "cpu")
    statuses = [reproduce.cell_status(cell) for cell in cells]  # raises for another config
    assert "finished" in statuses  # (the run grows; its first cell is done)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("models", ("resnet5",), r"protocol.models=\('resnet5',\) must be distinct names"),
        ("variants", (), r"protocol.variants=\(\) must be distinct"),
        ("num_seeds", 0, "protocol.num_seeds=0 must be a positive integer"),
        ("num_epochs", 0, "protocol.num_epochs=0 must be a positive integer"),
        ("training", ml_collections.ConfigDict({"lerning_rate": 0.1}), "lerning_rate=0.1"),
        ("training", ml_collections.ConfigDict({"num_seeds": 0}), "config.num_seeds=0"),
    ],
)
def test_bad_protocols_are_named_before_anything_runs(tmp_path, field, value, message):
    protocol = tiny_protocol.get_config()
    protocol[field] = value
    with pytest.raises(ValueError, match=message):
        reproduce.run(protocol, model_configs(), tmp_path, log=lambda line: None)
    assert not list(tmp_path.iterdir())


def test_the_protocols_load_and_validate():
    cells = reproduce.make_cells(cpu.get_config(), model_configs(), "runs/repro")
    assert [c.name for c in cells] == [f"resnet4-{v}" for v in models.VARIANTS]
    for cell in cells:
        config = cell.config
        assert (config.num_seeds, config.seed, config.num_epochs) == (3, 0, 15)
        assert config.lr_decay_epochs == pytest.approx((15 * 150 / 350, 15 * 300 / 350))
        assert (config.warmup_epochs, config.data_source, config.batch_size) == (
            1.0,
            "bundled",
            256,
        )
    cells = reproduce.make_cells(paper_protocol.get_config(), model_configs(), "runs/paper")
    assert len(cells) == 15
    for cell in cells:
        expected = (120, (40, 80, 100)) if cell.model == "alexnet" else (350, (150, 300))
        assert (cell.config.num_epochs, tuple(cell.config.lr_decay_epochs)) == expected
        assert cell.config.num_seeds == 5 and cell.config.data_source == "auto"
        # the node remedy (README): only node's cells clip the gradient
        assert cell.config.grad_clip_norm == (1.0 if cell.variant == "node" else None)
    cells = reproduce.make_cells(alexnet_protocol.get_config(), model_configs(), "runs/alexnet")
    assert [c.name for c in cells][:2] == ["alexnet-baseline", "alexnet-anodev2_conf1"]
    for cell in cells:  # the paper's AlexNet protocol, on the lossless copy
        config = cell.config
        assert (config.num_epochs, tuple(config.lr_decay_epochs)) == (120, (40, 80, 100))
        assert (config.batch_size, config.learning_rate, config.weight_decay) == (256, 0.1, 5e-4)
        assert (config.num_seeds, config.data_source) == (2, "lossless")


def test_the_command_rewrites_the_report_from_a_protocol_file(harness, tmp_path):
    """reproduce.py --report_only, with the tiny protocol given by its path."""
    workdir = tmp_path / "repro"
    shutil.copytree(harness[0], workdir)
    (workdir / "results.md").unlink()
    command = [
        sys.executable,
        "reproduce.py",
        "--protocol=tests/tiny_protocol.py",
        f"--workdir={workdir}",
        "--report_only",
        "--set=cpu_malloc=default",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2/2 cells of protocol 'tiny' finished" in result.stdout
    markdown = (workdir / "results.md").read_text()
    assert "Command: `python reproduce.py --protocol=tests/tiny_protocol.py" in markdown
    row = ("ResNet-4", "anodev2_conf1", "1", "2", "2")
    assert _row(markdown, *row) == _row((harness[0] / "results.md").read_text(), *row)


# -- figures ---------------------------------------------------------------------------------------
def test_figure_of_the_second_seed_of_a_conf1_cell(harness, tmp_path):
    cell = harness[0] / "resnet4-anodev2_conf1"
    evolution = figures.kernel_evolution(cell, seed_index=1)
    assert (evolution.seed, evolution.block, evolution.kernel) == (1, "layer1_1", "conv1")
    assert evolution.kernels.shape == (6, 3, 3)
    np.testing.assert_allclose(evolution.times, [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    config = training.run_config(cell)
    params = figures.restore_params(cell, config, 1)
    w0 = np.asarray(params["layer1_1"]["w0"]["conv1"])
    np.testing.assert_array_equal(evolution.kernels[0], w0[:, :, 0, 0])  # t = 0 is the trained w0
    p = params["layer1_1"]["p"]["conv1"]
    assert evolution.coefficients["d"] == pytest.approx(float(jax.nn.softplus(p["diffusion"])))
    assert evolution.coefficients["rho"] == pytest.approx(float(p["rho"]))
    other = figures.kernel_evolution(cell, seed_index=0)
    assert not np.allclose(other.kernels, evolution.kernels)  # seeds differ
    out = figures.save_figure(figures.plot_kernel_evolution(evolution), tmp_path / "figure4.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert "learned d = " in figures.caption(evolution) and "ρ = " in figures.caption(evolution)


def test_figures_command_writes_the_png(harness, tmp_path):
    """From a workdir relative to the working directory, as the README's command gives it."""
    out = tmp_path / "docs" / "figure4.png"
    command = [
        sys.executable,
        str(ROOT / "figures.py"),
        "--workdir=resnet4-anodev2_conf1",
        f"--out={out}",
        "--seed_index=1",
    ]
    result = subprocess.run(command, cwd=harness[0], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.stat().st_size > 5000 and "learned d = " in result.stdout


def test_accuracy_curves_end_at_the_cells_final_accuracies(harness):
    workdir = harness[0]
    curves = figures.accuracy_curves(workdir)
    assert [(c.model, c.variant) for c in curves] == [
        ("resnet4", "baseline"),
        ("resnet4", "anodev2_conf1"),
    ]
    for curve in curves:
        results = json.loads((workdir / f"resnet4-{curve.variant}" / "results.json").read_text())
        final = [100 * r["final_test_accuracy"] for r in results["per_seed"]]
        assert curve.seeds == [0, 1] and curve.accuracy.shape == (2, 2)
        np.testing.assert_allclose(curve.accuracy[:, -1], final, rtol=1e-12)
    png = (workdir / reproduce.ACCURACY_FIGURE).read_bytes()  # the harness drew it
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert f"]({reproduce.ACCURACY_FIGURE})" in (workdir / "results.md").read_text()


def test_figures_command_draws_the_accuracy_curves(harness, tmp_path):
    out = tmp_path / "curves.png"
    command = [sys.executable, "figures.py", "--figure=accuracy"]
    command += [f"--workdir={harness[0]}", f"--out={out}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.stat().st_size > 5000
    assert "resnet4-baseline, resnet4-anodev2_conf1" in result.stdout


@pytest.mark.parametrize(
    "cell,overrides,message",
    [
        ("resnet4-baseline", {}, "whose weights do not evolve"),
        ("resnet4-anodev2_conf1", {"seed_index": 2}, "num_seeds=2 .*use 0 … 1"),
        ("resnet4-anodev2_conf1", {"block": "conv1"}, r"use one of \['layer1_1'\]"),
        ("resnet4-anodev2_conf1", {"out_channel": 16}, "16 output channels"),
    ],
)
def test_figure_errors_name_the_fix(harness, cell, overrides, message):
    with pytest.raises(ValueError, match=message):
        figures.kernel_evolution(harness[0] / cell, **overrides)


def test_per_seed_results_read_single_seed_results_of_before():
    old = {"final_test_accuracy": 0.5, "best_test_accuracy": 0.6, "config": {"seed": 3}}
    assert training.per_seed_results(old) == [
        {"seed": 3, "final_test_accuracy": 0.5, "best_test_accuracy": 0.6}
    ]
    assert seeds.summary([0.25, 0.5, 0.75]) == {"min": 0.25, "max": 0.75, "mean": 0.5}
