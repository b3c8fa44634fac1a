"""The paper's CIFAR-10 models (paper Appendix C, Tables 5-6) as Flax linen modules.

AlexNet (residual), ResNet-4 and ResNet-10 for (B, 32, 32, 3) normalized images, 10 classes,
each with its residual blocks as :class:`anodev2_jax.nn.blocks.ODEBlock` (plain blocks for
the baseline, coupled solves for the paper's other variants, :data:`VARIANTS`), the layers
outside them as :class:`ConvBN` (and ResNet-10's :class:`DownBlock`). :func:`create_model`
builds one by name and variant.

Parameter counting (docs/math.md §7): BatchNorm scale and offset count, running statistics do not;
AlexNet's convs and every fc layer have biases, the ResNets' convs have none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anodev2_jax import evolution as evolution_lib
from anodev2_jax.nn import conv as conv_lib
from anodev2_jax.nn import normalization as norm_lib
from anodev2_jax.nn.blocks import ODEBlock, ODEConfig, conv_init, norm_variables
from anodev2_jax.nn.conv import conv2d
from anodev2_jax.nn.normalization import batch_norm
from anodev2_jax.nn.pooling import max_pool

PyTree = Any
Array = jax.Array

MODELS = ("alexnet", "resnet4", "resnet10")
VARIANTS = ("baseline", "node", "anode", "anodev2_conf1", "anodev2_conf2")
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)


def variant_config(variant: str) -> ODEConfig | None:
    """The ODE blocks of a paper variant (docs/math.md §2); None for the baseline's plain blocks."""
    if variant == "baseline":
        return None
    if variant == "node":  # Neural ODE: static θ, Nt = 2, adjoint gradient (Table 4)
        return ODEConfig(num_z_steps=2, gradient="otd", evolution=evolution_lib.Zero())
    if variant == "anode":  # ANODE: static θ, Nt = 2, an exact gradient (DTO in Table 4)
        return ODEConfig(num_z_steps=2, evolution=evolution_lib.Zero())
    if variant == "anodev2_conf1":  # Table 1: Nz = Nw = 5, θ_n = w_n
        return ODEConfig(num_z_steps=5, schedule="conf1", evolution=evolution_lib.RDA())
    if variant == "anodev2_conf2":  # Tables 2, 4: Nz = 2, Nw = 10, θ(0) then θ(1)
        return ODEConfig(
            num_z_steps=2, num_w_steps=10, schedule="conf2", evolution=evolution_lib.RDA()
        )
    raise ValueError(f"variant={variant!r} is unknown; use one of {VARIANTS}")


# -- layers ----------------------------------------------------------------------------------------
class ConvBN(nn.Module):
    """conv2d -> BatchNorm -> optional ReLU, for the layers outside the ODE blocks."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = False
    relu: bool = True
    conv_impl: str = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        k = self.kernel_size
        kernel = self.param("kernel", conv_init, (k, k, x.shape[-1], self.features), self.dtype)
        y = conv2d(x, kernel, self.stride, self.padding, self.conv_impl)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
        norm, stats = norm_variables(self, "bn", (self.features,), self.dtype)
        variables = norm if train else {**norm, **stats.value}
        y, moments = batch_norm(
            y, variables, train, offset=bias, relu=self.relu, impl=self.conv_impl
        )
        if train and not self.is_initializing():
            stats.value = norm_lib.fold_moments(stats.value, moments)
        return y


class DownBlock(nn.Module):
    """ResNet-10's layer2_1: ReLU(BN(conv3x3(ReLU(BN(conv3x3/2(x))))) + BN(conv1x1/2(x)))."""

    features: int
    conv_impl: str = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        """x: (N, H, W, Cin) -> (N, H/2, W/2, features)."""
        common = dict(features=self.features, conv_impl=self.conv_impl, dtype=self.dtype)
        h = ConvBN(kernel_size=3, stride=2, padding=1, name="conv1", **common)(x, train)
        h = ConvBN(kernel_size=3, padding=1, relu=False, name="conv2", **common)(h, train)
        shortcut = ConvBN(kernel_size=1, stride=2, relu=False, name="shortcut", **common)(x, train)
        return jax.nn.relu(h + shortcut)


def ode_block_inputs(model: nn.Module) -> dict[str, jax.ShapeDtypeStruct]:
    """The ODE blocks of ``model`` by name, in call order: the shape of each one's input z0
    for one image, (1, H, W, C) (no computation: traced with ``jax.eval_shape``)."""
    found: dict[str, jax.ShapeDtypeStruct] = {}

    def record(next_fun: Callable[..., Any], args: Any, kwargs: Any, context: Any) -> Any:
        module = context.module
        if (
            isinstance(module, ODEBlock)
            and module.ode is not None
            and context.method_name == "__call__"
        ):
            found[module.name or ""] = jax.ShapeDtypeStruct(args[0].shape, args[0].dtype)
        return next_fun(*args, **kwargs)

    dummy = jax.ShapeDtypeStruct((1, *IMAGE_SHAPE), model.dtype)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), dummy)
    return found


# -- the models ------------------------------------------------------------------------------------
def _check_images(x: Array, dtype: Any) -> Array:
    if jnp.ndim(x) != 4 or tuple(jnp.shape(x)[1:]) != IMAGE_SHAPE:
        raise ValueError(
            f"images of shape {jnp.shape(x)}; the CIFAR-10 models take (B, 32, 32, 3) NHWC"
        )
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(
            f"images of dtype {jnp.result_type(x)}; pass normalized float images "
            "(anodev2_jax.training.data.normalize)"
        )
    return jnp.asarray(x, dtype)


class _CifarModel(nn.Module):
    """Shared attributes: ``ode`` (None: the baseline), ``conv_impl``, ``dtype`` (of params
    and computation)."""

    ode: ODEConfig | None = None
    conv_impl: str = "xla"
    dtype: Any = jnp.float32

    def _common(self) -> dict[str, Any]:
        return dict(conv_impl=self.conv_impl, dtype=self.dtype)

    def _dense(self, features: int, name: str) -> nn.Dense:
        return nn.Dense(features, dtype=self.dtype, param_dtype=self.dtype, name=name)


class AlexNet(_CifarModel):
    """conv1 5x5 3→64, maxpool → 16x16, conv2 5x5 64→64 residual (the ODE block), maxpool →
    8x8, fc 4096→384→192→10 (paper Table 5). 1,756,682 parameters as a baseline."""

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        """x: (B, 32, 32, 3) normalized images -> (B, 10) logits."""
        x = _check_images(x, self.dtype)
        x = ConvBN(64, 5, padding=2, use_bias=True, name="conv1", **self._common())(x, train)
        x = max_pool(x, 2, self.conv_impl)
        x = ODEBlock(64, "alexnet", self.ode, name="conv2", **self._common())(x, train)
        x = max_pool(x, 2, self.conv_impl).reshape(x.shape[0], -1)
        x = jax.nn.relu(self._dense(384, "fc1")(x))
        x = jax.nn.relu(self._dense(192, "fc2")(x))
        return self._dense(NUM_CLASSES, "fc3")(x)


class ResNet4(_CifarModel):
    """conv1 3x3 3→16, one 16→16 basic block (the ODE block), maxpool 8/8 → 4x4x16,
    fc 256→10 (paper Table 6). 7,706 parameters as a baseline."""

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        """x: (B, 32, 32, 3) normalized images -> (B, 10) logits."""
        x = _check_images(x, self.dtype)
        x = ConvBN(16, 3, padding=1, name="conv1", **self._common())(x, train)
        x = ODEBlock(16, "resnet", self.ode, name="layer1_1", **self._common())(x, train)
        x = max_pool(x, 8, self.conv_impl).reshape(x.shape[0], -1)
        return self._dense(NUM_CLASSES, "fc")(x)


class ResNet10(_CifarModel):
    """conv1 3x3 3→16; layer1: two 16→16 ODE blocks; layer2: a 16→32 stride-2 block with a
    1x1-conv shortcut, then a 32→32 ODE block; maxpool 8/8 → 2x2x32, fc 128→10 (paper
    Table 6). 44,186 parameters as a baseline."""

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        """x: (B, 32, 32, 3) normalized images -> (B, 10) logits."""
        x = _check_images(x, self.dtype)
        x = ConvBN(16, 3, padding=1, name="conv1", **self._common())(x, train)
        x = ODEBlock(16, "resnet", self.ode, name="layer1_1", **self._common())(x, train)
        x = ODEBlock(16, "resnet", self.ode, name="layer1_2", **self._common())(x, train)
        x = DownBlock(32, name="layer2_1", **self._common())(x, train)
        x = ODEBlock(32, "resnet", self.ode, name="layer2_2", **self._common())(x, train)
        x = max_pool(x, 8, self.conv_impl).reshape(x.shape[0], -1)
        return self._dense(NUM_CLASSES, "fc")(x)


_MODEL_CLASSES: dict[str, type[_CifarModel]] = {
    "alexnet": AlexNet,
    "resnet4": ResNet4,
    "resnet10": ResNet10,
}
ODE_OVERRIDES = tuple(field.name for field in dataclasses.fields(ODEConfig))


def create_model(
    name: str,
    variant: str,
    *,
    conv_impl: str = "xla",
    dtype: Any = jnp.float32,
    **ode_overrides: Any,
) -> nn.Module:
    """The model ``name`` (one of MODELS) in the paper's ``variant`` (one of VARIANTS).

    ``ode_overrides``: any ODEConfig field (num_z_steps, num_w_steps, schedule, method,
    gradient, evolution, norm_params, coupling) replacing the variant's value, e.g.
    ``create_model("resnet4", "anode", num_z_steps=4, method="rk2")``.
    """
    if name not in _MODEL_CLASSES:
        raise ValueError(f"model {name!r} is unknown; use one of {MODELS}")
    if conv_impl not in conv_lib.IMPLS:
        raise ValueError(f"conv_impl={conv_impl!r} is unknown; use one of {conv_lib.IMPLS}")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"dtype={dtype!r}; the models run in float32 or float64")
    unknown = sorted(set(ode_overrides) - set(ODE_OVERRIDES))
    if unknown:
        raise ValueError(f"unknown model options {unknown}; the ODE options are {ODE_OVERRIDES}")
    ode = variant_config(variant)
    if ode is None and ode_overrides:
        raise ValueError(
            f"variant='baseline' has plain residual blocks and takes no ODE options (got "
            f"{sorted(ode_overrides)}); use an ODE variant, e.g. 'anode' (static θ) with "
            "num_z_steps=1 for the baseline's map as an ODE block"
        )
    if ode is not None:
        ode = dataclasses.replace(ode, **ode_overrides)
    return _MODEL_CLASSES[name](ode=ode, conv_impl=conv_impl, dtype=jnp.dtype(dtype))


def count_params(params: PyTree) -> int:
    """Number of scalars in a params pytree (arrays or ShapeDtypeStructs)."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
