"""The CPU formulations of :func:`anodev2_jax.nn.conv.conv2d` (impls "cpu" and "cpu_paired").

Each computes what ``lax.conv_general_dilated`` and its autodiff compute, up to summation
order, in a form that XLA:CPU runs faster; :func:`conv_cpu` ties them together with a
``jax.custom_vjp`` (reverse mode, to any order). XLA:CPU hands a convolution with more than
16 channels in or out to YNNPACK on one thread, and others to Eigen on all threads; the
choices below work around both (timings: BENCHMARKS.md §1, ``benchmarks/conv_microbench.py``).

- In float32, the passes where no hand-written kernel beat oneDNN on two CPU kinds
  (:func:`anodev2_jax.cpu.onednn.takes`: every input gradient; every pass from 64 channels
  out, as in AlexNet, but a stem's kernel gradient; below that, the forward but Winograd's
  and the strided one) go to oneDNN (:mod:`anodev2_jax.cpu.onednn`), which picks its
  kernels for the running CPU. The rest (the ResNets' kernel gradients, Winograd's 3×3
  forward at 32 channels, the strided forward), and everything in float64, as follows.
- Forward, and the input gradient below, with whole vectors of outputs (Cout a multiple of
  16 float32 or 8 float64), any kernel and stride but 1×1 at stride 1 (a matmul, XLA's): a
  C++ kernel (``csrc/conv_forward.cc``, :func:`anodev2_jax.cpu.native.conv_forward`) that
  splits the output rows between the call's thread and XLA's pool. At stride 1, 3×3 with Cin
  a multiple of 32 (ResNet-10's 32-channel blocks) runs by Winograd's F(4×4, 3×3)
  (``csrc/winograd.cc``): 36 multiply-adds per tile and channel pair instead of 144, float32
  results within a few 1e-6 of the direct sum's magnitude. Below :data:`WINOGRAD_MIN_CIN`
  the transforms cost more than they save.
- Kernel gradient with at least one vector of outputs: a C++ kernel (``csrc/kernel_grad.cc``)
  that accumulates tiles of input channels × output vectors over each image's pixels, tap by
  tap; for the Winograd-shaped convolutions above, Winograd's transposed form.
- Other kernel gradients at stride 1 (:func:`kernel_grad_conv`): XLA's convolution of x with
  g over the batch, behind a conditional (:func:`materialized`): without it XLA:CPU fuses the
  producers of x and g (BatchNorm, ReLU, their backward) into the transposes around it,
  which then read their inputs with a stride of H·W·C; ``lax.optimization_barrier`` does
  not stop that (XLA:CPU removes barriers before fusion), a conditional does. At stride > 1
  or 1×1 (:func:`kernel_grad_taps`): one (Cin, N·Ho·Wo) @ (N·Ho·Wo, Cout) matmul per tap of a
  strided slice of the padded x, where XLA's window convolution is slower.
- Input gradient (:func:`input_grad`): one stride-1 convolution of g that writes the stride²
  phases of dx as channels, then a depth-to-space reshape (at stride 1, the flipped-kernel
  convolution); it replaces XLA's zero-dilated convolution at stride 2.
- Other stride-1 convolutions with 9-16 channels on their wider side and at most 4 on the
  other (with "cpu_paired", any number): pairs of adjacent columns folded into channels
  (:func:`conv_paired_columns`), x (N, H, W, C) -> (N, H, W/2, 2C) by a free reshape of the
  padded x, with a kernel that places each tap by column parity (4/3 of the multiply-adds at
  3×3). The paired convolution goes to YNNPACK, which runs it faster than Eigen runs the
  narrow one.
- Any convolution left to YNNPACK without padding gets one zero row, its output row
  dropped: YNNPACK runs unpadded convolutions much slower than padded ones.

The C++ kernels run with the CPU speed-ups only
(:func:`anodev2_jax.backend.runs_cpu_kernels`); elsewhere, or without a C++ compiler, the
convolutions they would take run by the XLA formulations above. The C++ kernels' own
gradients (reverse mode of the gradient) are XLA's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from anodev2_jax import backend
from anodev2_jax.cpu import native, onednn
from anodev2_jax.nn.conv import DIMENSION_NUMBERS, Pads, conv_xla

# kernel size -> the C_in (and its multiples) from which impl="cpu" convolves by Winograd
# (benchmarks/conv_microbench.py: at 16 channels in, the 3x3 one is slower than direct).
WINOGRAD_MIN_CIN = {3: 32}
_YNN_DTYPES = (jnp.float32, jnp.float64)  # the float types YNNPACK convolves (jaxlib 0.10)


def _conv(x: jax.Array, w: jax.Array, stride: int, pads: Pads, paired: bool) -> jax.Array:
    """The convolution as impl="cpu" (paired=False) or "cpu_paired" computes it."""
    kh, kw, cin, cout = w.shape
    if onednn.takes("fwd", x.dtype, w.shape, stride, _winograd_applies(x, w.shape, stride)):
        return onednn.conv(x, w, stride, pads)
    if (kh * kw > 1 or stride > 1) and _native_conv_applies(x, cout):  # 1x1/1: a matmul
        return _conv_native(x, w, stride, pads)
    # pairing hands YNNPACK (one thread) what Eigen (all threads) would run: see the module doc
    ynn_after_pairing = 8 < max(cin, cout) <= 16 and x.dtype in _YNN_DTYPES
    pair = stride == 1 and kw > 1 and ynn_after_pairing and (paired or min(cin, cout) <= 4)
    if kh * kw > 1 and pads == ((0, 0), (0, 0)) and (pair or max(cin, cout) > 16):
        # YNNPACK runs convolutions with no padding at all much slower: pad ``stride`` zero
        # rows in front and drop the output row that they make.
        return _conv(x, w, stride, ((stride, 0), (0, 0)), paired)[:, 1:]
    if pair:
        return conv_paired_columns(x, w, pads)
    return conv_xla(x, w, stride, pads)


def _native_conv_applies(x: jax.Array, cout: int) -> bool:
    """Whether the C++ convolution runs: CPU kernels on, float32/64, whole vectors of outputs."""
    return (
        x.dtype in _YNN_DTYPES
        and cout % (64 // x.dtype.itemsize) == 0
        and backend.runs_cpu_kernels("cpu", x.dtype)
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_native(x: jax.Array, w: jax.Array, stride: int, pads: Pads) -> jax.Array:
    """The convolution by a C++ kernel (anodev2_jax.cpu.native), differentiable: its gradient
    is XLA's (this is what the gradients of impl="cpu" differentiate to)."""
    if _winograd_applies(x, w.shape, stride):
        return native.winograd(x, w, pads)
    return native.conv_forward(x, w, pads, stride)


def _winograd_applies(x: jax.Array, kernel_shape: tuple[int, ...], stride: int) -> bool:
    """Whether a C++ kernel that takes this convolution uses Winograd's F(4×4, 3×3): 3×3 at
    stride 1, whole vectors of outputs, Cin a multiple of
    :data:`WINOGRAD_MIN_CIN` (below it the transforms cost more than the products save)."""
    kh, kw, cin, cout = kernel_shape
    lanes = 64 // x.dtype.itemsize
    min_cin = WINOGRAD_MIN_CIN.get(kh) if kh == kw else None
    return min_cin is not None and stride == 1 and cin % min_cin == 0 and cout % lanes == 0


def _conv_native_fwd(
    x: jax.Array, w: jax.Array, stride: int, pads: Pads
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _conv_native(x, w, stride, pads), (x, w)


_conv_native.defvjp(_conv_native_fwd, onednn.xla_conv_vjp)


def conv_paired_columns(x: jax.Array, w: jax.Array, pads: Pads) -> jax.Array:
    """Stride-1 convolution with pairs of adjacent columns folded into channels.

    x: (N, H, W, Cin); w: (kh, kw, Cin, Cout) -> (N, Ho, Wo, Cout). Output column 2b + q
    reads the padded column 2b + q + j = 2(b + jj) + r for tap j, so the paired kernel is
    K[i, jj, (r, c), (q, o)] = w[i, j, c, o] where 2 jj + r = q + j, and zero elsewhere.
    """
    n, h, width, cin = x.shape
    kh, kw, _, cout = w.shape
    (h_lo, h_hi), (w_lo, w_hi) = pads
    out_width = width + w_lo + w_hi - kw + 1
    pairs_out, pairs_kernel = -(-out_width // 2), kw // 2 + 1
    pairs_in = pairs_out + pairs_kernel - 1
    # The W padding goes into the data (the pairing needs it; a negative count crops). Fused
    # with the producer of x (BatchNorm, ReLU), XLA:CPU runs this pad slower than alone.
    pad_columns = ((0, 0, 0), (0, 0, 0), (w_lo, 2 * pairs_in - width - w_lo, 0), (0, 0, 0))
    xp = materialized(lambda x: lax.pad(x, jnp.zeros((), x.dtype), pad_columns), x)
    xp = xp.reshape(n, h, pairs_in, 2 * cin)
    tap = np.full((pairs_kernel, 2, 2), kw, dtype=np.int32)  # [jj, r, q] -> j (kw: none)
    for q in range(2):
        for j in range(kw):
            tap[(q + j) // 2, (q + j) % 2, q] = j
    w_ext = jnp.pad(w, ((0, 0), (0, 1), (0, 0), (0, 0)))  # w_ext[:, kw] = 0
    kernel = jnp.transpose(w_ext[:, tap], (0, 1, 2, 4, 3, 5))  # (kh, jj, r, c, q, o)
    out = lax.conv_general_dilated(
        xp,
        kernel.reshape(kh, pairs_kernel, 2 * cin, 2 * cout),
        (1, 1),
        ((h_lo, h_hi), (0, 0)),
        dimension_numbers=DIMENSION_NUMBERS,
    )
    return out.reshape(n, out.shape[1], 2 * pairs_out, cout)[:, :, :out_width, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_cpu(x: jax.Array, w: jax.Array, stride: int, pads: Pads, paired: bool) -> jax.Array:
    """The convolution of x (N, H, W, Cin) with w (kh, kw, Cin, Cout) as impl "cpu"
    (``paired=False``) or "cpu_paired" computes it, its VJP by :func:`input_grad` and
    :func:`kernel_grad` or the C++ kernel gradient; ``pads``: ((top, bottom), (left, right))."""
    return _conv(x, w, stride, pads, paired)


def _conv_cpu_fwd(
    x: jax.Array, w: jax.Array, stride: int, pads: Pads, paired: bool
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _conv(x, w, stride, pads, paired), (x, w)


def _conv_cpu_bwd(
    stride: int,
    pads: Pads,
    paired: bool,
    residuals: tuple[jax.Array, jax.Array],
    g: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    x, w = residuals
    winograd = _winograd_applies(x, w.shape, stride)
    if onednn.takes("dx", x.dtype, w.shape, stride, winograd):
        dx = onednn.input_grad(g, w, x.shape, stride, pads)
    else:
        dx = input_grad(g, w, x.shape, stride, pads, paired)
    if onednn.takes("dw", x.dtype, w.shape, stride, winograd):
        dw = onednn.kernel_grad(x, g, w.shape, stride, pads)
    elif (w.shape[0] * w.shape[1] > 1 or stride > 1) and _native_kernel_grad_applies(x, w.shape):
        dw = _kernel_grad_native(x, g, w.shape, stride, pads)
    else:
        dw = materialized(lambda x, g: kernel_grad(x, g, w.shape, stride, pads), x, g)
    return dx, dw


conv_cpu.defvjp(_conv_cpu_fwd, _conv_cpu_bwd)


def materialized(fn: Callable[..., jax.Array], *operands: jax.Array) -> jax.Array:
    """fn(*operands), computed where XLA cannot fuse the operands' producers into it.

    Both branches of the conditional are fn; the predicate only has to be unknown at compile
    time (it is False only when the first element is NaN, and then fn runs all the same).
    """
    if any(op.size == 0 for op in operands):
        return fn(*operands)
    first = operands[0].reshape(-1)[0]
    return lax.cond(first == first, fn, fn, *operands)


# -- kernel gradient -------------------------------------------------------------------------------
def kernel_grad(
    x: jax.Array, g: jax.Array, kernel_shape: tuple[int, ...], stride: int, pads: Pads
) -> jax.Array:
    """dL/dw (kh, kw, Cin, Cout) of y = conv(x, w) from x (N, H, W, Cin) and g = dL/dy."""
    kh, kw = kernel_shape[:2]
    if stride == 1 and kh * kw > 1:
        return kernel_grad_conv(x, g, kernel_shape, pads)
    return kernel_grad_taps(x, g, kernel_shape, stride, pads)


def _native_kernel_grad_applies(x: jax.Array, kernel_shape: tuple[int, ...]) -> bool:
    """Whether the C++ kernel gradient runs: CPU kernels on, float32/64, one vector of outputs."""
    return (
        x.dtype in _YNN_DTYPES
        and kernel_shape[3] >= 64 // x.dtype.itemsize
        and backend.runs_cpu_kernels("cpu", x.dtype)
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _kernel_grad_native(
    x: jax.Array, g: jax.Array, kernel_shape: tuple[int, ...], stride: int, pads: Pads
) -> jax.Array:
    """The kernel gradient by a C++ kernel (anodev2_jax.cpu.native), differentiable: its own
    gradient is that of :func:`kernel_grad`, the same linear map."""
    before = (pads[0][0], pads[1][0])
    if _winograd_applies(x, kernel_shape, stride):
        return native.winograd_kernel_grad(x, g, kernel_shape[0], before)
    return native.kernel_grad(x, g, (kernel_shape[0], kernel_shape[1]), before, stride)


def _kernel_grad_native_fwd(
    x: jax.Array, g: jax.Array, kernel_shape: tuple[int, ...], stride: int, pads: Pads
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _kernel_grad_native(x, g, kernel_shape, stride, pads), (x, g)


def _kernel_grad_native_bwd(
    kernel_shape: tuple[int, ...],
    stride: int,
    pads: Pads,
    residuals: tuple[jax.Array, jax.Array],
    cotangent: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    _, vjp = jax.vjp(lambda x, g: kernel_grad(x, g, kernel_shape, stride, pads), *residuals)
    dx, dg = vjp(cotangent)
    return dx, dg


_kernel_grad_native.defvjp(_kernel_grad_native_fwd, _kernel_grad_native_bwd)


def kernel_grad_conv(
    x: jax.Array, g: jax.Array, kernel_shape: tuple[int, ...], pads: Pads
) -> jax.Array:
    """Stride-1 kernel gradient as one convolution: batch Cin, features N, window g.

    x: (N, H, W, Cin); g: (N, Ho, Wo, Cout) -> (kh, kw, Cin, Cout).
    """
    kh, kw = kernel_shape[:2]
    # as in _conv: a zero row in front when there is no padding at all
    extra = 1 if pads == ((0, 0), (0, 0)) else 0
    (h_lo, h_hi), w_pads = pads
    out = lax.conv_general_dilated(
        jnp.transpose(x, (3, 1, 2, 0)),
        jnp.transpose(g, (1, 2, 0, 3)),
        (1, 1),
        ((h_lo + extra, h_hi), w_pads),
        dimension_numbers=DIMENSION_NUMBERS,
    )  # (Cin, kh + extra, kw, Cout)
    return jnp.transpose(out[:, extra : extra + kh, :kw, :], (1, 2, 0, 3))


def kernel_grad_taps(
    x: jax.Array, g: jax.Array, kernel_shape: tuple[int, ...], stride: int, pads: Pads
) -> jax.Array:
    """Kernel gradient as one matmul per tap: dw[i, j] = x_ij (R, Cin)ᵀ @ g (R, Cout).

    x_ij is the strided slice of the padded x that tap (i, j) reads, R = N·Ho·Wo.
    """
    kh, kw, cin, cout = kernel_shape
    n, ho, wo, _ = g.shape
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
    g_rows = g.reshape(n * ho * wo, cout)
    taps = []
    for i in range(kh):
        for j in range(kw):
            x_ij = lax.slice(
                xp,
                (0, i, j, 0),
                (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, cin),
                (1, stride, stride, 1),
            )
            taps.append(
                lax.dot_general(x_ij.reshape(n * ho * wo, cin), g_rows, (((0,), (0,)), ((), ())))
            )
    return jnp.stack(taps).reshape(kh, kw, cin, cout)


# -- input gradient --------------------------------------------------------------------------------
def _phase_taps(k: int, stride: int, pad_lo: int) -> tuple[np.ndarray, int]:
    """Which kernel tap feeds which input phase at which offset, along one spatial axis.

    Input row y = stride·b + p (phase p) receives g[b + d] w[i] for every tap i with
    p + pad_lo - i = stride·d. Returns table (D, stride) of tap indices (k: no tap) for
    offsets d = d_min .. d_min + D - 1, and d_min.
    """
    offsets = {
        (p, (p + pad_lo - i) // stride): i
        for p in range(stride)
        for i in range(k)
        if (p + pad_lo - i) % stride == 0
    }
    ds = [d for _, d in offsets] or [0]
    d_min, d_max = min(ds), max(ds)
    table = np.full((d_max - d_min + 1, stride), k, dtype=np.int32)
    for (p, d), i in offsets.items():
        table[d - d_min, p] = i
    return table, d_min


def input_grad(
    g: jax.Array,
    w: jax.Array,
    x_shape: tuple[int, ...],
    stride: int,
    pads: Pads,
    paired: bool = False,
) -> jax.Array:
    """dL/dx (N, H, W, Cin) of y = conv(x, w) from g = dL/dy (N, Ho, Wo, Cout).

    One stride-1 convolution of g with a (Dh, Dw, Cout, stride²·Cin) kernel gives every phase
    (y mod stride, x mod stride) of dx; a depth-to-space reshape interleaves them.
    """
    n, h, wd, cin = x_shape
    kh, kw, _, cout = w.shape
    ho, wo = g.shape[1:3]
    s = stride
    table_h, dh_min = _phase_taps(kh, s, pads[0][0])
    table_w, dw_min = _phase_taps(kw, s, pads[1][0])
    # kernel[a, b, o, (p, q, c)] = w[table_h[a, p], table_w[b, q], c, o], zero for "no tap"
    w_ext = jnp.pad(w, ((0, 1), (0, 1), (0, 0), (0, 0)))
    kernel = w_ext[table_h[:, None, :, None], table_w[None, :, None, :]]  # (Dh, Dw, s, s, Ci, Co)
    kernel = jnp.transpose(kernel, (0, 1, 5, 2, 3, 4)).reshape(
        table_h.shape[0], table_w.shape[0], cout, s * s * cin
    )
    blocks_h, blocks_w = -(-h // s), -(-wd // s)
    # out[b] = sum_e g[b + d_min + e] kernel[e] for b < blocks: g gets -d_min rows in front and
    # enough behind; a negative count crops rows that no input row reads.
    g_pads = [
        (-d_min, blocks + table.shape[0] - 1 - size + d_min)
        for blocks, table, d_min, size in (
            (blocks_h, table_h, dh_min, ho),
            (blocks_w, table_w, dw_min, wo),
        )
    ]
    crops = [(min(lo, 0), min(hi, 0), 0) for lo, hi in g_pads]
    g = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), *crops, (0, 0, 0)))
    (gh_lo, gh_hi), (gw_lo, gw_hi) = g_pads
    conv_pads = ((max(gh_lo, 0), max(gh_hi, 0)), (max(gw_lo, 0), max(gw_hi, 0)))
    out = _conv(g, kernel, 1, conv_pads, paired)  # (N, blocks_h, blocks_w, s·s·Cin)
    if s > 1:
        out = out.reshape(n, blocks_h, blocks_w, s, s, cin)
        out = jnp.transpose(out, (0, 1, 3, 2, 4, 5)).reshape(n, blocks_h * s, blocks_w * s, cin)
    return out[:, :h, :wd, :]
