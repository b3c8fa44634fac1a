"""gradient="auto": the choice between backprop and DTO per ODE block from XLA's memory
figures, in isolation (a stand-in compile) and through the trainer's compiled step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tree_relative_error
from test_training import tiny_config

from anodev2_jax import gradients as gradient_choice
from anodev2_jax import training
from anodev2_jax.training import data, parallel

SIZES = {"a": 40, "b": 30, "c": 10}  # block -> bytes its backprop adds (largest first)


def stand_in_compile(calls):
    """A "compiled program" that is its own peak memory."""

    def compile_with(gradients):
        calls.append(dict(gradients))
        return 100 + sum(SIZES[b] for b, g in gradients.items() if g == "backprop")

    return compile_with


@pytest.mark.parametrize(
    "budget,gradients,compiles",
    [
        (1000, {"a": "backprop", "b": "backprop", "c": "backprop"}, 1),
        (145, {"a": "dto", "b": "backprop", "c": "backprop"}, 2),
        (115, {"a": "dto", "b": "dto", "c": "backprop"}, 3),
        (90, {"a": "dto", "b": "dto", "c": "dto"}, 4),  # over even with dto: the least memory
    ],
)
def test_choose_turns_the_largest_blocks_to_dto_until_the_step_fits(budget, gradients, compiles):
    calls: list[dict] = []
    choice = gradient_choice.choose(list(SIZES), stand_in_compile(calls), budget, measure=int)
    assert choice.gradients == gradients and len(calls) == compiles
    assert choice.compiled == choice.peak_bytes  # the last program compiled is the one kept
    assert choice.peak_bytes == 100 + sum(SIZES[b] for b, g in gradients.items() if g == "backprop")
    fits = "within" if choice.peak_bytes <= budget else "over (even with dto)"
    assert f"{fits} the budget" in choice.describe()


def test_peak_bytes_counts_a_donated_argument_once():
    x = jnp.zeros(1000, jnp.float32)
    kept = jax.jit(lambda x: 2 * x).lower(x).compile()
    donated = jax.jit(lambda x: 2 * x, donate_argnums=0).lower(x).compile()
    assert gradient_choice.peak_bytes(kept) >= 8000
    assert gradient_choice.peak_bytes(kept) - gradient_choice.peak_bytes(donated) == 4000


def test_the_default_budget_on_the_cpu_is_half_the_host_memory():
    with open("/proc/meminfo") as meminfo:
        total_kib = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
    budget = gradient_choice.default_budget_bytes() * jax.local_device_count()
    assert abs(budget - total_kib * 1024 // 2) < 1024**2


def test_the_trainer_runs_backprop_when_it_fits_and_dto_when_not(capsys):
    """The chosen programs are the steps training runs: equal to float32 rounding."""
    dataset = data.synthetic_cifar10(num_train=16, num_test=8)
    images, labels = dataset.train_images, dataset.train_labels
    mesh = parallel.make_mesh()
    steps = {}
    for budget, expected in ((None, "backprop"), (1e-6, "dto")):
        config = tiny_config(memory_budget_gb=budget)
        model = training.model_from_config(config)
        optimizer = training.make_optimizer(config, 6)
        state = parallel.replicate(training.create_state(model, optimizer, config), mesh)
        compiled, _, gradients = training.compile_train_step(config, model, optimizer, state, mesh)
        assert gradients == {"layer1_1": expected}
        steps[expected] = compiled(state, images, labels)
    out = capsys.readouterr().out
    assert "gradient auto: backprop in layer1_1" in out and "within the budget" in out
    assert "gradient auto: dto (recomputing) in layer1_1" in out and "over (even with dto)" in out
    (backprop, backprop_metrics), (dto, dto_metrics) = steps["backprop"], steps["dto"]
    # The first step's learning rate is 0 (warm-up): the momentum holds the gradient.
    assert tree_relative_error(backprop.opt_state, dto.opt_state) < 1e-5
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose(backprop_metrics[name], dto_metrics[name], rtol=1e-5)


def test_a_fixed_gradient_compiles_nothing_when_the_caller_runs_another_program():
    """The device input pipeline compiles its own multi-step program."""
    mesh = parallel.make_mesh()
    config = tiny_config(gradient="dto")
    model = training.model_from_config(config)
    optimizer = training.make_optimizer(config, 6)
    state = parallel.replicate(training.create_state(model, optimizer, config), mesh)
    compiled, resolved, gradients = training.compile_train_step(
        config, model, optimizer, state, mesh, needed=False
    )
    assert compiled is None and resolved is model and gradients == {"layer1_1": "dto"}
