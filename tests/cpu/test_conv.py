"""conv2d: impls "cpu" and "cpu_paired" equal XLA's convolution in value and in first and second
derivatives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tree_relative_error
from jax.test_util import check_grads

from anodev2_jax.cpu import conv as cpu_conv
from anodev2_jax.cpu import native
from anodev2_jax.nn import conv as conv_lib
from anodev2_jax.nn.conv import conv2d

# (H, W, Cin, Cout, kernel, stride, padding): each reaches a different formulation
CASES = {
    "stem 3x3 (native conv and dw)": (8, 8, 3, 16, 3, 1, 1),
    "12 channels SAME (cpu_paired pairs, conv dw)": (8, 8, 12, 12, 3, 1, "SAME"),
    "VALID odd width (unpadded conv and dw)": (6, 7, 10, 4, 3, 1, "VALID"),
    "VALID 20 channels (unpadded, YNNPACK)": (6, 6, 20, 18, 3, 1, "VALID"),
    "5x5 padding 2": (8, 8, 3, 5, 5, 1, 2),
    "stride 2 padding 1 odd width (phases, taps)": (8, 7, 4, 6, 3, 2, 1),
    "stride 2 SAME odd size": (7, 7, 4, 6, 3, 2, "SAME"),
    "1x1 stride 2 (shortcut)": (8, 8, 4, 6, 1, 2, 0),
    "stride 3": (9, 9, 2, 3, 3, 3, 1),
    "32 channels, 16-wide tiles and a 5-column rest (native dw)": (5, 6, 37, 21, 3, 1, 1),
    "20 -> 32 5x5 (native conv and dx)": (6, 7, 20, 32, 5, 1, 2),
    "16 -> 32 5x5 odd size (native conv and dx)": (7, 5, 16, 32, 5, 1, 2),
    "32 -> 16 3x3 odd size (Winograd F(4x4, 3x3) conv, dw)": (7, 9, 32, 16, 3, 1, 1),
    "VALID 16 outputs (native conv, no padding)": (6, 7, 10, 16, 3, 1, "VALID"),
    "stride 2 to 8 channels (native dx: 4 phases x 4 channels)": (8, 7, 4, 8, 3, 2, 1),
    "stride 2 odd size to 16 (native conv and dw)": (9, 7, 5, 16, 3, 2, 1),
    "stride 3 5x5 VALID to 16 (native conv and dw)": (11, 10, 3, 16, 5, 3, "VALID"),
    "1x1 stride 2 to 16 (native shortcut)": (8, 7, 4, 16, 1, 2, 0),
}


def _operands(case, dtype, seed=0):
    """x, kernel (scaled by 1/sqrt(fan-in)) and an output cotangent g, from numpy's RNG."""
    h, w, cin, cout, k, stride, padding = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((2, h, w, cin)), dtype)
    kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin), dtype)
    y_shape = jax.eval_shape(lambda x, kernel: conv2d(x, kernel, stride, padding), x, kernel)
    g = jnp.asarray(rng.standard_normal(y_shape.shape), dtype)
    return x, kernel, g


def _value_and_vjp(case, impl):
    stride, padding = case[5], case[6]

    @jax.jit
    def fn(x, kernel, g):
        y, vjp = jax.vjp(lambda x, kernel: conv2d(x, kernel, stride, padding, impl), x, kernel)
        return y, vjp(g)

    return fn


@pytest.mark.parametrize("impl", ["cpu", "cpu_paired"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_value_and_gradients_equal_xla_float64(case, impl):
    operands = _operands(case, jnp.float64)
    ours = _value_and_vjp(case, impl)(*operands)
    xla = _value_and_vjp(case, "xla")(*operands)
    assert ours[0].shape == xla[0].shape
    assert tree_relative_error(ours, xla) <= 1e-12


@pytest.mark.parametrize(
    "impl, name",
    [
        ("cpu_paired", "12 channels SAME (cpu_paired pairs, conv dw)"),
        ("cpu", "stride 2 padding 1 odd width (phases, taps)"),
        ("cpu", "20 -> 32 5x5 (native conv and dx)"),
        ("cpu", "16 -> 32 5x5 odd size (native conv and dx)"),
        ("cpu", "stride 2 odd size to 16 (native conv and dw)"),
    ],
)
def test_value_and_gradients_equal_xla_float32(impl, name):
    case = CASES[name]
    operands = _operands(case, jnp.float32)
    ours = _value_and_vjp(case, impl)(*operands)
    xla = _value_and_vjp(case, "xla")(*operands)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(ours))
    assert tree_relative_error(ours, xla) <= 1e-5


@pytest.mark.parametrize("name", ["stem 3x3 (native conv and dw)", "stride 2 SAME odd size"])
def test_gradients_match_finite_differences(name):
    case = CASES[name]
    x, kernel, _ = _operands(case, jnp.float64)
    stride, padding = case[5], case[6]
    fn = jax.jit(lambda x, kernel: jnp.tanh(conv2d(x, kernel, stride, padding, "cpu")))
    check_grads(fn, (x, kernel), order=1, modes=("rev",))


@pytest.mark.parametrize(
    "name",
    [
        "stride 2 padding 1 odd width (phases, taps)",
        "5x5 padding 2",
        "20 -> 32 5x5 (native conv and dx)",
        "16 -> 32 5x5 odd size (native conv and dx)",
        "stride 2 odd size to 16 (native conv and dw)",
    ],
)
def test_second_order_reverse_mode_equals_xla(name):
    """The gradient of a loss of the gradient (reverse over reverse), as training with a
    gradient penalty or a Hessian-vector product would take it."""
    case = CASES[name]
    x, kernel, g = _operands(case, jnp.float64)
    stride, padding = case[5], case[6]

    def second(impl):
        def loss(x, kernel):
            return jnp.sum(jnp.tanh(conv2d(x, kernel, stride, padding, impl)) * g)

        def penalty(x, kernel):
            dx, dk = jax.grad(loss, argnums=(0, 1))(x, kernel)
            return jnp.sum(dx**2) + jnp.sum(jnp.sin(dk))

        return jax.jit(jax.grad(penalty, argnums=(0, 1)))(x, kernel)

    assert tree_relative_error(second("cpu"), second("xla")) <= 1e-12


def test_second_order_matches_finite_differences():
    case = CASES["12 channels SAME (cpu_paired pairs, conv dw)"]
    x, kernel, _ = _operands((4, 4, *case[2:]), jnp.float64)
    fn = jax.jit(lambda x, kernel: jnp.tanh(conv2d(x, kernel, 1, "SAME", "cpu_paired")))
    # the check's central differences err by ~2e3·eps² here (XLA's own conv alike)
    check_grads(fn, (x[:1], kernel), order=2, modes=("rev",), eps=1e-5)


def test_auto_is_the_cpu_formulation_on_cpu():
    assert jax.default_backend() == "cpu"
    x, kernel, _ = _operands(CASES["12 channels SAME (cpu_paired pairs, conv dw)"], jnp.float64)
    jaxprs = {
        impl: str(jax.make_jaxpr(lambda x, k, impl=impl: conv2d(x, k, 1, 1, impl))(x, kernel))
        for impl in conv_lib.IMPLS
    }
    assert jaxprs["auto"] == jaxprs["cpu"] != jaxprs["cpu_paired"]
    assert "custom_vjp_call" in jaxprs["cpu"] and "custom_vjp_call" not in jaxprs["xla"]


def test_the_cpu_kernels_stay_off_other_backends(monkeypatch):
    """On a GPU or TPU (default_backend not "cpu") even impl="cpu" calls no C++ kernel."""
    x, kernel, g = _operands(CASES["20 -> 32 5x5 (native conv and dx)"], jnp.float32)
    case = CASES["20 -> 32 5x5 (native conv and dx)"]

    def jaxpr():
        return str(jax.make_jaxpr(_value_and_vjp(case, "cpu"))(x, kernel, g))

    assert "ffi_call" in jaxpr()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert "ffi_call" not in jaxpr()


@pytest.mark.parametrize(
    "x_shape, kernel_shape, kwargs, message",
    [
        ((1, 8, 8, 3), (3, 3, 3, 4), {"impl": "cudnn"}, "impl='cudnn' is unknown"),
        ((8, 8, 3), (3, 3, 3, 4), {}, r"x \(N, H, W, Cin\)"),
        ((1, 8, 8, 3), (3, 3, 2, 4), {}, r"x has 3 channels.*\(kh, kw, 3, Cout\)"),
        ((1, 8, 8, 3), (3, 3, 3, 4), {"stride": 0}, "stride=0 must be a positive int"),
        ((1, 8, 8, 3), (3, 3, 3, 4), {"padding": "FULL"}, "padding='FULL' is unknown"),
        ((1, 8, 8, 3), (3, 3, 3, 4), {"padding": -1}, "padding=-1 must be"),
    ],
)
def test_bad_arguments_are_named(x_shape, kernel_shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        conv2d(np.zeros(x_shape), np.zeros(kernel_shape), **kwargs)


# -- the C++ kernels -------------------------------------------------------------------------------
NATIVE_CASES = [  # (N, H, W, Cin, Cout, k), ((top, bottom), (left, right)), stride
    ((2, 9, 29, 16, 16, 3), ((1, 1), (1, 1)), 1),  # 24-pixel tiles and a 5-pixel rest
    ((2, 8, 8, 64, 64, 5), ((2, 2), (2, 2)), 1),  # AlexNet's block: 4 vectors of outputs
    ((3, 5, 6, 20, 48, 3), ((0, 2), (2, 0)), 1),  # 3 vectors; padding on one side only
    ((2, 7, 6, 3, 112, 2), ((0, 0), (0, 0)), 1),  # 4 + 3 vectors; none
    ((2, 5, 7, 16, 8, 3), ((1, 1), (1, 1)), 1),  # float64: 16 channels to one vector
    ((2, 6, 5, 37, 21, 3), ((1, 1), (1, 1)), 1),  # kernel gradient: tiles and scalar rests
    ((2, 9, 9, 16, 32, 3), ((1, 1), (1, 1)), 2),  # ResNet-10's downsampling, odd size
    ((2, 11, 10, 3, 16, 5), ((0, 0), (2, 1)), 3),  # columns and rows the output never reads
    ((2, 8, 7, 16, 32, 1), ((0, 0), (0, 0)), 2),  # ResNet-10's 1x1 shortcut
]


def _native_operands(shape, pads, stride, dtype):
    n, h, w, cin, cout, k = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, h, w, cin)), dtype)
    kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout)), dtype)
    y = conv_lib.conv_xla(x, kernel, stride, pads)
    return x, kernel, y, jnp.asarray(rng.standard_normal(y.shape), dtype)


@pytest.mark.skipif(not native.available(), reason="no C++ compiler: conv2d uses XLA's conv")
@pytest.mark.parametrize("shape, pads, stride", NATIVE_CASES)
def test_native_conv_forward_equals_xla(shape, pads, stride):
    for dtype, tolerance in ((jnp.float64, 1e-12), (jnp.float32, 1e-5)):
        if shape[4] % (64 // jnp.dtype(dtype).itemsize):
            continue  # no whole vector of outputs: conv2d does not call it
        x, kernel, expected, _ = _native_operands(shape, pads, stride, dtype)
        got = jax.jit(native.conv_forward, static_argnums=(2, 3))(x, kernel, pads, stride)
        assert got.dtype == dtype and got.shape == expected.shape
        assert tree_relative_error(got, expected) <= tolerance


@pytest.mark.skipif(not native.available(), reason="no C++ compiler: conv2d uses XLA's dw")
@pytest.mark.parametrize("shape, pads, stride", NATIVE_CASES)
def test_native_kernel_grad_equals_xla(shape, pads, stride):
    kernel_shape = (shape[5], shape[5], shape[3], shape[4])
    for dtype, tolerance in ((jnp.float64, 1e-12), (jnp.float32, 1e-5)):
        x, _, _, g = _native_operands(shape, pads, stride, dtype)
        expected = cpu_conv.kernel_grad(x, g, kernel_shape, stride, pads)
        before = (pads[0][0], pads[1][0])
        got = jax.jit(native.kernel_grad, static_argnums=(2, 3, 4))(
            x, g, kernel_shape[:2], before, stride
        )
        assert got.dtype == dtype
        assert tree_relative_error(got, expected) <= tolerance


WINOGRAD_CASES = [  # (N, H, W, Cin, Cout), ((top, bottom), (left, right)); 3x3 kernels
    ((2, 16, 16, 64, 64), ((2, 2), (2, 2))),  # AlexNet's block
    ((3, 9, 7, 32, 48), ((2, 2), (2, 2))),  # odd sizes: half tiles; 3 vectors of outputs
    ((2, 11, 13, 16, 16), ((0, 1), (3, 0))),  # one-sided padding, 1 vector
    ((1, 6, 6, 16, 112), ((4, 4), (1, 2))),  # padding beyond the kernel; 4 + 3 vectors
    ((30, 2, 1, 16, 16), ((2, 2), (2, 2))),  # 30 tiles: blocks of 24 and a padded rest
]


@pytest.mark.skipif(not native.available(), reason="no C++ compiler: conv2d uses XLA's conv")
@pytest.mark.parametrize("shape, pads", WINOGRAD_CASES)
def test_native_winograd_conv_and_kernel_grad_equal_xla(shape, pads):
    k = 3
    n, h, w, cin, cout = shape
    rng = np.random.default_rng(0)
    for dtype, tolerance in ((jnp.float64, 1e-12), (jnp.float32, 1e-5)):
        x = jnp.asarray(rng.standard_normal((n, h, w, cin)), dtype)
        kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin), dtype)
        expected = conv_lib.conv_xla(x, kernel, 1, pads)
        got = jax.jit(native.winograd, static_argnums=2)(x, kernel, pads)
        assert got.dtype == dtype and got.shape == expected.shape
        assert tree_relative_error(got, expected) <= tolerance
        g = jnp.asarray(rng.standard_normal(expected.shape), dtype)
        expected_dw = cpu_conv.kernel_grad(x, g, kernel.shape, 1, pads)
        before = (pads[0][0], pads[1][0])
        got_dw = jax.jit(native.winograd_kernel_grad, static_argnums=(2, 3))(x, g, k, before)
        assert got_dw.dtype == dtype
        assert tree_relative_error(got_dw, expected_dw) <= tolerance


@pytest.mark.skipif(not native.available(), reason="no C++ compiler: conv2d uses XLA's conv")
def test_native_winograd_float32_at_full_size():
    """float32 rounding stays within 1e-5 over a whole batch of ResNet-10's 32-channel blocks
    (the kernel gradient sums 2048 tiles)."""
    shape, k = (128, 16, 16, 32), 3
    rng = np.random.default_rng(1)
    x = jnp.asarray(np.maximum(rng.standard_normal(shape), 0), jnp.float32)
    g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = rng.standard_normal((k, k, shape[3], shape[3])) / np.sqrt(k * k * shape[3])
    kernel = jnp.asarray(kernel, jnp.float32)
    p = k // 2
    pads = ((p, p), (p, p))
    y = jax.jit(native.winograd, static_argnums=2)(x, kernel, pads)
    assert tree_relative_error(y, conv_lib.conv_xla(x, kernel, 1, pads)) <= 1e-5
    dw = jax.jit(native.winograd_kernel_grad, static_argnums=(2, 3))(x, g, k, (p, p))
    assert tree_relative_error(dw, cpu_conv.kernel_grad(x, g, kernel.shape, 1, pads)) <= 1e-5


def test_without_a_compiler_conv2d_warns_once_and_uses_xla(monkeypatch):
    def no_compiler():
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")

    monkeypatch.setattr(native, "_available", None)
    monkeypatch.setattr(native, "_build", no_compiler)
    case = CASES["32 channels, 16-wide tiles and a 5-column rest (native dw)"]
    operands = _operands(case, jnp.float64)
    with pytest.warns(RuntimeWarning, match="could not be built .no C.. compiler found"):
        ours = _value_and_vjp(case, "cpu")(*operands)
    assert native._available is False
    assert tree_relative_error(ours, _value_and_vjp(case, "xla")(*operands)) <= 1e-12
