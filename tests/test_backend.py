"""backend: every "auto" resolves from the backend in one module, and ANODEV2_CPU_SPEEDUPS=0
makes the library run as on a GPU or TPU, without the CPU package, to the same numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anodev2_jax import backend
from anodev2_jax.cpu import host_malloc, native
from anodev2_jax.nn import conv as conv_lib
from anodev2_jax.nn import normalization as norm_lib
from anodev2_jax.nn import pooling
from anodev2_jax.training import input_pipeline, seeds

PACKAGE = Path(__file__).parents[1] / "anodev2_jax"


@pytest.fixture
def speedups_off(monkeypatch):
    monkeypatch.setenv(backend.SPEEDUPS_VARIABLE, "0")


def test_only_backend_asks_for_the_default_backend():
    askers = [
        path.relative_to(PACKAGE).as_posix()
        for path in sorted(PACKAGE.rglob("*.py"))
        if "default_backend" in path.read_text(encoding="utf-8")
    ]
    assert askers == ["backend.py"]


def test_auto_resolves_to_the_cpu_speedups_on_the_cpu(monkeypatch):
    monkeypatch.delenv(backend.SPEEDUPS_VARIABLE, raising=False)
    assert jax.default_backend() == "cpu" and backend.cpu_speedups()
    assert backend.conv_impl("auto") == "cpu"
    assert seeds.resolve_batching("auto") == "loop"
    assert input_pipeline.resolve_pipeline("auto") == "host"
    assert backend.rda_transform("auto", 64) == "matrix"
    assert backend.rda_transform("auto", 81) == "fft"
    assert backend.runs_cpu_kernels("auto", jnp.float32) == native.available()
    assert not backend.runs_cpu_kernels("auto", jnp.int32)
    assert not backend.runs_cpu_kernels("xla", jnp.float32)


def test_auto_resolves_as_on_a_gpu_with_the_speedups_off(speedups_off):
    assert not backend.cpu_speedups()
    assert backend.conv_impl("auto") == "xla"
    assert seeds.resolve_batching("auto") == "vmap"
    assert input_pipeline.resolve_pipeline("auto") == "device"
    assert backend.rda_transform("auto", 9) == "fft"
    assert backend.cpu_malloc("auto") == "default"
    assert host_malloc.wants_tuning("auto") is False
    for impl in conv_lib.IMPLS:
        assert not backend.runs_cpu_kernels(impl, jnp.float32)
    # an explicit setting is itself
    assert backend.conv_impl("cpu") == "cpu"
    assert seeds.resolve_batching("loop") == "loop"
    assert input_pipeline.resolve_pipeline("host") == "host"
    assert backend.rda_transform("matrix", 81) == "matrix"
    assert backend.cpu_malloc("tuned") == "tuned"


def test_a_bad_switch_value_is_named(monkeypatch):
    monkeypatch.setenv(backend.SPEEDUPS_VARIABLE, "off")
    with pytest.raises(ValueError, match="ANODEV2_CPU_SPEEDUPS='off'; set it to 0"):
        backend.conv_impl("auto")


def test_will_run_on_cpu_follows_jax_platforms(monkeypatch):
    assert not backend.will_run_on_cpu("cuda,cpu")
    assert backend.will_run_on_cpu("cpu,cuda")
    assert backend.will_run_on_cpu() == (jax.default_backend() == "cpu")
    monkeypatch.delenv(backend.SPEEDUPS_VARIABLE, raising=False)
    assert backend.cpu_malloc("auto") == ("tuned" if backend.will_run_on_cpu() else "default")


def _ops_jaxpr(impl):
    """The jaxpr of the value and VJP of conv2d, training BatchNorm + ReLU and the max pool."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 16, 16)) / 12, jnp.float32)
    norm = {"scale": jnp.ones(16, jnp.float32), "bias": jnp.zeros(16, jnp.float32)}

    def ops(x, w):
        y = conv_lib.conv2d(x, w, 1, 1, impl)
        y, _ = norm_lib.batch_norm(y, norm, True, relu=True, impl=impl)
        return pooling.max_pool(y, 2, impl)

    def value_and_vjp(x, w):
        y, vjp = jax.vjp(ops, x, w)
        return y, vjp(y)

    return str(jax.make_jaxpr(value_and_vjp)(x, w))


def test_the_ops_take_the_xla_and_jnp_paths_with_the_speedups_off(monkeypatch):
    monkeypatch.delenv(backend.SPEEDUPS_VARIABLE, raising=False)
    if native.available():
        assert "ffi_call" in _ops_jaxpr("auto")
    monkeypatch.setenv(backend.SPEEDUPS_VARIABLE, "0")
    assert _ops_jaxpr("auto") == _ops_jaxpr("xla")
    assert "ffi_call" not in _ops_jaxpr("cpu")  # the CPU formulations, without C++ kernels


# Forward and gradient of a small ResNet-4 ANODEV2 (conf1, Nz = Nw = 2: C++ convolutions,
# BatchNorm and max pool, the RDA's DFT as a matrix with the speed-ups), float32.
MODEL_RUN = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from anodev2_jax.nn import models

model = models.create_model("resnet4", "anodev2_conf1", conv_impl="auto", num_z_steps=2)
x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
variables = model.init(jax.random.key(0), x, train=False)

@jax.jit
def run(params):
    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True,
                                mutable=["batch_stats"])
        return jnp.sum(jnp.sin(logits)), logits
    return jax.grad(loss, has_aux=True)(params)

grads, logits = run(variables["params"])
cpu_modules = sorted(m for m in sys.modules if m.startswith("anodev2_jax.cpu"))
flat = {jax.tree_util.keystr(k): np.asarray(v).tolist()
        for k, v in jax.tree_util.tree_leaves_with_path((logits, grads))}
print(json.dumps({"cpu_modules": cpu_modules, "values": flat}))
"""


def _run_model(speedups):
    env = {**os.environ, backend.SPEEDUPS_VARIABLE: speedups, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", MODEL_RUN], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(out.stdout.splitlines()[-1])


def test_a_model_without_the_speedups_equals_it_with_them():
    """With ANODEV2_CPU_SPEEDUPS=0 a model's forward pass and gradient import nothing of
    anodev2_jax.cpu and equal those with the speed-ups to float32 rounding."""
    off, on = _run_model("0"), _run_model("1")
    assert off["cpu_modules"] == []
    if native.available():
        assert "anodev2_jax.cpu.native" in on["cpu_modules"]
    assert off["values"].keys() == on["values"].keys()
    for name, value in on["values"].items():
        ours, theirs = np.asarray(value), np.asarray(off["values"][name])
        # relative to the leaf's magnitude, or absolute below 1: the RDA's rho gradient is a
        # sum of O(1) terms that nearly cancel (~1e-3), its rounding that of the terms
        scale = max(float(np.max(np.abs(theirs))), 1.0)
        assert float(np.max(np.abs(ours - theirs))) <= 1e-5 * scale, name
