"""Evolution operators q(w; p) for the weights, and their one-step maps Φ_δ (docs/math.md §3).

Every operator has one interface, so that the coupled solver and diffrax take any of them:

- ``init(w, key=None) -> p``: parameters, a pytree with ``w``'s structure as a prefix
  (one parameter set per kernel leaf);
- ``vector_field(t, w, p) -> dw/dt``: the continuous evolution q (diffrax's form);
- ``step(w, t, dt, p) -> w_next``: the one-step map Φ_dt used by the discrete solve;
- ``check(w, p)``: raises ValueError, naming the bad leaf and the fix, on shapes it cannot take.

Subclasses of :class:`Evolution` implement the per-kernel hooks ``_init_leaf``,
``_field_leaf`` and, when a closed-form step exists, ``_exact_leaf``. ``scheme`` picks the
step: ``"exact"`` (the closed form; for RDA the paper's eq. B.4) or an explicit Runge-Kutta
method name that integrates ``vector_field`` over one step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anodev2_jax import backend, stepping

PyTree = Any
Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}
SCHEMES = ("exact", *stepping.METHODS)


def _leaf_name(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path) or "w"


@dataclasses.dataclass(frozen=True)
class Evolution:
    """Base class: maps the per-kernel hooks over a pytree of kernels."""

    scheme: str = "exact"

    # -- per-kernel hooks --------------------------------------------------------------------------
    def _init_leaf(self, w: Array, key: Array | None) -> PyTree:
        raise NotImplementedError

    def _field_leaf(self, t: float, w: Array, p: PyTree) -> Array:
        raise NotImplementedError

    def _exact_leaf(self, w: Array, dt: float, p: PyTree) -> Array:
        raise NotImplementedError(
            f"{type(self).__name__} has no closed-form step; use scheme='euler', 'rk2' or 'rk4'"
        )

    def _check_leaf(self, name: str, w: Array, p: PyTree) -> None:
        """Raise ValueError if kernel ``w`` (called ``name``) or its parameters ``p`` are unfit."""

    # -- pytree interface --------------------------------------------------------------------------
    def init(self, w: PyTree, key: Array | None = None) -> PyTree:
        """Initial parameters for every kernel leaf of ``w`` (arrays or ShapeDtypeStructs)."""
        leaves, treedef = jax.tree.flatten(w)
        keys = [None] * len(leaves) if key is None else list(jax.random.split(key, len(leaves)))
        params = [self._init_leaf(leaf, k) for leaf, k in zip(leaves, keys, strict=True)]
        return jax.tree.unflatten(treedef, params)

    def _param_leaves(self, w: PyTree, p: PyTree) -> list[PyTree]:
        treedef: Any = jax.tree.structure(w)
        try:
            return list(treedef.flatten_up_to(p))
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"{type(self).__name__} parameters must hold one entry per kernel of w "
                f"(structure {treedef}); got structure {jax.tree.structure(p)}. "
                f"Build them with {type(self).__name__}(...).init(w)."
            ) from e

    def _map(self, fn: Callable[[Array, PyTree], Array], w: PyTree, p: PyTree) -> PyTree:
        leaves, treedef = jax.tree.flatten(w)
        outs = [fn(leaf, pl) for leaf, pl in zip(leaves, self._param_leaves(w, p), strict=True)]
        return jax.tree.unflatten(treedef, outs)

    def vector_field(self, t: float, w: PyTree, p: PyTree) -> PyTree:
        """dw/dt = q(w; p) for every kernel leaf."""
        return self._map(lambda leaf, pl: self._field_leaf(t, leaf, pl), w, p)

    def step(self, w: PyTree, t: float, dt: float, p: PyTree) -> PyTree:
        """w(t + dt) = Φ_dt(w(t); p) by ``self.scheme``."""
        if self.scheme == "exact":
            return self._map(lambda leaf, pl: self._exact_leaf(leaf, dt, pl), w, p)
        return stepping.STEPS[self.scheme](self.vector_field, w, t, dt, p)

    def check(self, w: PyTree, p: PyTree) -> None:
        """Validate shapes of kernels and parameters; raises ValueError naming the fix."""
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme={self.scheme!r} is unknown; use one of {SCHEMES}")
        if self.scheme == "exact" and type(self)._exact_leaf is Evolution._exact_leaf:
            raise ValueError(
                f"{type(self).__name__} has no closed-form step; use scheme='euler', 'rk2' or 'rk4'"
            )
        param_leaves = self._param_leaves(w, p)
        paths = jax.tree_util.tree_flatten_with_path(w)[0]
        for (path, leaf), pl in zip(paths, param_leaves, strict=True):
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
                raise ValueError(
                    f"kernel {_leaf_name(path)} has dtype {jnp.result_type(leaf)}; "
                    "evolved weights must be float32 or float64"
                )
            self._check_leaf(_leaf_name(path), leaf, pl)


def _check_param_shapes(
    op: str, name: str, p: PyTree, expected: dict[str, tuple[int, ...]], hint: str
) -> None:
    if not isinstance(p, dict) or set(p) != set(expected):
        got = sorted(p) if isinstance(p, dict) else type(p).__name__
        raise ValueError(
            f"{op} parameters of kernel {name} must be a dict with keys {sorted(expected)}; "
            f"got {got}. {hint}"
        )
    for key, shape in expected.items():
        if jnp.shape(p[key]) != shape:
            raise ValueError(
                f"{op} parameter {key!r} of kernel {name} has shape {jnp.shape(p[key])}; "
                f"expected {shape}. {hint}"
            )


# -- zero: the Neural ODE / ANODE case -------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Zero(Evolution):
    """q = 0: static weights, θ(t) = w0 (Neural ODE / ANODE). Takes no parameters (None)."""

    def init(self, w: PyTree, key: Array | None = None) -> PyTree:
        return None

    def vector_field(self, t: float, w: PyTree, p: PyTree) -> PyTree:
        return jax.tree.map(jnp.zeros_like, w)

    def step(self, w: PyTree, t: float, dt: float, p: PyTree) -> PyTree:
        return w

    def check(self, w: PyTree, p: PyTree) -> None:
        if jax.tree.leaves(p):
            raise ValueError(
                f"the zero evolution takes no parameters; got {jax.tree.structure(p)}. Pass p=None"
            )


# -- reaction-diffusion-advection ------------------------------------------------------------------
def _softplus_inverse(x: float) -> float:
    return float(np.log(np.expm1(x)))


RDA_TRANSFORMS = ("auto", "fft", "matrix")


@functools.cache
def _dft_products(kh: int, kw: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of θ[k, p] - θ[k, q], (kh·kw,)*3, θ[k, q] = 2π (a y / kh + b x / kw) for
    frequency k = (a, b) and tap q = (y, x), row-major; divided by kh·kw (the inverse's 1/N)."""
    a, b = np.divmod(np.arange(kh * kw), kw)
    theta = 2 * np.pi * (np.outer(a, a) / kh + np.outer(b, b) / kw)  # [k, q]: same index sets
    phase = theta[:, :, None] - theta[:, None, :]
    return np.cos(phase) / (kh * kw), np.sin(phase) / (kh * kw)


@dataclasses.dataclass(frozen=True)
class RDA(Evolution):
    """Reaction-diffusion-advection on each kernel's two spatial axes, periodic (eq. 2.6).

    q(w) = σ(d Δw + v·∇w + ρ w), computed spectrally; the exact scheme is the paper's B.4,
    Φ_δ(w) = σ(Re IFFT2[exp(δ(-d|k|² + i v·k + ρ)) FFT2(w)]). Kernels: (kh, kw, cin, cout).
    Parameters per kernel: ``{"diffusion", "vx", "vy", "rho"}``, scalars, or (cout,) each when
    ``per_channel``; d = softplus(diffusion) ≥ 0.

    With σ = tanh, B.4 is not a time discretisation of eq. 2.6 (σ acts on the state, not on
    the rate); the other schemes integrate eq. 2.6 itself.

    ``transform``: how the symbol is applied. "fft": ``jnp.fft.fft2``/``ifft2``. "matrix": the
    same DFT as one real (kh·kw, kh·kw) operator Re(F⁻¹ diag(symbol) F) per multiplier,
    applied by a matmul; equal to rounding, and on XLA:CPU faster than its FFTs for small
    kernels (BENCHMARKS.md §4). "auto" (default): "matrix" for kernels of at most 64 taps
    with the CPU speed-ups, else "fft" (:func:`anodev2_jax.backend.rda_transform`).
    """

    activation: str = "tanh"
    per_channel: bool = False
    init_diffusion: float = 0.1
    transform: str = "auto"

    def _param_shape(self, w: Array) -> tuple[int, ...]:
        return (w.shape[-1],) if self.per_channel else ()

    def _init_leaf(self, w: Array, key: Array | None) -> PyTree:
        shape = self._param_shape(w)
        dtype = jnp.result_type(w)
        return {
            "diffusion": jnp.full(shape, _softplus_inverse(self.init_diffusion), dtype),
            "vx": jnp.zeros(shape, dtype),
            "vy": jnp.zeros(shape, dtype),
            "rho": jnp.zeros(shape, dtype),
        }

    def symbol(self, w: Array, p: PyTree) -> Array:
        """Fourier symbol -d|k|² + i v·k + ρ of kernel ``w``: complex (kh, kw, 1, 1 or cout)."""
        kh, kw = w.shape[:2]
        dtype = w.dtype
        ky = jnp.asarray(2 * np.pi * np.fft.fftfreq(kh), dtype).reshape(kh, 1, 1, 1)
        kx = jnp.asarray(2 * np.pi * np.fft.fftfreq(kw), dtype).reshape(1, kw, 1, 1)

        def coeff(x: Array) -> Array:
            x = jnp.asarray(x, dtype)
            return x.reshape(1, 1, 1, -1) if x.ndim else x

        d = jax.nn.softplus(coeff(p["diffusion"]))
        real = -d * (kx**2 + ky**2) + coeff(p["rho"])
        imag = coeff(p["vx"]) * kx + coeff(p["vy"]) * ky
        return jax.lax.complex(real, imag)

    def _sigma(self, x: Array) -> Array:
        return ACTIVATIONS[self.activation](x)

    def _apply_symbol(self, multiplier: Array, w: Array) -> Array:
        """Re IFFT2[multiplier · FFT2(w)] over w's two spatial axes; multiplier (kh, kw, 1, C)."""
        kh, kw = w.shape[:2]
        if backend.rda_transform(self.transform, kh * kw) == "fft":
            w_hat = jnp.fft.fft2(w, axes=(0, 1))
            return jnp.fft.ifft2(multiplier * w_hat, axes=(0, 1)).real.astype(w.dtype)
        # R[c, p, q] = Re Σ_k conj(F[k, p]) m[k, c] F[k, q] / (kh·kw), F[k, q] = exp(-i θ[k, q])
        cos, sin = (jnp.asarray(a, w.dtype) for a in _dft_products(kh, kw))
        m = multiplier.reshape(kh * kw, -1)
        exact = jax.lax.Precision.HIGHEST  # no reduced-precision passes on GPU/TPU
        operator = jnp.einsum("kc,kpq->cpq", m.real.astype(w.dtype), cos, precision=exact)
        operator -= jnp.einsum("kc,kpq->cpq", m.imag.astype(w.dtype), sin, precision=exact)
        flat = w.reshape(kh * kw, *w.shape[2:])
        if operator.shape[0] == 1:  # one multiplier for every (cin, cout) slice
            out = jnp.einsum("pq,q...->p...", operator[0], flat, precision=exact)
        else:  # one per output channel
            out = jnp.einsum("opq,qco->pco", operator, flat, precision=exact)
        return out.reshape(w.shape)

    def _field_leaf(self, t: float, w: Array, p: PyTree) -> Array:
        return self._sigma(self._apply_symbol(self.symbol(w, p), w))

    def _exact_leaf(self, w: Array, dt: float, p: PyTree) -> Array:
        return self._sigma(self._apply_symbol(jnp.exp(dt * self.symbol(w, p)), w))

    def _check_leaf(self, name: str, w: Array, p: PyTree) -> None:
        if self.transform not in RDA_TRANSFORMS:
            raise ValueError(
                f"RDA transform={self.transform!r} is unknown; use one of {RDA_TRANSFORMS}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"RDA activation={self.activation!r} is unknown; use one of {tuple(ACTIVATIONS)}"
            )
        if len(jnp.shape(w)) != 4 or 0 in jnp.shape(w):
            raise ValueError(
                f"RDA evolves conv kernels of shape (kh, kw, cin, cout); kernel {name} has "
                f"shape {jnp.shape(w)}. Evolve only 4-D kernels with RDA (use Zero or Linear "
                "for the others)."
            )
        shape = self._param_shape(w)
        _check_param_shapes(
            "RDA",
            name,
            p,
            dict.fromkeys(("diffusion", "vx", "vy", "rho"), shape),
            f"Use RDA(per_channel={self.per_channel}).init(w) to build them.",
        )


# -- linear ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Linear(Evolution):
    """Linear evolution q(w) = A w, exactly stepped by exp(δA).

    ``mode="spatial"``: one (kh·kw, kh·kw) matrix per kernel acting on its two spatial axes,
    the same for every (cin, cout) slice (RDA with σ = identity is a special case).
    ``mode="elementwise"``: q(w) = a ⊙ w with a rate per weight; exp(δa) ⊙ w.
    """

    mode: str = "spatial"

    def _init_leaf(self, w: Array, key: Array | None) -> PyTree:
        dtype = jnp.result_type(w)
        if self.mode == "elementwise":
            return {"rate": jnp.zeros(jnp.shape(w), dtype)}
        size = w.shape[0] * w.shape[1]
        return {"matrix": jnp.zeros((size, size), dtype)}

    def _spatial(self, matrix: Array, w: Array) -> Array:
        flat = w.reshape(w.shape[0] * w.shape[1], -1)
        return (matrix.astype(w.dtype) @ flat).reshape(w.shape)

    def _field_leaf(self, t: float, w: Array, p: PyTree) -> Array:
        if self.mode == "elementwise":
            return p["rate"].astype(w.dtype) * w
        return self._spatial(p["matrix"], w)

    def _exact_leaf(self, w: Array, dt: float, p: PyTree) -> Array:
        if self.mode == "elementwise":
            return jnp.exp(dt * p["rate"].astype(w.dtype)) * w
        return self._spatial(jax.scipy.linalg.expm(dt * p["matrix"].astype(w.dtype)), w)

    def _check_leaf(self, name: str, w: Array, p: PyTree) -> None:
        hint = f"Use Linear(mode={self.mode!r}).init(w) to build them."
        if self.mode == "elementwise":
            _check_param_shapes("Linear", name, p, {"rate": jnp.shape(w)}, hint)
        elif self.mode == "spatial":
            if len(jnp.shape(w)) < 2:
                raise ValueError(
                    f"Linear(mode='spatial') needs kernels with two leading spatial axes; "
                    f"kernel {name} has shape {jnp.shape(w)}. Use mode='elementwise'."
                )
            size = w.shape[0] * w.shape[1]
            _check_param_shapes("Linear", name, p, {"matrix": (size, size)}, hint)
        else:
            raise ValueError(
                f"Linear mode={self.mode!r} is unknown; use 'spatial' or 'elementwise'"
            )


# -- small neural network: the HyperNetwork case ---------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MLP(Evolution):
    """q(w) = W2 tanh(W1 vec(w_s) + b1) + b2 on every spatial slice w_s (kh·kw values).

    One small network per kernel, shared by its (cin, cout) slices; a HyperNetwork-style
    evolution. It has no closed form: the default scheme is an Euler step of q. ``W2`` starts
    at zero, so an untrained MLP evolution keeps the weights static.
    """

    hidden: int = 16
    scheme: str = "euler"

    def _init_leaf(self, w: Array, key: Array | None) -> PyTree:
        if key is None:
            raise ValueError("MLP.init needs a PRNG key: MLP(...).init(w, jax.random.key(0))")
        dtype = jnp.result_type(w)
        size = w.shape[0] * w.shape[1]
        w1 = jax.random.normal(key, (size, self.hidden), dtype) / np.sqrt(size)
        return {
            "w1": w1,
            "b1": jnp.zeros((self.hidden,), dtype),
            "w2": jnp.zeros((self.hidden, size), dtype),
            "b2": jnp.zeros((size,), dtype),
        }

    def _field_leaf(self, t: float, w: Array, p: PyTree) -> Array:
        size = w.shape[0] * w.shape[1]
        slices = jnp.moveaxis(w.reshape(size, -1), 0, -1)  # (cin·cout, kh·kw)
        p = jax.tree.map(lambda x: x.astype(w.dtype), p)
        hidden = jnp.tanh(slices @ p["w1"] + p["b1"][None, :])
        out = hidden @ p["w2"] + p["b2"][None, :]
        return jnp.moveaxis(out, -1, 0).reshape(w.shape)

    def _check_leaf(self, name: str, w: Array, p: PyTree) -> None:
        if len(jnp.shape(w)) < 2:
            raise ValueError(
                f"MLP evolution needs kernels with two leading spatial axes; kernel {name} "
                f"has shape {jnp.shape(w)}"
            )
        size = w.shape[0] * w.shape[1]
        expected = {
            "w1": (size, self.hidden),
            "b1": (self.hidden,),
            "w2": (self.hidden, size),
            "b2": (size,),
        }
        _check_param_shapes(
            "MLP", name, p, expected, f"Use MLP(hidden={self.hidden}).init(w, key)."
        )
