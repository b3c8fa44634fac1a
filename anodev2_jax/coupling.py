"""Couplings θ(t) = ∫_0^t K(t-τ) w(τ) dτ of the activations to the weight trajectory (eq. 2.3d).

On the weight grid t_m = m·δ, δ = 1/Nw, the coupling is a lower-triangular (causal) matrix κ:

    θ_j = Σ_{m ≤ j} κ_{j,m} w_m,   j = 0..Nw                                (2.3d, discrete)

and a stage of the z-solve whose schedule index is j (``Plan.stage_indices``) evaluates f at
θ_j. The schedule says *where* θ is read; the coupling says *what* θ is there.

- :class:`Dirac` (the default): K = δ, κ = I, θ_j = w_j, the paper's experiments. The solvers
  then index w_j directly (the one-hot fast path), so a solve with ``Dirac()`` is, bit for
  bit, the solve without a coupling.
- :class:`Mixing`: a user's fixed (Nw+1, Nw+1) matrix κ (validated: square, causal, finite).
- :class:`Kernel`: K(s) = a·δ(s) + k(s; c) for s ≥ 0, with learnable parameters c that
  ``coupled_solve`` differentiates like p. κ comes from the trapezoid rule on the weight grid,

      κ_{0,m} = a·[m = 0]                                     (the integral over [0, 0] is zero)
      κ_{j,m} = a·[m = j] + δ·ω_{j,m}·k((j - m)δ; c),  ω_{j,m} = 1/2 for m ∈ {0, j}, else 1,

  for 0 ≤ m ≤ j, j ≥ 1, which is second order in δ for smooth k and w. The Dirac part a·δ(s)
  sits at the end τ = t of the interval and counts in full (so a = 1, k = 0 is θ = w). A kernel
  without a Dirac part therefore gives **θ(0) = 0**: f's first evaluation sees zero weights.
  :class:`DiracPlus` (a·δ + a smooth part, θ(0) = a·w0) is the remedy. Ready kernels:
  :class:`Exponential` (K(s) = λ e^{-λs}, an exponential memory of the weight trajectory),
  :class:`DiracPlus`, and :class:`Smooth` (any callable k(s, c) of yours).

Interface (pure functions of pytrees, like the evolution operators):

- ``init(w, key=None) -> c``: parameters (None when there are none), in w's dtype;
- ``matrix(c, num_w_steps, count) -> κ``: the (count+1, count+1) weights for θ_0..θ_count;
- ``theta_trajectory(ws, c, num_w_steps) -> [θ_0, ..., θ_count]`` for ws = [w_0, ..., w_count];
- ``check(c, w, num_w_steps)``: raises ValueError, naming the value and the fix.

One coupling acts on every kernel leaf of w with the same κ (one λ per block, say).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Array = jax.Array

KERNELS = ("dirac", "exponential", "dirac+exponential")


@jax.jit
def mix(kappa: Array, ws: list[PyTree]) -> list[PyTree]:
    """[Σ_m κ_{j,m} ws[m] for j] leaf by leaf; κ: (len(ws), len(ws)). Jitted, so that an eager
    call compiles once."""

    def mix_leaf(*leaves: Array) -> Array:  # (count+1, ...) stacked w_m -> stacked θ_j
        return jnp.tensordot(kappa.astype(leaves[0].dtype), jnp.stack(leaves), axes=1)

    stacked = jax.tree.map(mix_leaf, *ws)
    return [jax.tree.map(lambda x, j=j: x[j], stacked) for j in range(len(ws))]


def _dtype_of(w: PyTree) -> Any:
    leaves = jax.tree.leaves(w)
    return jnp.result_type(leaves[0]) if leaves else jnp.result_type(float)


def _softplus_inverse(x: float) -> float:
    return float(np.log(np.expm1(x)))


def _check_positive(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0 < float(value) < np.inf
    ):
        raise ValueError(f"{name}={value!r} must be a positive finite number")


# -- the base class and the one-hot couplings ------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Coupling:
    """θ_j = Σ_{m ≤ j} κ_{j,m} w_m (eq. 2.3d on the weight grid); subclasses give κ."""

    #: κ = I: θ_j is w_j itself, and the solvers index ws[j] instead of mixing.
    one_hot: ClassVar[bool] = False

    def init(self, w: PyTree, key: Array | None = None) -> PyTree:
        """Parameters c of the coupling, in w's dtype; None when it has none."""
        return None

    def matrix(self, c: PyTree, num_w_steps: int, count: int) -> Array:
        """κ: (count+1, count+1), lower triangular; row j holds θ_j's weights of w_0..w_count."""
        raise NotImplementedError

    def theta_trajectory(self, ws: Sequence[PyTree], c: PyTree, num_w_steps: int) -> list[PyTree]:
        """[θ_0, ..., θ_count] from ws = [w_0, ..., w_count] (eq. 2.3d, discrete)."""
        if self.one_hot:
            return list(ws)
        return mix(self.matrix(c, num_w_steps, len(ws) - 1), list(ws))

    def check_grid(self, num_w_steps: int) -> None:
        """Raise ValueError if the coupling cannot act on a grid of ``num_w_steps`` steps."""

    def check_params(self, c: PyTree, w: PyTree) -> None:
        """Raise ValueError, naming the fix, if ``c`` are not this coupling's parameters."""
        if jax.tree.leaves(c):
            raise ValueError(
                f"{self!r} takes no parameters; got {jax.tree.structure(c)}. Pass "
                "coupling_params=None"
            )

    def check(self, c: PyTree, w: PyTree, num_w_steps: int) -> None:
        """Validate the coupling on this grid with these parameters (before any tracing)."""
        self.check_grid(num_w_steps)
        self.check_params(c, w)


@dataclasses.dataclass(frozen=True)
class Dirac(Coupling):
    """K = δ: θ(t) = w(t), θ_j = w_j (the paper's experiments; the default). No parameters."""

    one_hot: ClassVar[bool] = True

    def matrix(self, c: PyTree, num_w_steps: int, count: int) -> Array:
        return jnp.eye(count + 1)


def _as_matrix(weights: Any) -> np.ndarray:
    try:
        return np.asarray(weights, dtype=np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(
            "Mixing weights must be concrete numbers (they are fixed, not learned); for a "
            "learnable coupling use a Kernel, e.g. anodev2_jax.Exponential()"
        ) from e
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"Mixing weights must be a square matrix of numbers, row j holding θ_j's weights "
            f"κ_(j,m); got {weights!r}"
        ) from e


@dataclasses.dataclass(frozen=True)
class Mixing(Coupling):
    """A user's fixed mixing weights κ: θ_j = Σ_{m ≤ j} κ_{j,m} w_m, j = 0..Nw.

    ``weights``: an (Nw+1, Nw+1) array-like, row j the weights of θ_j; causal (κ_{j,m} = 0 for
    m > j) and finite. Validated on construction; stored as a tuple of tuples (hashable, so a
    Mixing can sit in a static config). Not learned: for learnable weights use a
    :class:`Kernel`. The identity matrix is the Dirac coupling, through the general path.
    """

    weights: Any = dataclasses.field(repr=False)

    def __repr__(self) -> str:
        size = len(self.weights)
        return f"Mixing(<{size}x{size} weights, num_w_steps={size - 1}>)"

    def __post_init__(self) -> None:
        kappa = _as_matrix(self.weights)
        if kappa.ndim != 2 or kappa.shape[0] != kappa.shape[1] or kappa.shape[0] < 2:
            raise ValueError(
                f"Mixing weights must be a square (Nw+1, Nw+1) matrix, row j holding θ_j's "
                f"weights κ_(j,m) of w_0..w_Nw; got shape {kappa.shape}"
            )
        bad = np.argwhere(~np.isfinite(kappa))
        if bad.size:
            j, m = bad[0]
            raise ValueError(
                f"Mixing weights κ[{j}, {m}] = {kappa[j, m]} is not finite; every weight must "
                "be a finite number"
            )
        above = np.argwhere(np.triu(kappa, k=1) != 0)
        if above.size:
            j, m = above[0]
            raise ValueError(
                f"Mixing weights are not causal: κ[{j}, {m}] = {kappa[j, m]:g} mixes w_{m} into "
                f"θ_{j}, but θ_j may use only w_0..w_j (eq. 2.3d integrates over [0, t_j]); set "
                "the entries above the diagonal to 0"
            )
        object.__setattr__(self, "weights", tuple(tuple(float(x) for x in row) for row in kappa))

    @property
    def num_w_steps(self) -> int:
        """The Nw of the grid the weights were written for."""
        return len(self.weights) - 1

    def check_grid(self, num_w_steps: int) -> None:
        if num_w_steps != self.num_w_steps:
            size = num_w_steps + 1
            raise ValueError(
                f"Mixing weights have shape ({self.num_w_steps + 1}, {self.num_w_steps + 1}), "
                f"for num_w_steps={self.num_w_steps}; this solve has num_w_steps={num_w_steps}: "
                f"pass a ({size}, {size}) matrix or num_w_steps={self.num_w_steps}"
            )

    def matrix(self, c: PyTree, num_w_steps: int, count: int) -> Array:
        return jnp.asarray(np.asarray(self.weights)[: count + 1, : count + 1])


# -- kernels K(s) = a·δ(s) + k(s; c), by the trapezoid rule ----------------------------------------
def trapezoid_weights(num_w_steps: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(lag, weight) of the trapezoid rule for θ_j = ∫_0^{t_j} k(t_j - τ) w(τ) dτ on t_m = mδ.

    Both (count+1, count+1): κ_{j,m} = weight[j, m]·k(lag[j, m]·δ) with weight = δ·ω_{j,m} for
    m ≤ j (ω = 1/2 at m = 0 and m = j, else 1; row 0 all zero) and 0 above the diagonal.
    """
    j, m = np.indices((count + 1, count + 1))
    omega = np.where((m == 0) | (m == j), 0.5, 1.0) * (m <= j) * (j >= 1)
    return np.maximum(j - m, 0), omega / num_w_steps


@dataclasses.dataclass(frozen=True)
class Kernel(Coupling):
    """A time kernel K(s) = a·δ(s) + k(s; c) on s ≥ 0; κ by the trapezoid rule (module doc).

    Subclasses give the Dirac weight a (``dirac_weight``, default 0) and the smooth part
    (``smooth_values``), and may give its ODE form (``memory_field``) for diffrax.
    """

    def dirac_weight(self, c: PyTree) -> Array | float:
        """a, the weight of the Dirac part δ(s) (θ gets a·w(t) from it)."""
        return 0.0

    def smooth_values(self, s: Array, c: PyTree) -> Array:
        """k(s; c) at the lags s ≥ 0 (an array of any shape), same shape as s."""
        raise NotImplementedError

    def matrix(self, c: PyTree, num_w_steps: int, count: int) -> Array:
        return _kernel_matrix(self, c, num_w_steps, count)

    # -- the continuous form: θ = a·w + u with du/dt = memory_field(t, u, w), u(0) = 0 -----------
    def memory_field(self, t: float, u: PyTree, w: PyTree, c: PyTree) -> PyTree:
        """du/dt of the memory u(t) = ∫_0^t k(t-τ) w(τ) dτ, when k has an ODE form."""
        raise NotImplementedError

    def check_memory_form(self) -> None:
        """Raise ValueError unless the smooth part has an ODE form (diffrax's vector_field)."""
        if type(self).memory_field is Kernel.memory_field:
            raise ValueError(
                f"{self!r} has no ODE form for its memory ∫ k(t-τ) w(τ) dτ, so diffrax cannot "
                "integrate it; use coupled_solve (trapezoid rule on the weight grid), or a "
                "kernel with one, e.g. anodev2_jax.Exponential()"
            )

    def theta_from_memory(self, w: PyTree, u: PyTree, c: PyTree) -> PyTree:
        """θ = a·w + u (the Dirac part plus the memory)."""
        a = self.dirac_weight(c)
        return jax.tree.map(lambda w, u: jnp.asarray(a, w.dtype) * w + u, w, u)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _kernel_matrix(kernel: Kernel, c: PyTree, num_w_steps: int, count: int) -> Array:
    """κ of ``kernel`` by the trapezoid rule; jitted, so that an eager call compiles once."""
    lag, weight = trapezoid_weights(num_w_steps, count)
    dtype = _dtype_of(c) if jax.tree.leaves(c) else jnp.result_type(float)
    # k on the whole (count+1)² lag matrix: elementwise, no gather.
    k = kernel.smooth_values(jnp.asarray(lag / num_w_steps, dtype), c)
    dirac = kernel.dirac_weight(c) * jnp.asarray(np.eye(count + 1), dtype)
    return jnp.asarray(weight, dtype) * k + dirac


def _check_not_missing(owner: Kernel, c: PyTree) -> None:
    if c is None:
        raise ValueError(
            f"{owner!r} has parameters; pass coupling_params={owner!r}.init(w0) (or your own "
            "values of that structure)"
        )


def _check_scalar_params(owner: Kernel, c: PyTree, keys: Sequence[str]) -> None:
    _check_not_missing(owner, c)
    hint = f"Build them with {owner!r}.init(w0) and pass them as coupling_params."
    if not isinstance(c, dict) or set(c) != set(keys):
        got = sorted(c) if isinstance(c, dict) else repr(c)
        raise ValueError(
            f"{type(owner).__name__} coupling parameters must be a dict with keys "
            f"{sorted(keys)}; got {got}. {hint}"
        )
    for key in keys:
        if jnp.shape(c[key]) != () or not jnp.issubdtype(jnp.result_type(c[key]), jnp.floating):
            raise ValueError(
                f"{type(owner).__name__} parameter {key!r} must be a float scalar; got shape "
                f"{jnp.shape(c[key])}, dtype {jnp.result_type(c[key])}. {hint}"
            )


@dataclasses.dataclass(frozen=True)
class Exponential(Kernel):
    """K(s) = λ e^{-λs}: θ(t) = λ ∫_0^t e^{-λ(t-τ)} w(τ) dτ, an exponential memory of w.

    θ is a moving average of the weight trajectory with memory time 1/λ (∫_0^∞ K = 1); it has
    no Dirac part, so θ(0) = 0 (use :class:`DiracPlus` to keep θ(0) = w0). Continuous form:
    dθ/dt = λ(w - θ), θ(0) = 0. Parameters ``{"rate": r}``, a scalar, λ = softplus(r) > 0,
    initialised to ``init_rate``; learnable like p.
    """

    init_rate: float = 1.0

    def __post_init__(self) -> None:
        _check_positive("Exponential init_rate", self.init_rate)

    def init(self, w: PyTree, key: Array | None = None) -> PyTree:
        return {"rate": jnp.asarray(_softplus_inverse(self.init_rate), _dtype_of(w))}

    def rate(self, c: PyTree) -> Array:
        """λ = softplus(c["rate"])."""
        return jax.nn.softplus(c["rate"])

    def smooth_values(self, s: Array, c: PyTree) -> Array:
        rate = self.rate(c)
        return rate * jnp.exp(-rate * s)

    def memory_field(self, t: float, u: PyTree, w: PyTree, c: PyTree) -> PyTree:
        rate = self.rate(c)
        return jax.tree.map(lambda u, w: jnp.asarray(rate, w.dtype) * (w - u), u, w)

    def check_params(self, c: PyTree, w: PyTree) -> None:
        _check_scalar_params(self, c, ("rate",))


@dataclasses.dataclass(frozen=True)
class DiracPlus(Kernel):
    """K(s) = a·δ(s) + k(s): θ(t) = a·w(t) + ∫_0^t k(t-τ) w(τ) dτ, so θ(0) = a·w0.

    ``smooth``: the kernel k (default :class:`Exponential`). Parameters
    ``{"dirac": a, "smooth": k's parameters}``, a initialised to ``init_dirac``; learnable.
    Continuous form (when k has one): θ = a·w + u, du/dt = k's memory field, u(0) = 0.
    """

    smooth: Kernel = dataclasses.field(default_factory=Exponential)
    init_dirac: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.smooth, Kernel):
            raise ValueError(
                f"DiracPlus smooth={self.smooth!r} is not a Kernel; pass e.g. Exponential()"
            )
        if not np.isfinite(self.init_dirac):
            raise ValueError(f"DiracPlus init_dirac={self.init_dirac!r} must be finite")

    def init(self, w: PyTree, key: Array | None = None) -> PyTree:
        return {
            "dirac": jnp.asarray(self.init_dirac, _dtype_of(w)),
            "smooth": self.smooth.init(w, key),
        }

    def dirac_weight(self, c: PyTree) -> Array | float:
        return c["dirac"] + self.smooth.dirac_weight(c["smooth"])

    def smooth_values(self, s: Array, c: PyTree) -> Array:
        return self.smooth.smooth_values(s, c["smooth"])

    def memory_field(self, t: float, u: PyTree, w: PyTree, c: PyTree) -> PyTree:
        return self.smooth.memory_field(t, u, w, c["smooth"])

    def check_memory_form(self) -> None:
        self.smooth.check_memory_form()

    def check_params(self, c: PyTree, w: PyTree) -> None:
        _check_not_missing(self, c)
        hint = f"Build them with {self!r}.init(w0) and pass them as coupling_params."
        if not isinstance(c, dict) or set(c) != {"dirac", "smooth"}:
            got = sorted(c) if isinstance(c, dict) else repr(c)
            raise ValueError(
                f"DiracPlus coupling parameters must be a dict with keys ['dirac', 'smooth']; "
                f"got {got}. {hint}"
            )
        _check_scalar_params(self, {"dirac": c["dirac"]}, ("dirac",))
        self.smooth.check_params(c["smooth"], w)


@dataclasses.dataclass(frozen=True)
class Smooth(Kernel):
    """Your kernel K(s) = fn(s, c), without a Dirac part (θ(0) = 0; wrap it in DiracPlus).

    ``fn(s, c)``: s an array of lags ≥ 0 (any shape) to K(s), elementwise, of the same shape;
    c its parameters (any pytree, differentiated like p). ``init_fn(dtype) -> c`` builds them
    (None: fn takes no parameters and gets c = None).
    """

    fn: Callable[[Array, PyTree], Array]
    init_fn: Callable[[Any], PyTree] | None = None

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ValueError(f"Smooth fn={self.fn!r} must be a callable fn(s, params) -> K(s)")

    def init(self, w: PyTree, key: Array | None = None) -> PyTree:
        return None if self.init_fn is None else self.init_fn(_dtype_of(w))

    def smooth_values(self, s: Array, c: PyTree) -> Array:
        return self.fn(s, c)

    def check_params(self, c: PyTree, w: PyTree) -> None:
        s = jax.ShapeDtypeStruct((3,), _dtype_of(w))
        try:
            out = jax.eval_shape(self.fn, s, c)
        except Exception as e:
            raise ValueError(
                f"Smooth kernel fn(s, params) failed on lags s of shape (3,) with the given "
                f"coupling_params ({type(e).__name__}: {e}); pass the parameters fn expects, "
                "e.g. coupling_params=Smooth(fn, init_fn).init(w0)"
            ) from e
        if not hasattr(out, "shape") or out.shape != (3,):
            raise ValueError(
                f"Smooth kernel fn(s, params) must return K(s) with the shape of s; for s of "
                f"shape (3,) it returned {jax.tree.map(lambda x: x.shape, out)}"
            )


def make_coupling(kernel: str, rate: float = 1.0) -> Coupling:
    """The coupling named ``kernel`` (one of KERNELS), for configs: ``"dirac"`` (θ = w),
    ``"exponential"`` (K = λe^{-λs}, θ(0) = 0) or ``"dirac+exponential"`` (K = δ + λe^{-λs});
    ``rate``: the initial λ."""
    if kernel == "dirac":
        return Dirac()
    _check_positive("kernel_rate", rate)
    if kernel == "exponential":
        return Exponential(init_rate=float(rate))
    if kernel == "dirac+exponential":
        return DiracPlus(Exponential(init_rate=float(rate)))
    raise ValueError(f"kernel={kernel!r} is unknown; use one of {KERNELS}")
