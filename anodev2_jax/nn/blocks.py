"""The residual blocks of the models as ODE blocks (docs/math.md §1-2, §7), as Flax linen modules.

Each residual block ``z1 = post(z0 + f(z0; θ))`` is an :class:`ODEBlock`: with ``ode=None``
the plain block (the baseline), otherwise the coupled solve of docs/math.md §1-2 on [0, 1] by
:func:`anodev2_jax.coupled_solve`, the block's conv kernels being the evolved weights w, with
the settings of an :class:`ODEConfig`.

The vector fields f are pure functions (:func:`resnet_field`, :func:`alexnet_field`); a block
passes them its kernels as w, the evolution parameters as p and its BatchNorm scale/offset
(and AlexNet's conv bias) as args. In training each of a block's E = Nz·stages f evaluations
is normalized with its own batch moments, and each keeps its own running mean and variance
(batch_stats of shape (E, C), updated once per call from the forward pass); in evaluation,
evaluation k uses row k (docs/math.md §7, :mod:`anodev2_jax.nn.normalization`). Scale and offset are
shared by the evaluations (as in ANODE) or, with ``norm_params="per_evaluation"``, one per
evaluation.
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

from anodev2_jax import coupling as coupling_lib
from anodev2_jax import evolution as evolution_lib
from anodev2_jax import gradients as gradients_lib
from anodev2_jax import solve as solve_lib
from anodev2_jax.nn import normalization as norm_lib
from anodev2_jax.nn.conv import conv2d
from anodev2_jax.nn.normalization import batch_norm

PyTree = Any
Array = jax.Array

# He-normal over fan_out (kh·kw·cout), as torch_ref.py initialises the blocks' convs.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


# -- the ODE settings of a block -------------------------------------------------------------------
# The exact gradients (equal to rounding) that gradient="auto" picks between per block.
EXACT_GRADIENTS = ("backprop", "dto")
GRADIENT_CHOICES = (*gradients_lib.GRADIENTS, "auto")


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
    compiled train step's memory (:mod:`anodev2_jax.gradients`). ``norm_plan``: the plan
    whose f evaluations the per-evaluation BatchNorm rows belong to, when the block is solved
    at another (None: its own plan); its rows are then read at this solve's evaluation times,
    and its running statistics updated there from this solve's moments, by linear
    interpolation in t (:func:`anodev2_jax.nn.normalization.carry_matrix`). Validated on
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
    norm_plan: solve_lib.Plan | None = None

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
        if self.norm_plan is not None and not isinstance(self.norm_plan, solve_lib.Plan):
            raise ValueError(
                f"norm_plan={self.norm_plan!r} is not a plan; pass another ODEConfig's .plan()"
            )

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


# -- the block -------------------------------------------------------------------------------------
def norm_variables(
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
        read = write = None  # rows -> this solve's evaluations, and back
        if self.ode is not None:
            plan = self.ode.plan()
            rows = self.ode.norm_plan or plan
            stats_shape = (rows.num_evaluations, c)
            if self.ode.norm_params == "per_evaluation":
                norm_shape = stats_shape
            if rows != plan:
                read = norm_lib.carry_matrix(rows, plan)
                write = norm_lib.carry_matrix(plan, rows)
        args: dict[str, Any] = {}
        stats = {}
        for name in spec.norms:
            norm, stats[name] = norm_variables(self, name, norm_shape, self.dtype, stats_shape)
            norm = norm if train else {**norm, **stats[name].value}
            args[name] = norm_lib.carry_rows(norm, read)
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
            z1, auxs = _ode_solve(self, self.ode, f, z, w0, args)
            moments = {
                name: norm_lib.carry_rows(
                    norm_lib.stack_evaluations([a[name] for a in auxs]), write
                )
                for name in spec.norms
            }
        # The forward pass's moments only: DTO and OTD discard those of their backward passes.
        if train and not self.is_initializing():
            for name in spec.norms:
                stats[name].value = norm_lib.fold_moments(stats[name].value, moments[name])
        return jax.nn.relu(z1) if spec.post_relu else z1


def _ode_solve(
    block: ODEBlock,
    ode: ODEConfig,
    f: Callable[..., tuple[Array, PyTree]],
    z: Array,
    w0: PyTree,
    args: PyTree,
) -> tuple[Array, tuple[PyTree, ...]]:
    """z(1) of ``block``'s coupled solve from z and the aux of each f evaluation, creating
    the block's params "p" (the evolution's) and "coupling" (the time kernel's) where the
    operator has any."""
    evolution = ode.evolution
    p = None
    if _has_params(evolution, w0):
        p = block.param("p", lambda key: evolution.init(w0, key))
    coupling = ode.coupling
    coupling_params = None
    if _has_params(coupling, w0):
        coupling_params = block.param("coupling", lambda key: coupling.init(w0, key))
    z1, auxs = solve_lib.coupled_solve(
        f,
        z,
        w0,
        p,
        args,
        evolution=evolution,
        coupling=coupling,
        coupling_params=coupling_params,
        num_z_steps=ode.num_z_steps,
        num_w_steps=ode.num_w_steps,
        schedule=ode.schedule,
        method=ode.method,
        gradient=ode.gradient_of(block.name or ""),
        has_aux=True,
        indexed=True,
    )
    return z1, auxs


def _has_params(op: evolution_lib.Evolution | coupling_lib.Coupling, w0: PyTree) -> bool:
    shapes = jax.eval_shape(lambda key: op.init(w0, key), jax.random.key(0))
    return bool(jax.tree.leaves(shapes))


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
