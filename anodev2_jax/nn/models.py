"""The paper's CIFAR-10 models (SPEC §5, paper Appendix C) as Flax linen modules.

AlexNet (residual), ResNet-4 and ResNet-10 for (B, 32, 32, 3) normalized images, 10 classes.
Each residual block ``z1 = post(z0 + f(z0; θ))`` is an :class:`ODEBlock`: with ``ode=None``
the plain block (the baseline), otherwise the coupled solve of SPEC §1-2 on [0, 1] by
:func:`anodev2_jax.coupled_solve`, the block's conv kernels being the evolved weights w.

The vector fields f are pure functions (``resnet_field``, ``alexnet_field``); a block passes
them its kernels as w, the evolution parameters as p and its BatchNorm scale/offset (and
AlexNet's conv bias) as args. In training each of a block's E = Nz·stages f evaluations is
normalized with its own batch moments, and each keeps its own running mean and variance
(batch_stats of shape (E, C), updated once per call from the forward pass); in evaluation,
evaluation k uses row k (SPEC §5, :mod:`anodev2_jax.nn.normalization`). Scale and offset are
shared by the evaluations (as in ANODE) or, with ``norm_params="per_evaluation"``, one per
evaluation.

Parameter counting (SPEC §5): BatchNorm scale and offset count, running statistics do not;
AlexNet's convs and every fc layer have biases, the ResNets' convs have none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anodev2_jax import coupling as coupling_lib
from anodev2_jax import evolution as evolution_lib
from anodev2_jax import solve as solve_lib
from anodev2_jax.cpu import native
from anodev2_jax.nn import conv as conv_lib
from anodev2_jax.nn import normalization as norm_lib
from anodev2_jax.nn.conv import conv2d
from anodev2_jax.nn.normalization import batch_norm

PyTree = Any
Array = jax.Array

MODELS = ("alexnet", "resnet4", "resnet10")
VARIANTS = ("baseline", "node", "anode", "anodev2_conf1", "anodev2_conf2")
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
# He-normal over fan_out (kh·kw·cout), as torch_ref.py initialises the blocks' convs.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


# -- the ODE settings of a block -------------------------------------------------------------------
# The exact gradients (equal to rounding) that gradient="auto" picks between per block.
EXACT_GRADIENTS = ("backprop", "dto")
GRADIENT_CHOICES = (*solve_lib.GRADIENTS, "auto")


@dataclasses.dataclass(frozen=True)
class ODEConfig:
    """How an ODE block solves z and w on [0, 1] (the arguments of ``coupled_solve``).

    ``num_w_steps=None`` means Nw = Nz. ``norm_params``: "shared" (one BatchNorm scale and
    offset for all of a block's f evaluations) or "per_evaluation" (one per evaluation);
    the running statistics are per evaluation either way. ``coupling``: θ from the weight
    trajectory, θ(t) = ∫_0^t K(t-τ) w(τ) dτ (eq. 2.3d): ``Dirac()`` (θ = w, the paper's
    experiments) or e.g. ``Exponential()`` (an extension beyond them; its parameters are
    learned with the block's). ``gradient``: "dto", "backprop" (both exact), "otd" (the
    adjoint) or "auto": per block, what ``block_gradients`` ((block name, "backprop" |
    "dto") pairs) says, "dto" for a block it does not name; the trainer fills it in from the
    compiled train step's memory (:mod:`anodev2_jax.gradients`). Validated on
    construction (``make_plan``, the coupling's grid), so a bad combination fails before any
    tracing.
    """

    num_z_steps: int = 2
    num_w_steps: int | None = None
    schedule: str | tuple[int, ...] = "conf1"
    method: str = "euler"
    gradient: str = "auto"
    evolution: evolution_lib.Evolution = dataclasses.field(default_factory=evolution_lib.Zero)
    norm_params: str = "shared"
    coupling: coupling_lib.Coupling = dataclasses.field(default_factory=coupling_lib.Dirac)
    block_gradients: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, str):
            object.__setattr__(self, "schedule", tuple(self.schedule))
        if self.norm_params not in norm_lib.NORM_PARAMS:
            raise ValueError(
                f"norm_params={self.norm_params!r} is unknown; use one of {norm_lib.NORM_PARAMS}"
            )
        if self.gradient not in GRADIENT_CHOICES:
            raise ValueError(
                f"gradient={self.gradient!r} is unknown; use one of {GRADIENT_CHOICES}"
            )
        object.__setattr__(self, "block_gradients", tuple(map(tuple, self.block_gradients)))
        for block, gradient in self.block_gradients:
            if gradient not in EXACT_GRADIENTS:
                raise ValueError(
                    f"block_gradients[{block!r}]={gradient!r}: an auto choice is one of "
                    f"{EXACT_GRADIENTS}"
                )
        if not isinstance(self.evolution, evolution_lib.Evolution):
            raise ValueError(
                f"evolution={self.evolution!r} is not an evolution operator; pass e.g. "
                "anodev2_jax.RDA() or anodev2_jax.Zero()"
            )
        if not isinstance(self.coupling, coupling_lib.Coupling):
            raise ValueError(
                f"coupling={self.coupling!r} is not a coupling; pass e.g. anodev2_jax.Dirac() "
                "(θ = w) or anodev2_jax.Exponential()"
            )
        self.coupling.check_grid(self.plan().num_w_steps)

    def gradient_of(self, block: str) -> str:
        """The gradient block ``block`` uses: ``gradient``, or with "auto" the choice in
        ``block_gradients`` (made by the trainer from the train step's memory,
        :mod:`anodev2_jax.gradients`), "dto" where none was made."""
        if self.gradient != "auto":
            return self.gradient
        return dict(self.block_gradients).get(block, "dto")

    def plan(self) -> solve_lib.Plan:
        """The validated step plan (raises ValueError naming the fix)."""
        return solve_lib.make_plan(self.num_z_steps, self.num_w_steps, self.schedule, self.method)


def variant_config(variant: str) -> ODEConfig | None:
    """The ODE blocks of a paper variant (SPEC §5); None for the baseline's plain blocks."""
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


# -- pooling ---------------------------------------------------------------------------------------
def max_pool(x: Array, size: int, impl: str = "xla") -> Array:
    """Max over non-overlapping size × size windows: (N, H, W, C) -> (N, H/size, W/size, C).

    A reshape and a max, not ``flax.linen.max_pool``: XLA:CPU runs the gradient of the latter
    (select-and-scatter) 3-15x slower. At exact ties the gradient is split among the tied
    elements rather than given to one. ``impl``: a conv impl (:data:`conv_lib.IMPLS`); with
    "cpu", "cpu_paired" or "auto" on the CPU the gradient is one pass of a C++ kernel
    (``csrc/max_pool.cc``), equal to XLA's (which makes several passes).
    """
    h, w = x.shape[1:3]
    if h % size or w % size:
        raise ValueError(f"max_pool window {size} does not divide the input's {h}x{w}")
    if native.applies(impl, x):
        return _max_pool_native(x, size)
    return _window_max(x, size)


def _window_max(x: Array, size: int) -> Array:
    n, h, w, c = x.shape
    return x.reshape(n, h // size, size, w // size, size, c).max(axis=(2, 4))


def _window_sum(x: Array, size: int) -> Array:
    n, h, w, c = x.shape
    return x.reshape(n, h // size, size, w // size, size, c).sum(axis=(2, 4))


def _upsample(y: Array, size: int) -> Array:
    """(N, Ho, Wo, C) -> (N, Ho·size, Wo·size, C), each value repeated over its window."""
    return jnp.repeat(jnp.repeat(y, size, axis=1), size, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_native(x: Array, size: int) -> Array:
    return _window_max(x, size)


def _max_pool_native_fwd(x: Array, size: int) -> tuple[Array, tuple[Array, Array]]:
    y = _window_max(x, size)
    return y, (x, y)


def _max_pool_native_bwd(size: int, residuals: tuple[Array, Array], g: Array) -> tuple[Array]:
    x, y = residuals
    return (_max_pool_grad(x, y, g, size),)


_max_pool_native.defvjp(_max_pool_native_fwd, _max_pool_native_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _max_pool_grad(x: Array, y: Array, g: Array, size: int) -> Array:
    """The max pool's dx by the C++ kernel; differentiable (reverse mode): linear in g, and
    piecewise constant in x and y (as XLA's reduce-max derivative)."""
    return native.max_pool_grad(x, y, g, size)


def _max_pool_grad_fwd(
    x: Array, y: Array, g: Array, size: int
) -> tuple[Array, tuple[Array, Array]]:
    return native.max_pool_grad(x, y, g, size), (x, y)


def _max_pool_grad_bwd(
    size: int, residuals: tuple[Array, Array], cotangent: Array
) -> tuple[Array, Array, Array]:
    x, y = residuals
    mask = (x == _upsample(y, size)).astype(x.dtype)
    dg = _window_sum(mask * cotangent, size) / _window_sum(mask, size)
    return jnp.zeros_like(x), jnp.zeros_like(y), dg


_max_pool_grad.defvjp(_max_pool_grad_fwd, _max_pool_grad_bwd)


# -- the blocks' vector fields f(z, θ, args) -> (dz/dt, moments) -----------------------------------
def resnet_field(
    z: Array, theta: PyTree, args: PyTree, *, train: bool, conv_impl: str = "xla"
) -> tuple[Array, PyTree]:
    """ResNet basic block field f(z) = BN2(conv2(ReLU(BN1(conv1(z))))), 3x3 convs, no bias.

    z: (N, H, W, C); theta: {"conv1", "conv2"} (3, 3, C, C) kernels; args: {"bn1", "bn2"}
    as :func:`batch_norm` takes them. The block's final ReLU acts after the solve.
    """
    norm = functools.partial(batch_norm, train=train, impl=conv_impl)
    h, bn1 = norm(conv2d(z, theta["conv1"], 1, 1, conv_impl), args["bn1"], relu=True)
    h, bn2 = norm(conv2d(h, theta["conv2"], 1, 1, conv_impl), args["bn2"])
    return h, {"bn1": bn1, "bn2": bn2}


def alexnet_field(
    z: Array, theta: PyTree, args: PyTree, *, train: bool, conv_impl: str = "xla"
) -> tuple[Array, PyTree]:
    """AlexNet's residual conv field f(z) = ReLU(BN(conv(z) + b)), 5x5 conv with bias b.

    z: (N, H, W, C); theta: {"conv"} (5, 5, C, C); args: {"bias": (C,), "bn": ...}.
    """
    h = conv2d(z, theta["conv"], 1, 2, conv_impl)
    h, bn = batch_norm(h, args["bn"], train, offset=args["bias"], relu=True, impl=conv_impl)
    return h, {"bn": bn}


@dataclasses.dataclass(frozen=True)
class _Field:
    fn: Callable[..., tuple[Array, PyTree]]
    kernel_size: int
    kernels: tuple[str, ...]
    norms: tuple[str, ...]
    conv_bias: bool
    post_relu: bool


_FIELDS = {
    "resnet": _Field(resnet_field, 3, ("conv1", "conv2"), ("bn1", "bn2"), False, True),
    "alexnet": _Field(alexnet_field, 5, ("conv",), ("bn",), True, False),
}


# -- layers ----------------------------------------------------------------------------------------
def _norm_variables(
    module: nn.Module,
    name: str,
    shape: tuple[int, ...],
    dtype: Any,
    stats_shape: tuple[int, ...] | None = None,
) -> tuple[Any, Any]:
    """BatchNorm params {"scale", "bias"} of ``shape`` and running stats {"mean", "var"} of
    ``stats_shape`` (default ``shape``): (C,), or (E, C) per evaluation of an ODE block."""
    stats_shape = shape if stats_shape is None else stats_shape
    params = module.param(
        name, lambda _: {"scale": jnp.ones(shape, dtype), "bias": jnp.zeros(shape, dtype)}
    )
    stats = module.variable(
        "batch_stats",
        name,
        lambda: {"mean": jnp.zeros(stats_shape, dtype), "var": jnp.ones(stats_shape, dtype)},
    )
    return params, stats


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
        norm, stats = _norm_variables(self, "bn", (self.features,), self.dtype)
        variables = norm if train else {**norm, **stats.value}
        y, moments = batch_norm(
            y, variables, train, offset=bias, relu=self.relu, impl=self.conv_impl
        )
        if train and not self.is_initializing():
            stats.value = norm_lib.fold_moments(stats.value, moments)
        return y


class ODEBlock(nn.Module):
    """A residual block with C channels in and out; an ODE block when ``ode`` is set.

    ``ode=None``: z1 = post(z0 + f(z0; w0)) (the plain residual block, the baseline).
    Otherwise: z1 = post(z(1)) of the coupled solve dz/dt = f(z, θ), dw/dt = q(w; p),
    θ = ∫_0^t K(t-τ) w(τ) dτ (θ = w for the default Dirac coupling).
    ``field``: "resnet" (basic block, post = ReLU) or "alexnet" (5x5 conv, post = identity).

    Variables: params {"w0": {kernel name: (k, k, C, C)}, "p": evolution parameters (absent
    when the evolution has none), "coupling": the time kernel's parameters (absent for Dirac),
    "bn1", "bn2" | "bn": {"scale", "bias"}, AlexNet's "bias"};
    batch_stats {"bn1", "bn2" | "bn": {"mean", "var"}}. BatchNorm variables are (C,) in the
    plain block; in an ODE block the running statistics are (E, C), one row per f
    evaluation (E = Nz·stages), and so are scale and offset with
    ``ode.norm_params="per_evaluation"``.
    """

    channels: int
    field: str = "resnet"
    ode: ODEConfig | None = None
    conv_impl: str = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: Array, train: bool) -> Array:
        """z: (N, H, W, C) -> (N, H, W, C)."""
        if self.field not in _FIELDS:
            raise ValueError(f"field={self.field!r} is unknown; use one of {tuple(_FIELDS)}")
        spec = _FIELDS[self.field]
        c, k = self.channels, spec.kernel_size
        if z.shape[-1] != c:
            raise ValueError(
                f"ODEBlock(channels={c}) got activations of shape {z.shape}; a residual block "
                "keeps its channel count, so pass channels=z.shape[-1]"
            )

        def init_kernels(key: Array) -> dict[str, Array]:
            keys = jax.random.split(key, len(spec.kernels))
            return {
                name: conv_init(kk, (k, k, c, c), self.dtype)
                for name, kk in zip(spec.kernels, keys, strict=True)
            }

        w0 = self.param("w0", init_kernels)
        norm_shape: tuple[int, ...] = (c,)
        stats_shape: tuple[int, ...] = (c,)
        if self.ode is not None:
            stats_shape = (self.ode.plan().num_evaluations, c)
            if self.ode.norm_params == "per_evaluation":
                norm_shape = stats_shape
        args: dict[str, Any] = {}
        stats = {}
        for name in spec.norms:
            norm, stats[name] = _norm_variables(self, name, norm_shape, self.dtype, stats_shape)
            args[name] = norm if train else {**norm, **stats[name].value}
        if spec.conv_bias:
            args["bias"] = self.param("bias", nn.initializers.zeros, (c,), self.dtype)

        def f(z: Array, theta: PyTree, args: PyTree, k: int = 0) -> tuple[Array, PyTree]:
            """The field at evaluation k, with that evaluation's BatchNorm variables."""
            if self.ode is not None:
                args = args | {name: norm_lib.at_evaluation(args[name], k) for name in spec.norms}
            return spec.fn(z, theta, args, train=train, conv_impl=self.conv_impl)

        if self.ode is None:
            dz, aux = f(z, w0, args)
            z1 = z + dz
            moments = {name: aux[name] for name in spec.norms}
        else:
            evolution = self.ode.evolution
            p = None
            if _has_params(evolution, w0):
                p = self.param("p", lambda key: evolution.init(w0, key))
            coupling = self.ode.coupling
            coupling_params = None
            if _has_params(coupling, w0):
                coupling_params = self.param("coupling", lambda key: coupling.init(w0, key))
            z1, auxs = solve_lib.coupled_solve(
                f,
                z,
                w0,
                p,
                args,
                evolution=evolution,
                coupling=coupling,
                coupling_params=coupling_params,
                num_z_steps=self.ode.num_z_steps,
                num_w_steps=self.ode.num_w_steps,
                schedule=self.ode.schedule,
                method=self.ode.method,
                gradient=self.ode.gradient_of(self.name or ""),
                has_aux=True,
                indexed=True,
            )
            moments = {
                name: norm_lib.stack_evaluations([a[name] for a in auxs]) for name in spec.norms
            }
        # The forward pass's moments only: DTO and OTD discard those of their backward passes.
        if train and not self.is_initializing():
            for name in spec.norms:
                stats[name].value = norm_lib.fold_moments(stats[name].value, moments[name])
        return jax.nn.relu(z1) if spec.post_relu else z1


@contextlib.contextmanager
def ode_block_replaced(z1: Array) -> Iterator[list[Array]]:
    """Cut a model at its ODE block: while active, an ODEBlock records its input z0 in the
    yielded list and returns post(z1) (its own final activation) instead of solving.

    A model's loss then reads J(params, z1) together with z0(params): stem, block and head
    apart, e.g. to run the KKT recursion on one block of a whole model.
    """
    block_inputs: list[Array] = []

    def replace(next_fun: Callable[..., Any], args: Any, kwargs: Any, context: Any) -> Any:
        module = context.module
        if isinstance(module, ODEBlock) and context.method_name == "__call__":
            block_inputs.append(args[0])
            return jax.nn.relu(z1) if _FIELDS[module.field].post_relu else z1
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(replace):
        yield block_inputs


def with_block_gradients(model: nn.Module, gradients: Mapping[str, str]) -> nn.Module:
    """``model`` with gradient "auto" resolved: block name -> "backprop" | "dto"."""
    ode = dataclasses.replace(model.ode, block_gradients=tuple(gradients.items()))
    return model.clone(ode=ode)


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


def _has_params(op: evolution_lib.Evolution | coupling_lib.Coupling, w0: PyTree) -> bool:
    shapes = jax.eval_shape(lambda key: op.init(w0, key), jax.random.key(0))
    return bool(jax.tree.leaves(shapes))


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
