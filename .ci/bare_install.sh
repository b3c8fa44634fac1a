#!/usr/bin/env bash
# CI: the bare `pip install anodev2-jax` (no extras) is a working library.
#
# Installs the package, not editable and without extras, into a fresh venv in a temp dir
# (the repository's .venv and working tree are left alone: the build runs on a copy of the
# packaging inputs), then, from outside the repository:
#   - imports every module of anodev2_jax, anodev2_jax.nn and anodev2_jax.cpu;
#   - runs README.md's "`coupled_solve` in ten lines" snippet, extracted from README.md by
#     that heading (the first ```python block after it), so README and CI cannot drift;
#   - a small coupled_solve through an Exponential coupling, with its gradient;
#   - builds and applies create_model("resnet4", "anodev2_conf1") on a (2, 32, 32, 3) batch;
#   - checks that the C++ sources ship in the wheel and, with a compiler, that they build
#     (and oneDNN's calls, on Linux x86-64, where its wheels come with the install);
#   - checks that the train-only packages are not installed.
# Uses pip's own configuration (index, mirror, find-links), like the main install.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

tmp=$(mktemp -d "${TMPDIR:-/tmp}/anodev2-bare.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# setuptools writes build/ and *.egg-info next to pyproject.toml: build from a copy.
mkdir "$tmp/src"
tar -C "$repo" --exclude=__pycache__ --exclude='*.pyc' --exclude='*.so' \
  -cf - pyproject.toml README.md anodev2_jax | tar -C "$tmp/src" -xf -

start=$SECONDS
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q "$tmp/src"
echo "bare install: $((SECONDS - start)) s (venv + pip install ., no extras)"
"$tmp/venv/bin/pip" list --format=freeze | tr '\n' ' '
echo

cd "$tmp"  # so that `import anodev2_jax` finds the installed package, not the source tree
REPO="$repo" "$tmp/venv/bin/python" - <<'PY'
import importlib
import importlib.util
import os
import pkgutil
import re
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import anodev2_jax as ad

begin = time.perf_counter()
REPO = Path(os.environ["REPO"])
site = Path(sys.prefix).resolve()
assert Path(ad.__file__).resolve().is_relative_to(site), f"{ad.__file__} is not in {site}"

# Every library module imports without the training app's packages.
for package in ("anodev2_jax", "anodev2_jax.nn", "anodev2_jax.cpu"):
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__, package + "."):
        if info.name != "anodev2_jax.training":
            importlib.import_module(info.name)

# README.md's library snippet, as written.
heading = "## `coupled_solve` in ten lines"
text = (REPO / "README.md").read_text(encoding="utf-8")
assert heading in text, f"README.md has no section {heading!r}: update .ci/bare_install.sh"
snippet = re.search(r"```python\n(.*?)```", text.split(heading, 1)[1], re.S)
assert snippet, f"README.md's section {heading!r} has no ```python block"
namespace: dict = {}
exec(compile(snippet.group(1), "README.md", "exec"), namespace)
assert namespace["z1"].shape == (8, 32, 32, 16)
for grad in jax.tree.leaves(namespace["grads"]):
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


# A 3x3 kernel evolved by RDA, coupled through an exponential kernel to a tiny field.
def f(z, theta, args):
    dims = ("NHWC", "HWIO", "NHWC")
    return jnp.tanh(jax.lax.conv_general_dilated(z, theta, (1, 1), "SAME", dimension_numbers=dims))


z0 = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
w0 = 0.1 * jax.random.normal(jax.random.key(1), (3, 3, 4, 4))
evolution, kernel = ad.RDA(), ad.Exponential(init_rate=2.0)
p, c = evolution.init(w0), kernel.init(w0)


def loss(w0, p, c):
    z1 = ad.coupled_solve(
        f, z0, w0, p, evolution=evolution, coupling=kernel, coupling_params=c, num_z_steps=4
    )
    return jnp.sum(z1**2)


grads = jax.grad(loss, argnums=(0, 1, 2))(w0, p, c)
for grad in jax.tree.leaves(grads):
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)

# A model from anodev2_jax.nn (Flax), initialized and applied in train and eval mode.
from anodev2_jax.nn import models  # noqa: E402

model = models.create_model("resnet4", "anodev2_conf1", conv_impl="xla")
x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
variables = model.init(jax.random.key(3), x, train=False)
logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
assert model.apply(variables, x, train=False).shape == (2, 10)

# The C++ kernels' sources ship in the wheel, and build with the system compiler.
from anodev2_jax.cpu import native  # noqa: E402

repo_csrc = REPO / "anodev2_jax" / "cpu" / "csrc"
wheel_csrc = Path(native.__file__).parent / "csrc"
sources = {path.name for pattern in ("*.cc", "*.h") for path in repo_csrc.glob(pattern)}
missing = sorted(name for name in sources if not (wheel_csrc / name).is_file())
assert sources and not missing, f"the wheel lacks the C++ sources {missing} ({wheel_csrc})"
if os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++"):
    assert native.available(), "the C++ kernels did not build in the bare install"
    cpu_conv = models.create_model("resnet4", "anodev2_conf1", conv_impl="cpu")
    cpu_logits = cpu_conv.apply(variables, x, train=False)
    xla_logits = model.apply(variables, x, train=False)
    np.testing.assert_allclose(cpu_logits, xla_logits, rtol=1e-3, atol=1e-3)
    compiled = "C++ kernels built"
    if sys.platform == "linux" and os.uname().machine == "x86_64":  # where its wheels exist
        from anodev2_jax.cpu import onednn

        assert onednn.available(), "oneDNN's calls did not build in the bare install"
        alexnet = models.create_model("alexnet", "baseline", conv_impl="cpu")
        alex_vars = alexnet.init(jax.random.key(4), x, train=False)
        alex_xla = models.create_model("alexnet", "baseline", conv_impl="xla")
        np.testing.assert_allclose(
            alexnet.apply(alex_vars, x, train=False),
            alex_xla.apply(alex_vars, x, train=False),
            rtol=1e-3,
            atol=1e-3,
        )
        compiled += ", oneDNN's calls built"
else:
    compiled = "no C++ compiler: C++ kernels not built"

# The training app's packages (and the tests') stay out of the bare install. Not listed:
# optax, orbax-checkpoint and absl-py (flax depends on them), scipy (jax does). Should a new
# jax or flax release pull one of these in too, drop it from this list.
TRAIN_ONLY = (
    "tensorflow_datasets",
    "ml_collections",
    "tensorboardX",
    "matplotlib",
    "PIL",
    "tqdm",
    "diffrax",
    "pytest",
)
present = [name for name in TRAIN_ONLY if importlib.util.find_spec(name) is not None]
assert not present, f"the bare install has train/test-only packages: {present}"
for name in TRAIN_ONLY:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        continue
    raise AssertionError(f"import {name} worked in the bare install")

print(
    f"bare install OK: anodev2_jax {ad.__file__}, jax {jax.__version__}, {compiled}; "
    f"checks {time.perf_counter() - begin:.0f} s"
)
PY
