"""models: parameter counts, shapes, baseline == one-step ODE block, per-evaluation BatchNorm
running statistics (folded once per step, untouched by the gradient), node vs anode, DTO ==
backprop.

Everything runs eagerly at batch 2 (one jitted float32 training step), so the few primitive
shapes compile once; parameter counts use jax.eval_shape and compute nothing.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tree_allclose, tree_relative_error

from anodev2_jax import MLP, RDA, Dirac, DiracPlus, Exponential, Linear, Mixing, Zero
from anodev2_jax.nn import blocks, models
from anodev2_jax.nn import conv as conv_lib
from anodev2_jax.nn import normalization as norm_lib

F64 = jnp.float64

# Baselines are the paper's Table 3; ODE blocks with static θ add nothing; RDA adds four scalars per
# evolved kernel (ResNet-4: 2 kernels, ResNet-10: 6, AlexNet: 1).
PARAM_COUNTS = {
    "alexnet": (1_756_682, 1_756_682, 1_756_682, 1_756_686, 1_756_686),
    "resnet4": (7_706, 7_706, 7_706, 7_714, 7_714),
    "resnet10": (44_186, 44_186, 44_186, 44_210, 44_210),
}


def abstract_variables(model, dtype=jnp.float32, shape=(1, 32, 32, 3)):
    init = functools.partial(model.init, train=False)
    return jax.eval_shape(init, jax.random.key(0), jax.ShapeDtypeStruct(shape, dtype))


def normal(shape, seed, dtype=F64):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def images(dtype=F64):
    return normal((2, 32, 32, 3), 1, dtype)


def random_variables(model, seed, dtype=F64, shape=(1, 32, 32, 3)):
    """Variables of ``model`` drawn with NumPy (no compilation): He-scaled kernels, BatchNorm
    scales near 1, every other parameter (biases, RDA parameters) N(0, 0.3²), running
    means N(0, 0.3²) and variances in [0.5, 1.5], so that nothing sits at a special value."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        shape, name = leaf.shape, path[-1].key
        x = rng.standard_normal(shape)
        if name == "var":
            x = 0.5 + rng.random(shape)
        elif name == "scale":
            x = 1.0 + 0.1 * x
        elif len(shape) == 4:  # conv kernels (kh, kw, cin, cout)
            x = x * np.sqrt(2.0 / (shape[0] * shape[1] * shape[3]))
        elif name == "kernel":  # dense (in, out)
            x = x / np.sqrt(shape[0])
        else:
            x = 0.3 * x
        return jnp.asarray(x, dtype)

    return jax.tree.map_with_path(draw, abstract_variables(model, dtype, shape))


def train_loss(model, variables, x):
    """A loss of the logits with fixed random weights, returning the new batch_stats."""
    probe = normal((x.shape[0], 10), 9, x.dtype)

    def loss(params):
        logits, updates = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(probe * jnp.tanh(logits)), updates["batch_stats"]

    return loss


# -- parameter counts ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", models.MODELS)
def test_parameter_counts_of_every_model_and_variant(name):
    counts = []
    for variant in models.VARIANTS:
        variables = abstract_variables(models.create_model(name, variant))
        counts.append(models.count_params(variables["params"]))
    assert tuple(counts) == PARAM_COUNTS[name]


@pytest.mark.parametrize(
    "evolution, extra",
    [
        (RDA(per_channel=True), 2 * 4 * 16),
        (Linear(), 2 * 9 * 9),
        (MLP(hidden=4), 2 * (9 * 4 + 4 + 4 * 9 + 9)),
    ],
)
def test_other_evolutions_add_their_parameters_per_kernel(evolution, extra):
    model = models.create_model("resnet4", "anodev2_conf2", evolution=evolution)
    assert models.count_params(abstract_variables(model)["params"]) == 7_706 + extra


@pytest.mark.parametrize("coupling, extra", [(Dirac(), 0), (Exponential(), 1), (DiracPlus(), 2)])
def test_a_time_kernel_adds_its_parameters_and_they_train(coupling, extra):
    """θ = ∫ K(t-τ) w(τ) dτ: the kernel's parameters sit in the block's params as "coupling"
    and get a gradient from a jitted training step (conf2: θ_Nw mixes all of w_0..w_10)."""
    model = models.create_model("resnet4", "anodev2_conf2", coupling=coupling)
    assert models.count_params(abstract_variables(model)["params"]) == 7_714 + extra
    if not extra:
        return
    x = images(jnp.float32)
    variables = model.init(jax.random.key(0), x, train=False)
    step = jax.jit(jax.grad(train_loss(model, variables, x), has_aux=True))
    grads, _ = step(variables["params"])
    kernel_grads = jax.tree.leaves(grads["layer1_1"]["coupling"])
    assert len(kernel_grads) == extra and all(float(jnp.abs(g)) > 0 for g in kernel_grads)


def test_running_statistics_are_not_parameters_and_are_kept_per_evaluation():
    variables = abstract_variables(models.create_model("resnet10", "anodev2_conf1"))
    # mean and var of each channel: conv1 and layer2_1's 3 BatchNorms once, the 3 ODE blocks'
    # 2 BatchNorms once per f evaluation (Nz = 5, Euler)
    assert models.count_params(variables["batch_stats"]) == 2 * (
        16 + 3 * 32 + 5 * (2 * 16 + 2 * 16 + 2 * 32)
    )
    rk2 = abstract_variables(models.create_model("resnet4", "anode", method="rk2", num_w_steps=4))
    assert rk2["batch_stats"]["layer1_1"]["bn1"]["mean"].shape == (4, 16)  # Nz = 2, 2 stages


# Per-evaluation scale and offset add one BatchNorm (2·C) per extra evaluation and BatchNorm.
@pytest.mark.parametrize(
    "name, variant, extra",
    [
        ("resnet4", "anode", 1 * 2 * 2 * 16),
        ("resnet4", "anodev2_conf1", 4 * 2 * 2 * 16),
        ("resnet10", "anodev2_conf2", 1 * 2 * 2 * (16 + 16 + 32)),
        ("alexnet", "anodev2_conf1", 4 * 2 * 64),
    ],
)
def test_per_evaluation_norm_params_add_a_batch_norm_per_extra_evaluation(name, variant, extra):
    variant_index = models.VARIANTS.index(variant)
    model = models.create_model(name, variant, norm_params="per_evaluation")
    assert models.count_params(abstract_variables(model)["params"]) == (
        PARAM_COUNTS[name][variant_index] + extra
    )


# -- shapes, dtypes, validation --------------------------------------------------------------------
@pytest.mark.parametrize("name", models.MODELS)
def test_float32_logits_and_batch_stats_in_train_and_eval(name):
    model = models.create_model(name, "anodev2_conf2")
    x = images(jnp.float32)
    variables = random_variables(model, 0, jnp.float32)
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    new, old = updates["batch_stats"], variables["batch_stats"]
    assert jax.tree.structure(new) == jax.tree.structure(old)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new))
    # every running statistic moved
    leaves = zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True)
    assert all(np.all(a != b) for a, b in leaves)
    eval_logits = model.apply(variables, x, train=False)
    assert eval_logits.shape == (2, 10) and eval_logits.dtype == jnp.float32
    assert not tree_allclose(eval_logits, logits, rtol=1e-3)


def test_init_and_a_jitted_float32_training_step():
    model = models.create_model("resnet4", "anodev2_conf1")
    x = images(jnp.float32)
    variables = model.init(jax.random.key(0), x, train=False)
    block = variables["params"]["layer1_1"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    assert tree_allclose(block["bn1"], {"scale": jnp.ones(16), "bias": jnp.zeros(16)})
    assert tree_allclose(
        variables["batch_stats"]["layer1_1"]["bn2"],
        {"mean": jnp.zeros((5, 16)), "var": jnp.ones((5, 16))},
    )
    # He-normal over fan_out = 3·3·16 for the evolved kernels
    assert 0.8 < float(jnp.std(block["w0"]["conv1"]) * np.sqrt(144 / 2)) < 1.2
    step = jax.jit(jax.value_and_grad(train_loss(model, variables, x), has_aux=True))
    (loss, stats), grads = step(variables["params"])
    assert loss.dtype == jnp.float32 and np.isfinite(loss)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    assert jax.tree.structure(stats) == jax.tree.structure(variables["batch_stats"])
    # the RDA parameters of both kernels get a gradient
    assert all(float(jnp.abs(g)) > 0 for g in jax.tree.leaves(grads["layer1_1"]["p"]))


def test_conv_impl_reaches_every_convolution(monkeypatch):
    impls = []

    def recording_conv2d(x, w, stride=1, padding="SAME", impl="xla"):
        impls.append(impl)
        return conv_lib.conv2d(x, w, stride, padding, "xla")

    monkeypatch.setattr(models, "conv2d", recording_conv2d)  # ConvBN, DownBlock
    monkeypatch.setattr(blocks, "conv2d", recording_conv2d)  # the ODE blocks' fields
    abstract_variables(models.ResNet10(conv_impl="probe"))
    assert impls == ["probe"] * 10  # conv1, 2 × 2 in layer1, 3 in layer2_1, 2 in layer2_2


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (("vgg", "baseline"), {}, "model 'vgg' is unknown"),
        (("resnet4", "anodev3"), {}, "variant='anodev3' is unknown"),
        (("resnet4", "anode"), {"num_steps": 3}, "unknown model options"),
        (("resnet4", "baseline"), {"num_z_steps": 3}, "takes no ODE options"),
        (("resnet4", "anode"), {"gradient": "adjoint"}, "gradient='adjoint' is unknown"),
        (("resnet4", "anodev2_conf2"), {"num_z_steps": 3}, "schedule='conf2'"),
        (("resnet4", "anodev2_conf1"), {"method": "rk2"}, "not on the weight grid"),
        (("resnet4", "anode"), {"evolution": "rda"}, "not an evolution operator"),
        (("resnet4", "anode"), {"norm_params": "per_step"}, "norm_params='per_step' is unknown"),
        (("resnet4", "anode"), {"coupling": "exponential"}, "coupling='exponential' is not a"),
        (("resnet4", "anode"), {"coupling": Mixing(np.eye(6))}, r"pass a \(3, 3\) matrix"),
        (("resnet4", "anode"), {"conv_impl": "cudnn"}, "conv_impl='cudnn' is unknown"),
        (("resnet4", "anode"), {"dtype": jnp.float16}, "float32 or float64"),
    ],
)
def test_bad_model_options_are_named(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.create_model(*args, **kwargs)


def test_bad_inputs_are_named():
    model = models.create_model("resnet4", "baseline")
    with pytest.raises(ValueError, match=r"\(B, 32, 32, 3\)"):
        model.init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)), train=False)
    with pytest.raises(ValueError, match="normalized float images"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8), train=False)
    with pytest.raises(ValueError, match=r"pass channels=z\.shape"):
        abstract_variables(blocks.ODEBlock(4), shape=(1, 6, 6, 3))


def test_variant_configs_follow_the_paper():
    assert models.variant_config("baseline") is None
    node, anode = models.variant_config("node"), models.variant_config("anode")
    assert (node.num_z_steps, node.gradient, node.evolution) == (2, "otd", Zero())
    assert (anode.num_z_steps, anode.gradient, anode.evolution) == (2, "auto", Zero())
    conf1 = models.variant_config("anodev2_conf1").plan()
    conf2 = models.variant_config("anodev2_conf2").plan()
    assert conf1.stage_indices == ((0,), (1,), (2,), (3,), (4,)) and conf1.num_w_steps == 5
    assert conf2.stage_indices == ((0,), (10,)) and conf2.num_w_steps == 10


def test_auto_gradient_is_the_trainers_choice_per_block_and_dto_without_one():
    ode = models.variant_config("anodev2_conf1")
    assert ode.gradient == "auto" and ode.gradient_of("layer1_1") == "dto"
    chosen = dataclasses.replace(ode, block_gradients=[("layer1_1", "backprop")])
    assert chosen.block_gradients == (("layer1_1", "backprop"),)  # hashable for Flax
    assert chosen.gradient_of("layer1_1") == "backprop" and chosen.gradient_of("conv2") == "dto"
    fixed = dataclasses.replace(chosen, gradient="dto")
    assert fixed.gradient_of("layer1_1") == "dto"
    with pytest.raises(ValueError, match=r"block_gradients\['layer1_1'\]='otd'"):
        dataclasses.replace(ode, block_gradients=(("layer1_1", "otd"),))
    with pytest.raises(ValueError, match=r"gradient='fast' is unknown; use one of \('dto'"):
        dataclasses.replace(ode, gradient="fast")


def test_ode_block_inputs_name_every_ode_block_with_its_input_shape():
    shapes = {
        name: {
            block: s.shape
            for block, s in models.ode_block_inputs(models.create_model(name, "anode")).items()
        }
        for name in models.MODELS
    }
    assert shapes == {
        "alexnet": {"conv2": (1, 16, 16, 64)},
        "resnet4": {"layer1_1": (1, 32, 32, 16)},
        "resnet10": {
            "layer1_1": (1, 32, 32, 16),
            "layer1_2": (1, 32, 32, 16),
            "layer2_2": (1, 16, 16, 32),
        },
    }
    assert models.ode_block_inputs(models.create_model("resnet10", "baseline")) == {}


# -- the baseline is the one-step ODE block with static weights ------------------------------------
@pytest.mark.parametrize("name", models.MODELS)
def test_baseline_equals_one_step_ode_blocks_with_zero_evolution(name):
    baseline = models.create_model(name, "baseline", dtype=F64)
    ode = models.create_model(name, "anode", num_z_steps=1, dtype=F64)
    x = images()
    variables = random_variables(baseline, 2)
    # the one-step block keeps its statistics as one (1, C) row per BatchNorm, the plain (C,)
    abstract = abstract_variables(ode, F64)
    ode_variables = jax.tree.map(lambda x, a: x.reshape(a.shape), variables, abstract)
    out_b, stats_b = baseline.apply(variables, x, train=True, mutable=["batch_stats"])
    out_o, stats_o = ode.apply(ode_variables, x, train=True, mutable=["batch_stats"])
    stats_o = jax.tree.map(lambda x: x.reshape(-1), stats_o)
    assert tree_allclose((out_b, stats_b), (out_o, stats_o), rtol=1e-13, atol=1e-13)
    eval_b = baseline.apply(variables, x, train=False)
    eval_o = ode.apply(ode_variables, x, train=False)
    assert tree_allclose(eval_b, eval_o, rtol=1e-13, atol=1e-13)
    assert not tree_allclose(out_b, eval_b, rtol=1e-3)  # train and eval BatchNorm differ


# -- BatchNorm running statistics in an ODE block --------------------------------------------------
def reference_block(z, params, stats, num_steps, train):
    """ResNet basic-block ODE, Euler, static θ, written out in NumPy with lax convs.

    Returns ReLU(z_N) and, per BatchNorm, the list of (mean, var) of every evaluation."""

    def conv(x, w):
        return np.asarray(
            jax.lax.conv_general_dilated(
                x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        )

    def bn(x, name, n):
        if train:
            mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
        else:  # evaluation n's own running statistics
            mean, var = np.asarray(stats[name]["mean"][n]), np.asarray(stats[name]["var"][n])
        seen[name].append((mean, var))
        scale, bias = (np.asarray(params[name][v]) for v in ("scale", "bias"))
        if scale.ndim == 2:  # norm_params="per_evaluation"
            scale, bias = scale[n], bias[n]
        return (x - mean) / np.sqrt(var + 1e-5) * scale + bias

    seen = {"bn1": [], "bn2": []}
    z = np.asarray(z)
    for n in range(num_steps):
        h = np.maximum(bn(conv(z, params["w0"]["conv1"]), "bn1", n), 0.0)
        z = z + bn(conv(h, params["w0"]["conv2"]), "bn2", n) / num_steps
    return np.maximum(z, 0.0), seen


@pytest.mark.parametrize("gradient", ["dto", "otd", "backprop"])
def test_running_statistics_fold_each_evaluations_forward_moments_once_per_step(gradient):
    num_steps, momentum = 3, norm_lib.BN_MOMENTUM
    block = blocks.ODEBlock(
        3, "resnet", blocks.ODEConfig(num_z_steps=num_steps, gradient=gradient), dtype=F64
    )
    z = normal((2, 6, 6, 3), 4)
    variables = random_variables(block, 5, shape=z.shape)
    params, stats = variables["params"], variables["batch_stats"]

    out_ref, seen = reference_block(z, params, stats, num_steps, train=True)
    expected = {
        name: {
            "mean": momentum * stats[name]["mean"]
            + (1 - momentum) * np.stack([m for m, _ in seen[name]]),
            "var": momentum * stats[name]["var"]
            + (1 - momentum) * np.stack([v for _, v in seen[name]]),
        }
        for name in ("bn1", "bn2")
    }
    assert all(len(seen[name]) == num_steps for name in seen)

    out, forward_only = block.apply(variables, z, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out, out_ref, rtol=1e-12, atol=1e-12)
    assert tree_allclose(forward_only["batch_stats"], expected, rtol=1e-12)

    probe = normal(z.shape, 8)

    def loss(params):
        out, updates = block.apply(
            {"params": params, "batch_stats": stats}, z, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(probe * out), updates["batch_stats"]

    (_, with_grad), grads = jax.value_and_grad(loss, has_aux=True)(params)
    # the backward pass (recompute, adjoint) leaves the running statistics alone
    assert tree_allclose(with_grad, forward_only["batch_stats"], rtol=1e-12)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("norm_params", ["shared", "per_evaluation"])
def test_evaluation_n_normalizes_with_its_own_running_statistics(norm_params):
    ode = blocks.ODEConfig(num_z_steps=3, norm_params=norm_params)
    block = blocks.ODEBlock(3, "resnet", ode, dtype=F64)
    z = normal((2, 6, 6, 3), 4)
    variables = random_variables(block, 5, shape=z.shape)
    params, stats = variables["params"], variables["batch_stats"]
    out = block.apply(variables, z, train=False)
    out_ref, _ = reference_block(z, params, stats, 3, train=False)
    np.testing.assert_allclose(out, out_ref, rtol=1e-12, atol=1e-12)
    # and the rows matter: evaluation with every row replaced by the average differs
    averaged = jax.tree.map(lambda x: jnp.broadcast_to(x.mean(0), x.shape), stats)
    assert not np.allclose(block.apply({"params": params, "batch_stats": averaged}, z, False), out)


def test_per_evaluation_norm_params_in_training_equal_the_reference_and_get_gradients():
    ode = blocks.ODEConfig(num_z_steps=3, norm_params="per_evaluation")
    block = blocks.ODEBlock(3, "resnet", ode, dtype=F64)
    z = normal((2, 6, 6, 3), 4)
    variables = random_variables(block, 5, shape=z.shape)
    out, _ = block.apply(variables, z, train=True, mutable=["batch_stats"])
    out_ref, _ = reference_block(z, variables["params"], variables["batch_stats"], 3, train=True)
    np.testing.assert_allclose(out, out_ref, rtol=1e-12, atol=1e-12)

    def loss(params):
        out, _ = block.apply({**variables, "params": params}, z, True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(out))

    grads = jax.grad(loss)(variables["params"])
    for name in ("bn1", "bn2"):  # every evaluation's own scale and offset are trained
        assert all(np.all(np.abs(g).sum(axis=1) > 0) for g in grads[name].values())


# -- gradients -------------------------------------------------------------------------------------
def model_gradient(name, variant, x, variables, **overrides):
    model = models.create_model(name, variant, dtype=F64, **overrides)
    (_, stats), grads = jax.value_and_grad(train_loss(model, variables, x), has_aux=True)(
        variables["params"]
    )
    return model.apply(variables, x, train=True, mutable=["batch_stats"])[0], stats, grads


def test_node_and_anode_have_equal_outputs_and_different_gradients():
    x = images()
    variables = random_variables(models.create_model("resnet4", "anode", dtype=F64), 2)
    out_node, stats_node, g_node = model_gradient("resnet4", "node", x, variables)
    out_anode, stats_anode, g_anode = model_gradient("resnet4", "anode", x, variables)
    assert tree_allclose((out_node, stats_node), (out_anode, stats_anode), rtol=1e-13)
    # the Neural ODE adjoint is inexact at Nz = 2 (paper Table 4's "NeuralODE" row)
    block_node, block_anode = g_node["layer1_1"], g_anode["layer1_1"]
    assert tree_relative_error(block_node, block_anode) > 1e-2
    # layers after the block see the same activations, so their gradients agree
    assert tree_allclose(g_node["fc"], g_anode["fc"], rtol=1e-12)


@pytest.mark.gradients
def test_dto_gradient_equals_backprop_for_resnet4_conf1():
    x = images()
    model = models.create_model("resnet4", "anodev2_conf1", dtype=F64)
    # RDA parameters away from their zero start: diffusion, advection and reaction all act
    variables = random_variables(model, 2)
    _, stats_dto, g_dto = model_gradient("resnet4", "anodev2_conf1", x, variables)
    _, stats_bp, g_bp = model_gradient(
        "resnet4", "anodev2_conf1", x, variables, gradient="backprop"
    )
    assert tree_relative_error(g_dto, g_bp) < 1e-11
    assert tree_allclose(stats_dto, stats_bp, rtol=1e-13)
    assert all(float(jnp.abs(g)) > 1e-8 for g in jax.tree.leaves(g_dto["layer1_1"]["p"]))
