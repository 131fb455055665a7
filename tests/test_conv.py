"""conv2d: forward and hand-written VJP against a numpy loop, lax, autodiff and PyTorch."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax
from jax.test_util import check_grads

from cnnjax.ops import conv as conv_module
from cnnjax.ops import conv2d
from cnnjax.shapes import ShapeError

DN = ("NHWC", "HWIO", "NHWC")
# Every weight-gradient formulation the module offers (besides "auto") is tested.
WGRAD_IMPLS = [i for i in conv_module._WGRAD_IMPLS if i != "auto"]
DGRAD_IMPLS = [i for i in conv_module._DGRAD_IMPLS if i != "auto"]

# --------------------------------------------------------------------------- references


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def explicit_pads(padding, in_hw, k_hw, stride, dilation):
    """Padding as ((top, bottom), (left, right)), SAME by TensorFlow's documented rule."""
    stride, dilation = _pair(stride), _pair(dilation)
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return ((0, 0), (0, 0))
        pads = []
        for n, f, s, d in zip(in_hw, k_hw, stride, dilation, strict=True):
            out = -(-n // s)
            total = max((out - 1) * s + d * (f - 1) + 1 - n, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    if isinstance(padding[0], int):
        return ((padding[0], padding[0]), (padding[1], padding[1]))
    return tuple(tuple(p) for p in padding)


def conv_numpy(x, w, stride=1, padding=0, dilation=1):
    """The definition, as loops: y[n,i,j,k] = sum_{a,b,c} xp[n, iS+aD, jS+bD, c] w[a,b,c,k]."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
    fh, fw, _, k = w.shape
    pads = explicit_pads(padding, x.shape[1:3], (fh, fw), (sh, sw), (dh, dw))
    xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    ho = (xp.shape[1] - dh * (fh - 1) - 1) // sh + 1
    wo = (xp.shape[2] - dw * (fw - 1) - 1) // sw + 1
    y = np.zeros((x.shape[0], ho, wo, k))
    for i in range(ho):
        for j in range(wo):
            for a in range(fh):
                for b in range(fw):
                    y[:, i, j, :] += xp[:, i * sh + a * dh, j * sw + b * dw, :] @ w[a, b]
    return y


def conv_lax(x, w, stride=1, padding=0, dilation=1):
    """lax.conv_general_dilated with the padding handed over as lax understands it."""
    if isinstance(padding, str):
        lax_pad = padding.upper()
    else:
        lax_pad = explicit_pads(padding, x.shape[1:3], w.shape[:2], stride, dilation)
    return lax.conv_general_dilated(
        x, w, _pair(stride), lax_pad, rhs_dilation=_pair(dilation), dimension_numbers=DN,
        precision=lax.Precision.HIGHEST,
    )


def _rand(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


# --------------------------------------------------------------------------- the grid

STRIDES = [1, (2, 3)]
PADDINGS = [0, 2, (1, 2), ((0, 2), (1, 0)), "SAME", "VALID"]
DILATIONS = [1, 2, 3]
GRID = list(itertools.product(STRIDES, PADDINGS, DILATIONS))
# Non-square input and kernel: the 3x2 kernel at dilation 3 spans 7x4 cells.
X_SHAPE, W_SHAPE = (2, 9, 8, 3), (3, 2, 3, 4)


@pytest.mark.parametrize("stride,padding,dilation", GRID)
def test_forward_matches_lax(stride, padding, dilation):
    rng = np.random.default_rng(1)
    x, w = _rand(rng, X_SHAPE), _rand(rng, W_SHAPE)
    y = conv2d(x, w, stride=stride, padding=padding, dilation=dilation, dilation_impl="native")
    ref = conv_lax(x, w, stride, padding, dilation)
    assert y.shape == ref.shape
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_impl_lists():
    assert {"offsets", "xla"} <= set(WGRAD_IMPLS)
    assert conv_module._IMPLS == ("auto", "native", "space_to_batch")


@pytest.mark.parametrize("padding", [2, ((0, 2), (1, 0)), "SAME", "VALID"])
@pytest.mark.parametrize("dilation", [2, (1, 3)])
def test_space_to_batch_forward_matches_lax(padding, dilation):
    rng = np.random.default_rng(2)
    x, w = _rand(rng, X_SHAPE), _rand(rng, W_SHAPE)
    y = conv2d(x, w, padding=padding, dilation=dilation, dilation_impl="space_to_batch")
    ref = conv_lax(x, w, 1, padding, dilation)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "stride,padding,dilation",
    [(1, 0, 1), (2, 1, 1), ((1, 2), ((2, 0), (0, 1)), 2), (3, "SAME", (2, 1)), (1, "VALID", 3),
     (2, (0, 3), 1)],
)
@pytest.mark.parametrize("dilation_impl", ["native", "space_to_batch"])
def test_forward_matches_numpy_loop(x64, stride, padding, dilation, dilation_impl):
    _check_forward_against_numpy(3, (2, 7, 6, 2), (3, 2, 2, 3), stride, padding, dilation,
                                 dilation_impl=dilation_impl)


def _check_forward_against_numpy(seed, x_shape, w_shape, stride, padding, dilation, **impl):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    y = conv2d(jnp.asarray(x), jnp.asarray(w), stride=stride, padding=padding,
               dilation=dilation, **impl)
    ref = conv_numpy(x, w, stride, padding, dilation)
    assert y.dtype == jnp.float64
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


def test_padding_larger_than_kernel_and_unread_rows(x64):
    # Padding 3 around a 1x1 kernel at stride 2: rows the forward pass never reads
    # must get a zero gradient, and negative "full" padding must crop correctly.
    rng = np.random.default_rng(4)
    x, w = jnp.asarray(rng.standard_normal((1, 4, 5, 2))), jnp.asarray(
        rng.standard_normal((1, 1, 2, 2)))
    for wgi in WGRAD_IMPLS:
        f = functools.partial(conv2d, stride=2, padding=3, weight_grad_impl=wgi)
        y, vjp = jax.vjp(f, x, w)
        ref, ref_vjp = jax.vjp(lambda x, w: conv_lax(x, w, 2, 3, 1), x, w)
        np.testing.assert_allclose(y, ref, atol=1e-12)
        g = jnp.asarray(rng.standard_normal(y.shape))
        for got, want in zip(vjp(g), ref_vjp(g), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        # Stride 2 from padded offset -3 reads input rows/columns -3, -1, 1, 3 only:
        # rows 0 and 2 (and columns 0, 2, 4) get no gradient.
        dx = np.asarray(vjp(g)[0])
        assert np.all(dx[:, 0::2] == 0) and np.all(dx[:, :, 0::2] == 0)
        assert np.all(dx[:, 1::2, 1::2] != 0)


# --------------------------------------------------------------------------- the VJP


VJP_GRID = list(itertools.product([1, (2, 3)], [((0, 2), (1, 0)), "SAME"], [1, 3]))
VJP_GRID += [(2, (1, 2), 2), ((1, 2), 0, (2, 1))]


def _check_vjp_against_lax(stride, padding, dilation, impls):
    rng = np.random.default_rng(5)
    x, w = jnp.asarray(rng.standard_normal(X_SHAPE)), jnp.asarray(rng.standard_normal(W_SHAPE))
    ref_y, ref_vjp = jax.vjp(lambda x, w: conv_lax(x, w, stride, padding, dilation), x, w)
    g = jnp.asarray(rng.standard_normal(ref_y.shape))
    ref_dx, ref_dw = ref_vjp(g)
    for dil_impl, wg_impl, *dg_impl in impls:
        f = functools.partial(conv2d, stride=stride, padding=padding, dilation=dilation,
                              dilation_impl=dil_impl, weight_grad_impl=wg_impl,
                              input_grad_impl=dg_impl[0] if dg_impl else "auto")
        y, vjp = jax.vjp(f, x, w)
        dx, dw = vjp(g)
        np.testing.assert_allclose(y, ref_y, rtol=1e-10, atol=1e-10)
        assert dx.shape == x.shape and dw.shape == w.shape
        np.testing.assert_allclose(dx, ref_dx, rtol=1e-10, atol=1e-10,
                                   err_msg=f"dx {dil_impl}/{wg_impl}")
        np.testing.assert_allclose(dw, ref_dw, rtol=1e-10, atol=1e-10,
                                   err_msg=f"dw {dil_impl}/{wg_impl}")


@pytest.mark.parametrize("stride,padding,dilation", VJP_GRID)
def test_vjp_matches_lax_autodiff(x64, stride, padding, dilation):
    _check_vjp_against_lax(stride, padding, dilation, [("auto", "auto")])


@pytest.mark.parametrize(
    "dilation_impl,weight_grad_impl",
    [("space_to_batch", "auto")] + [("native", wg) for wg in WGRAD_IMPLS],
)
@pytest.mark.parametrize(
    "stride,padding,dilation",
    [(1, ((0, 2), (1, 0)), 3), (1, "SAME", (2, 1)), ((2, 3), (1, 2), 2)],
)
def test_vjp_each_impl_matches_lax_autodiff(x64, stride, padding, dilation, dilation_impl,
                                            weight_grad_impl):
    # space_to_batch is only used at stride 1 (it falls back to native otherwise).
    _check_vjp_against_lax(stride, padding, dilation, [(dilation_impl, weight_grad_impl)])


@pytest.mark.parametrize("forward_impl", ["xla", "direct", "per_image", "banded"])
@pytest.mark.parametrize("stride,padding,dilation", GRID)
def test_forward_impls_match_numpy_loop(x64, monkeypatch, stride, padding, dilation,
                                        forward_impl):
    monkeypatch.setattr(conv_module, "_CHUNK_BYTES", 1)  # per_image: one image per chunk
    monkeypatch.setattr(conv_module, "_STACKED_CHUNK_BYTES", 1)  # banded: the same
    _check_forward_against_numpy(19, (2, 9, 8, 2), (2, 3, 2, 3), stride, padding, dilation,
                                 forward_impl=forward_impl)


def _check_bfloat16_computed_in_float32(seed, x_shape, w_shape, w_scale, forward_impl, tol,
                                        padding=1):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal(w_shape) / w_scale, jnp.bfloat16)
    y = conv2d(x, w, padding=padding, forward_impl=forward_impl)
    assert y.dtype == jnp.bfloat16
    ref = conv_lax(x.astype(jnp.float32), w.astype(jnp.float32), 1, padding, 1)
    np.testing.assert_allclose(y.astype(jnp.float32), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("columns", [1, 4, 1000])
def test_banded_forward_in_blocks(x64, monkeypatch, columns):
    # Blocks of one column to whole rows (12 output columns: B_w 1, 2 or 12 for 2
    # filters), with the VJP of the layer against lax's autodiff.
    monkeypatch.setattr(conv_module, "_BAND_MAX_COLUMNS", columns)
    rng = np.random.default_rng(33)
    x = jnp.asarray(rng.standard_normal((3, 9, 16, 3)))
    w = jnp.asarray(rng.standard_normal((3, 5, 3, 2)))
    f = functools.partial(conv2d, forward_impl="banded")
    y, vjp = jax.vjp(f, x, w)
    ref, ref_vjp = jax.vjp(lambda x, w: conv_lax(x, w), x, w)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    g = jnp.asarray(rng.standard_normal(y.shape))
    for got, want in zip(vjp(g), ref_vjp(g), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_banded_forward_rule(monkeypatch):
    # On the CPU: small unpadded stride-1 layers with 5-wide filters whose blocks hold
    # two or more columns (LeNet-5's conv2); not 3x3 filters, padding, a stride, one
    # column per block, or another backend. Without the output width nothing changes.
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    unpadded, padded = ((0, 0), (0, 0)), ((2, 2), (2, 2))
    pick = conv_module._pick_forward
    assert pick("auto", (5, 5, 6, 16), pads=unpadded, out_w=10) == "banded"
    assert pick("auto", (5, 5, 6, 16)) == "xla"
    assert pick("auto", (3, 3, 8, 16), pads=unpadded, out_w=28) == "xla"
    assert pick("auto", (5, 5, 6, 16), pads=padded, out_w=14) == "xla"
    assert pick("auto", (5, 5, 6, 16), (2, 2), pads=unpadded, out_w=5) == "xla"
    assert pick("auto", (5, 5, 6, 64), pads=unpadded, out_w=10) == "xla"
    assert pick("auto", (5, 5, 1, 6), pads=unpadded, out_w=28) == "direct"
    x, w = jnp.ones((2, 14, 14, 6)), jnp.ones((5, 5, 6, 16))
    assert "conv_general_dilated" not in str(jax.make_jaxpr(conv2d)(x, w))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert pick("auto", (5, 5, 6, 16), pads=unpadded, out_w=10) == "xla"


def test_banded_forward_accumulates_bfloat16_in_float32():
    _check_bfloat16_computed_in_float32(21, (2, 14, 14, 6), (5, 5, 6, 16), 4, "banded", 2**-7,
                                        padding=0)


def test_direct_forward_accumulates_bfloat16_in_float32():
    # One rounding of the float32 sum to bfloat16 (relative 2^-8), not 27 of them.
    _check_bfloat16_computed_in_float32(20, (2, 12, 12, 3), (3, 3, 3, 8), 1, "direct", 2**-8)


def test_direct_patch_rule(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.setattr(conv_module, "DIRECT_PATCH_WIDTH_BY_BACKEND", {"cpu": 32})
    assert conv_module._pick_forward("auto", (5, 5, 1, 6)) == "direct"
    assert conv_module._pick_forward("auto", (3, 3, 3, 64)) == "direct"
    assert conv_module._pick_forward("auto", (5, 5, 6, 16)) == "xla"
    monkeypatch.setattr(conv_module, "DIRECT_PATCH_WIDTH_BY_BACKEND", {"cpu": 25})
    assert conv_module._pick_forward("auto", (5, 5, 1, 6)) == "direct"
    assert conv_module._pick_forward("auto", (3, 3, 3, 64)) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert conv_module._pick_forward("auto", (5, 5, 1, 6)) == "xla"


def test_strided_input_layer_rule(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert conv_module._pick_forward("auto", (11, 11, 3, 96), (4, 4)) == "per_image"
    assert conv_module._pick_forward("auto", (3, 3, 64, 64), (2, 2)) == "xla"
    assert conv_module._pick_forward("auto", (11, 11, 3, 96), (1, 1)) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert conv_module._pick_forward("auto", (11, 11, 3, 96), (4, 4)) == "xla"


# ------------------------------------------------------------- Winograd F(2x2, 3x3) and F(2x2, 5x5)

WINOGRAD_CASES = [((2, 7, 9, 3), 1), ((1, 6, 6, 2), 0), ((2, 8, 5, 2), 2),
                  ((1, 5, 8, 3), ((0, 2), (1, 0))), ((2, 6, 7, 1), "SAME"),
                  ((1, 3, 4, 2), ((2, 2), (0, 1))), ((1, 4, 3, 2), ((1, 0), (0, 0))),
                  ((1, 4, 5, 2), ((3, 0), (1, 4)))]  # padding wider than the filter
WINOGRAD_5X5_CASES = [((2, 9, 11, 3), 2), ((1, 7, 8, 2), 0), ((2, 6, 5, 2), 3),
                      ((1, 5, 9, 3), ((0, 4), (2, 1))), ((2, 8, 7, 1), "SAME"),
                      ((1, 2, 3, 2), ((2, 2), (1, 1))), ((1, 5, 6, 2), ((6, 0), (0, 5)))]


@pytest.mark.parametrize("m,r", [(2, 3), (2, 5), (3, 3), (4, 3)])
def test_winograd_matrices_compute_an_r_tap_correlation(x64, m, r):
    # Checked as an identity against the definition: A^T [(G g) * (B^T d)] is the
    # m-output correlation of an (m + r - 1)-cell d with an r-tap g.
    bt, g_m, at = (np.array(v, np.float64) for v in conv_module._winograd_matrices(m, r))
    t = m + r - 1
    assert bt.shape == (t, t) and g_m.shape == (t, r) and at.shape == (m, t)
    rng = np.random.default_rng(27)
    for _ in range(5):
        d, g = rng.standard_normal(t), rng.standard_normal(r)
        want = np.array([d[i:i + r] @ g for i in range(m)])
        np.testing.assert_allclose(at @ ((g_m @ g) * (bt @ d)), want, rtol=1e-12, atol=1e-12)


def test_winograd_f23_matrices_are_the_published_ones_up_to_signs():
    # Lavin & Gray (2016), F(2, 3): the construction may flip the sign of a
    # transformed entry (a row of B^T with the same row of G, or with the column of A^T).
    published = (((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
                 ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
                 ((1, 1, 1, 0), (0, 1, -1, -1)))
    for got, want in zip(conv_module._winograd_matrices(2, 3), published, strict=True):
        np.testing.assert_array_equal(np.abs(got), np.abs(np.array(want, np.float64)))


def _winograd_case(seed, x_shape, r, padding):
    rng = np.random.default_rng(seed)
    _check_forward_against_numpy(seed, x_shape, (r, r, x_shape[3], 4), 1, padding, 1,
                                 forward_impl="winograd")
    x = jnp.asarray(rng.standard_normal(x_shape))
    w = jnp.asarray(rng.standard_normal((r, r, x_shape[3], 4)))
    f = functools.partial(conv2d, padding=padding, forward_impl="winograd")
    y, vjp = jax.vjp(f, x, w)
    ref, ref_vjp = jax.vjp(lambda x, w: conv_lax(x, w, 1, padding, 1), x, w)
    g = jnp.asarray(rng.standard_normal(y.shape))
    for got, want in zip(vjp(g), ref_vjp(g), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("x_shape,padding", WINOGRAD_CASES)
def test_winograd_matches_numpy_loop_and_lax_vjp(x64, x_shape, padding):
    # Odd and even output sizes (a last tile that is cut), asymmetric padding.
    _winograd_case(21, x_shape, 3, padding)


@pytest.mark.parametrize("x_shape,padding", WINOGRAD_5X5_CASES)
def test_winograd_5x5_matches_numpy_loop_and_lax_vjp(x64, x_shape, padding):
    _winograd_case(29, x_shape, 5, padding)


@pytest.mark.parametrize("r", [3, 5])
def test_winograd_large_batches_run_in_chunks_with_the_same_result(x64, monkeypatch, r):
    # A budget of about two images' tiles: a batch of 5 runs as chunks of 2, 2 and 1,
    # forward and backward, and gives what the whole batch gives.
    rng = np.random.default_rng(30)
    x = jnp.asarray(rng.standard_normal((5, 7, 6, 3)))
    w = jnp.asarray(rng.standard_normal((r, r, 3, 4)))
    pads = ((r // 2, r // 2), (r // 2, r // 2))
    # Per image: (m + r - 1)^2 entries of 4 x 3 tiles of 2x2 outputs, 3 + 4 channels, float64.
    per_image = (r + 1) ** 2 * 4 * 3 * (3 + 4) * 8
    monkeypatch.setattr(conv_module, "_WINOGRAD_CHUNK_BYTES", 2 * per_image)
    assert conv_module._winograd_chunk(x.shape, r, pads, 3, 4, 8) == 2
    f = functools.partial(conv2d, padding=r // 2, forward_impl="winograd")
    y, vjp = jax.vjp(f, x, w)
    ref, ref_vjp = jax.vjp(lambda x, w: conv_lax(x, w, 1, r // 2, 1), x, w)
    np.testing.assert_allclose(y, ref, rtol=1e-11, atol=1e-11)
    g = jnp.asarray(rng.standard_normal(y.shape))
    for got, want in zip(vjp(g), ref_vjp(g), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)
    # Three chunks forward (t^2 products each), three for dL/dx and three for dL/dw.
    t2 = (2 + r - 1) ** 2
    jaxpr = str(jax.make_jaxpr(lambda x, w: jax.vjp(f, x, w)[1](g))(x, w))
    assert jaxpr.count("dot_general") == 9 * t2


@pytest.mark.parametrize("r", [3, 5])
def test_winograd_check_grads_order2(x64, r):
    rng = np.random.default_rng(23)
    x = jnp.asarray(rng.standard_normal((1, r + 2, r + 3, 2)))
    w = jnp.asarray(rng.standard_normal((r, r, 2, 3)))
    check_grads(lambda x, w: conv2d(x, w, padding=((1, 0), (2, 1)), forward_impl="winograd"),
                (x, w), order=2, modes=["rev"])


# Error against a float64 reference, as a multiple of XLA's own float32 convolution's,
# for y, dL/dx and dL/dw. Measured over 16 seeds at this shape: F(2x2, 3x3) 0.5-0.9x;
# F(2x2, 5x5) 1.4-2.6x for y and dL/dx and 5-9.4x for dL/dw (its points reach 2 and -1/2).
@pytest.mark.parametrize("r,factors", [(3, (4, 4, 4)), (5, (4, 4, 12))])
def test_winograd_float32_error_is_near_that_of_xla(x64, r, factors):
    # The output and both gradients, at a VGG-like width.
    rng = np.random.default_rng(24)
    x = rng.standard_normal((2, 10, 12, 256))
    w = rng.standard_normal((r, r, 256, 8)) / (16 * r)
    g = rng.standard_normal((2, 10, 12, 8))
    pad = r // 2
    exact = [np.asarray(v) for v in _value_and_vjp(conv_lax, x, w, g, padding=pad)]
    with jax.enable_x64(False):
        x32, w32, g32 = (v.astype(np.float32) for v in (x, w, g))
        wino = _value_and_vjp(conv2d, x32, w32, g32, padding=pad, forward_impl="winograd")
        xla = _value_and_vjp(conv_lax, x32, w32, g32, padding=pad)
    for name, e, a, b, factor in zip(("y", "dx", "dw"), exact, wino, xla, factors, strict=True):
        err_wino = np.max(np.abs(np.asarray(a, np.float64) - e))
        err_xla = np.max(np.abs(np.asarray(b, np.float64) - e))
        assert err_wino <= factor * err_xla + 1e-7 * np.max(np.abs(e)), (name, err_wino, err_xla)


def _value_and_vjp(f, x, w, g, **kwargs):
    y, vjp = jax.vjp(lambda x, w: f(x, w, **kwargs), jnp.asarray(x), jnp.asarray(w))
    return (y, *vjp(jnp.asarray(g)))


@pytest.mark.parametrize("r", [3, 5])
def test_winograd_non_finite_inputs_reach_the_same_outputs(r):
    # The same outputs are non-finite as in XLA's convolution (their values may be
    # NaN where XLA's are +-inf), so the trainer's non-finite guard sees them alike.
    rng = np.random.default_rng(28)
    for bad in (np.inf, -np.inf, np.nan):
        x = rng.standard_normal((1, 7, 8, 2)).astype(np.float32)
        x[0, rng.integers(7), rng.integers(8), rng.integers(2)] = bad
        w = rng.standard_normal((r, r, 2, 2)).astype(np.float32)
        mine = np.asarray(conv2d(x, w, padding=r // 2, forward_impl="winograd"))
        ref = np.asarray(conv_lax(jnp.asarray(x), jnp.asarray(w), 1, r // 2, 1))
        assert not np.isfinite(ref).all()
        np.testing.assert_array_equal(np.isfinite(mine), np.isfinite(ref))


def test_winograd_bfloat16_computes_in_float32():
    _check_bfloat16_computed_in_float32(25, (2, 9, 9, 16), (3, 3, 16, 8), 12, "winograd", 2**-7)


def test_winograd_5x5_bfloat16_computes_in_float32():
    _check_bfloat16_computed_in_float32(25, (2, 9, 9, 16), (5, 5, 16, 8), 20, "winograd", 2**-7,
                                        padding=2)


def test_winograd_rule(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    pick = conv_module._pick_forward
    assert pick("auto", (3, 3, 256, 256)) == "winograd"
    assert pick("auto", (3, 3, 512, 64), (1, 1), (1, 1), jnp.float32) == "winograd"
    assert pick("auto", (3, 3, 128, 256)) == "winograd"     # VGG-16 block3_conv1
    assert pick("auto", (3, 3, 96, 96)) == "winograd"       # all-conv net
    assert pick("auto", (3, 3, 64, 128)) == "xla"           # VGG-16 block2_conv1
    assert pick("auto", (5, 5, 96, 256)) == "winograd"      # AlexNet conv2
    assert pick("auto", (5, 5, 64, 192)) == "winograd"      # torchvision AlexNet conv2
    assert pick("auto", (5, 5, 32, 64)) == "winograd"
    assert pick("auto", (5, 5, 16, 32)) == "xla"
    assert pick("auto", (5, 5, 6, 16)) == "xla"             # LeNet-5 conv2
    assert pick("auto", (3, 3, 256, 256), (2, 2)) == "xla"  # strided
    assert pick("auto", (3, 3, 256, 256), (1, 1), (2, 2)) == "xla"  # dilated
    assert pick("auto", (5, 5, 256, 256), (1, 1), (2, 2)) == "xla"
    assert pick("auto", (7, 7, 256, 256)) == "xla"
    assert pick("auto", (3, 5, 256, 256)) == "xla"
    assert pick("auto", (3, 3, 256, 256), dtype=jnp.bfloat16) == "xla"
    assert pick("auto", (3, 3, 256, 256), dtype=jnp.float64) == "xla"
    assert pick("auto", (3, 3, 256, 256), grads_auto=False) == "xla"
    # Through conv2d: a gradient formulation asked for by name keeps the usual VJP.
    x, w = jnp.ones((1, 4, 4, 256)), jnp.ones((3, 3, 256, 2))

    def jaxpr(**kwargs):
        return str(jax.make_jaxpr(jax.grad(lambda w: conv2d(x, w, padding=1, **kwargs).sum()))(w))

    assert jaxpr().count("dot_general") >= 16
    assert "conv_general_dilated" in jaxpr(weight_grad_impl="xla")
    assert jaxpr(weight_grad_impl="xla").count("dot_general") == 0
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert pick("auto", (3, 3, 256, 256)) == "xla"
    assert pick("auto", (5, 5, 256, 256)) == "xla"


@pytest.mark.parametrize("r", [3, 5])
def test_winograd_matches_torch(x64, r):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(26)
    x, w, b = (rng.standard_normal(s) for s in ((2, 9, 8, 3), (r, r, 3, 5), (5,)))
    f = functools.partial(conv2d, padding=r // 2, forward_impl="winograd")
    y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w), jnp.asarray(b))
    g = rng.standard_normal(y.shape)
    dx, dw, db = vjp(jnp.asarray(g))
    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    tw = torch.tensor(w.transpose(3, 2, 0, 1), requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    ty = torch.nn.functional.conv2d(tx, tw, tb, padding=r // 2)
    ty.backward(torch.tensor(g.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(y, ty.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-10,
                               atol=1e-10)
    np.testing.assert_allclose(dx, tx.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dw, tw.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(db, tb.grad.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("input_grad_impl", DGRAD_IMPLS)
@pytest.mark.parametrize("stride,padding,dilation", VJP_GRID)
def test_vjp_each_input_grad_impl_matches_lax_autodiff(x64, stride, padding, dilation,
                                                      input_grad_impl):
    _check_vjp_against_lax(stride, padding, dilation, [("native", "auto", input_grad_impl)])


def test_col2im_input_grad_crops_padding_and_unread_cells(x64):
    # Padding larger than the filter, stride 2, dilation 2: some offsets read only
    # padding (their cells are cropped) and trailing input cells are never read.
    rng = np.random.default_rng(16)
    x, w = jnp.asarray(rng.standard_normal((2, 7, 6, 3))), jnp.asarray(
        rng.standard_normal((3, 2, 3, 2)))
    for stride, padding, dilation in [(2, 3, 2), ((3, 2), ((4, 0), (0, 3)), 1), (1, 5, 3)]:
        f = functools.partial(conv2d, stride=stride, padding=padding, dilation=dilation,
                              input_grad_impl="col2im")
        y, vjp = jax.vjp(f, x, w)
        ref_f = functools.partial(conv_lax, stride=stride, padding=padding, dilation=dilation)
        ref, ref_vjp = jax.vjp(ref_f, x, w)
        np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
        g = jnp.asarray(rng.standard_normal(y.shape))
        np.testing.assert_allclose(vjp(g)[0], ref_vjp(g)[0], rtol=1e-10, atol=1e-12)


def test_per_image_input_grad_in_batch_chunks(x64, monkeypatch):
    # A small chunk budget splits the batch into chunks of 2-3 images (the last one
    # shorter); the result is lax autodiff's, strided, dilated and padded alike.
    # Images too large for two per chunk take the whole batch at once.
    monkeypatch.setattr(conv_module, "_DGRAD_CHUNK_BYTES", 3 * 8 * (9 * 8 * 3 + 5 * 4 * 4))
    rng = np.random.default_rng(19)
    x, w = jnp.asarray(rng.standard_normal((7, 9, 8, 3))), jnp.asarray(
        rng.standard_normal((3, 3, 3, 4)))
    for stride, padding, dilation in [(2, 1, 1), ((2, 3), ((2, 0), (1, 2)), 1), (2, 2, 2),
                                      (1, 1, 1)]:
        f = functools.partial(conv2d, stride=stride, padding=padding, dilation=dilation,
                              input_grad_impl="per_image")
        y, vjp = jax.vjp(f, x, w)
        ref, ref_vjp = jax.vjp(functools.partial(conv_lax, stride=stride, padding=padding,
                                                 dilation=dilation), x, w)
        g = jnp.asarray(rng.standard_normal(y.shape))
        np.testing.assert_allclose(vjp(g)[0], ref_vjp(g)[0], rtol=1e-10, atol=1e-12)

    def input_grad_convs(stride):
        _, vjp_x = jax.vjp(lambda x: conv2d(x, w, stride=stride, padding=1,
                                            input_grad_impl="per_image"), x)
        g = jnp.zeros(conv2d(x, w, stride=stride, padding=1).shape)
        return str(jax.make_jaxpr(vjp_x)(g)).count("lhs_dilation=(2, 2)")

    assert input_grad_convs(2) == 3  # chunks of 3, 3 and 1 images (float64, 5 x 4 outputs)
    monkeypatch.setattr(conv_module, "_DGRAD_CHUNK_BYTES", 8 * (9 * 8 * 3 + 5 * 4 * 4))
    assert input_grad_convs(2) == 1  # one image per chunk: the whole batch at once


def test_strided_filters_take_the_chunked_input_grad_on_cpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    pads = ((1, 1), (1, 1))
    assert conv_module._pick_grads("auto", "auto", (3, 3, 96, 96), pads, (2, 2))[0] == "per_image"
    assert conv_module._pick_grads("auto", "auto", (3, 3, 96, 96), pads, (1, 1))[0] == "xla"
    assert conv_module._pick_grads("xla", "auto", (3, 3, 96, 96), pads, (2, 2))[0] == "xla"
    assert conv_module._pick_grads("auto", "auto", (3, 3, 3, 96), pads, (2, 2))[0] == "col2im"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert conv_module._pick_grads("auto", "auto", (3, 3, 96, 96), pads, (2, 2))[0] == "xla"


def test_check_grads_order2_col2im(x64):
    rng = np.random.default_rng(17)
    x = jnp.asarray(rng.standard_normal((1, 6, 5, 2)))
    w = jnp.asarray(rng.standard_normal((3, 2, 2, 2)))
    check_grads(lambda x, w: conv2d(x, w, stride=2, padding=((1, 0), (2, 1)), dilation=(1, 2),
                                    input_grad_impl="col2im", weight_grad_impl="im2col"),
                (x, w), order=2, modes=["rev"])


def test_full_window_conv_is_one_matrix_product(x64):
    # LeNet-5's conv3: a 5x5 filter over a 5x5 map is a dense layer (output 1 x 1).
    rng = np.random.default_rng(18)
    x, w = jnp.asarray(rng.standard_normal((3, 5, 5, 4))), jnp.asarray(
        rng.standard_normal((5, 5, 4, 6)))
    y, vjp = jax.vjp(conv2d, x, w)
    ref, ref_vjp = jax.vjp(lambda x, w: conv_lax(x, w), x, w)
    assert y.shape == (3, 1, 1, 6)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    g = jnp.asarray(rng.standard_normal(y.shape))
    for got, want in zip(vjp(g), ref_vjp(g), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    check_grads(conv2d, (x, w), order=2, modes=["rev"])
    grad_jaxpr = str(jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(conv2d(x, w)), (0, 1)))(x, w))
    assert "conv_general_dilated" not in grad_jaxpr and "dot_general" in grad_jaxpr
    # Padding or a smaller filter keeps the convolution.
    assert "conv_general_dilated" in str(jax.make_jaxpr(lambda x: conv2d(x, w, padding=1))(x))


def test_small_patch_rule_picks_col2im_and_im2col_on_cpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert conv_module._pick_grads("auto", "auto", (5, 5, 6, 16)) == ("col2im", "stacked")
    # One input channel (LeNet-5's conv1): the banded weight gradient.
    assert conv_module._pick_grads("auto", "auto", (5, 5, 1, 6)) == ("col2im", "banded")
    assert conv_module._pick_grads("auto", "auto", (5, 5, 2, 6)) == ("col2im", "stacked")
    assert conv_module._pick_grads("auto", "auto", (3, 3, 1, 16))[1] == "banded"
    assert conv_module._pick_grads("auto", "auto", (3, 3, 1, 32))[1] == "stacked"
    # Zero padding: the stacked patch matrix loses to per-image gradients.
    assert conv_module._pick_grads("auto", "auto", (5, 5, 6, 16), ((2, 2), (2, 2))) == (
        "col2im", "per_image")
    assert conv_module._pick_grads("auto", "auto", (3, 3, 32, 64)) == ("xla", "per_image")
    assert conv_module._pick_grads("xla", "offsets", (5, 5, 1, 6)) == ("xla", "offsets")
    assert conv_module._pick_grads("auto", "auto", (5, 5, 1, 6), ((2, 2), (2, 2))) == (
        "col2im", "per_image")
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert conv_module._pick_grads("auto", "auto", (5, 5, 6, 16)) == ("xla", "xla")
    assert conv_module._pick_grads("auto", "auto", (5, 5, 1, 6)) == ("xla", "xla")


@pytest.mark.parametrize("wo,k,expected", [
    (28, 6, 7),     # LeNet-5's conv1: 7 x 6 = 42 columns; 14 x 6 = 84 is too many
    (10, 16, 2),    # 4 x 16 = 64 would fit, but 4 does not divide 10
    (28, 100, 1),   # one column is always allowed
    (23, 1, 23),    # a prime width: the whole row
    (13, 6, 1),     # a prime width too wide for one block
])
def test_band_block(wo, k, expected):
    assert conv_module._band_block(wo, k) == expected


def test_banded_weight_grad_against_numpy_loop():
    # dL/dw[a, b, c, k] = sum_{n, i, j} xp[n, i S + a D, j S + b D, c] g[n, i, j, k],
    # as loops, for LeNet-5's conv1 shape at a small batch (B_w = 7, four blocks).
    rng = np.random.default_rng(30)
    x, w = _rand(rng, (2, 32, 32, 1)), _rand(rng, (5, 5, 1, 6))
    g = _rand(rng, (2, 28, 28, 6))
    f = functools.partial(conv2d, weight_grad_impl="banded", input_grad_impl="xla")
    _, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
    ref = np.zeros((5, 5, 1, 6))
    for a in range(5):
        for b in range(5):
            patch = x[:, a : a + 28, b : b + 28, :].astype(np.float64)  # (N, 28, 28, 1)
            ref[a, b] = np.einsum("nijc,nijk->ck", patch, g.astype(np.float64))
    np.testing.assert_allclose(vjp(jnp.asarray(g))[1], ref, rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize("columns,chunk_bytes", [(1, None), (5, 1), (64, None), (1000, 1)])
@pytest.mark.parametrize("stride,padding,dilation", [
    (1, 0, 1), ((2, 3), ((2, 0), (1, 3)), (1, 2)), ((1, 2), 1, (3, 1)), (3, "SAME", 2)])
def test_banded_gradients_in_blocks(x64, monkeypatch, columns, chunk_bytes, stride, padding,
                                    dilation):
    # Block widths from one column to whole rows (the budget B_w K picks a divisor
    # of W_out), with strides, dilations and padding in both axes, the batch in one
    # chunk or one image per chunk: dL/dx, dL/dw and dL/db (taken from the same
    # product) against lax's autodiff.
    monkeypatch.setattr(conv_module, "_BAND_MAX_COLUMNS", columns)
    if chunk_bytes is not None:
        monkeypatch.setattr(conv_module, "_STACKED_CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(31)
    x = jnp.asarray(rng.standard_normal((2, 13, 17, 2)))
    w = jnp.asarray(rng.standard_normal((3, 2, 2, 5)))
    b = jnp.asarray(rng.standard_normal((5,)))
    f = functools.partial(conv2d, stride=stride, padding=padding, dilation=dilation,
                          weight_grad_impl="banded", input_grad_impl="banded")
    y, vjp = jax.vjp(f, x, w, b)
    ref, ref_vjp = jax.vjp(
        lambda x, w, b: conv_lax(x, w, stride, padding, dilation) + b, x, w, b)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    g = jnp.asarray(rng.standard_normal(y.shape))
    for got, want in zip(vjp(g), ref_vjp(g), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", [*WGRAD_IMPLS, "winograd"])
def test_bias_gradient_in_every_formulation(x64, impl):
    # The bias is part of the hand-written VJP: dL/db = sum of g over N, H, W in every
    # formulation, and the banded one takes it from its own product (no separate sum
    # over g in its gradient).
    rng = np.random.default_rng(32)
    x = jnp.asarray(rng.standard_normal((2, 8, 9, 1)))
    w = jnp.asarray(rng.standard_normal((3, 3, 1, 4)))
    b = jnp.asarray(rng.standard_normal((4,)))
    kwargs = ({"forward_impl": "winograd"} if impl == "winograd"
              else {"weight_grad_impl": impl, "input_grad_impl": "xla"})
    f = functools.partial(conv2d, **kwargs)
    y, vjp = jax.vjp(f, x, w, b)
    _, ref_vjp = jax.vjp(lambda x, w, b: conv_lax(x, w) + b, x, w, b)
    g = jnp.asarray(rng.standard_normal(y.shape))
    for got, want in zip(vjp(g), ref_vjp(g), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    check_grads(f, (x, w, b), order=2, modes=["rev"])
    jaxpr = str(jax.make_jaxpr(lambda x, w, b: jax.vjp(f, x, w, b)[1](g))(x, w, b))
    assert ("axes=(0, 1, 2)" in jaxpr) == (impl != "banded")


def test_row_col_rule_on_cpu(monkeypatch):
    # VGG-16's 64-input-channel layers at stride 1 take "row_col", and so do wide 1x1
    # filters; fewer input channels, the AlexNets' conv2 (5 x 192 or 5 x 256 shifted
    # rows of g), a stride, or another backend keep their formulation.
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    pads = ((1, 1), (1, 1))
    assert conv_module._pick_grads("auto", "auto", (3, 3, 64, 64), pads) == ("xla", "row_col")
    assert conv_module._pick_grads("auto", "auto", (3, 3, 64, 128), pads) == ("xla", "row_col")
    assert conv_module._pick_grads("auto", "auto", (1, 1, 512, 512))[1] == "row_col"
    assert conv_module._pick_grads("auto", "auto", (3, 3, 96, 256), pads)[1] == "row_col"
    assert conv_module._pick_grads("auto", "auto", (5, 5, 64, 192), pads)[1] == "per_image"
    assert conv_module._pick_grads("auto", "auto", (5, 5, 96, 256), pads)[1] == "per_image"
    assert conv_module._pick_grads("auto", "auto", (3, 3, 48, 96), pads)[1] == "per_image"
    assert conv_module._pick_grads("auto", "auto", (3, 3, 64, 64), pads, (2, 2))[1] == "per_image"
    assert conv_module._pick_grads("auto", "per_image", (3, 3, 64, 64), pads)[1] == "per_image"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert conv_module._pick_grads("auto", "auto", (3, 3, 64, 64), pads)[1] == "xla"


def _check_weight_grad(impl, x_shape, w_shape, stride, padding, dilation, seed):
    """dL/dw of conv2d with ``weight_grad_impl=impl`` against lax autodiff; returns (x, g)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(x_shape))
    w = jnp.asarray(rng.standard_normal(w_shape))
    f = functools.partial(conv2d, stride=stride, padding=padding, dilation=dilation,
                          weight_grad_impl=impl, input_grad_impl="xla")
    y, vjp = jax.vjp(f, x, w)
    ref_f = functools.partial(conv_lax, stride=stride, padding=padding, dilation=dilation)
    _, ref_vjp = jax.vjp(ref_f, x, w)
    g = jnp.asarray(rng.standard_normal(y.shape))
    np.testing.assert_allclose(vjp(g)[1], ref_vjp(g)[1], rtol=1e-10, atol=1e-10)
    return x, g


@pytest.mark.parametrize("shape,pixels,expected", [
    ((4, 224, 226), 2048, (1, 8)),     # VGG-16 block 1: 8 rows of 226 divide 224
    ((4, 112, 114), 2048, (1, 16)),    # block 2
    ((128, 32, 34), 2048, (1, 32)),    # one whole image per block
    ((128, 8, 10), 2048, (16, 8)),     # 25 images would fit; 16 divide the batch
    ((7, 8, 10), 2048, (7, 8)),        # the whole batch in one block
    ((2, 23, 10), 50, (1, 5)),         # 23 rows: no divisor near 5, a remainder of 3
])
def test_row_col_blocks(monkeypatch, shape, pixels, expected):
    monkeypatch.setattr(conv_module, "_ROW_COL_BLOCK_PIXELS", pixels)
    assert conv_module._row_col_blocks(*shape) == expected


@pytest.mark.parametrize("stride,padding,dilation,pixels", [
    (1, 1, 1, 2048), (1, 1, 1, 30), (1, ((2, 0), (1, 3)), (1, 2), 25),
    ((2, 1), ((2, 0), (1, 3)), (1, 2), 40), ((1, 3), 2, (2, 1), 16), (3, 0, 2, 1)])
def test_row_col_weight_grad_in_blocks(x64, monkeypatch, stride, padding, dilation, pixels):
    # The block budget decides the split: the whole batch in one block (2048); 13
    # output rows in blocks of 3 plus a remainder of 1 (30), or 7 rows at stride 2 in
    # blocks of 4 plus 3 (40), each remainder taken for the whole batch at once;
    # one-row blocks. Strides and dilations in both axes, asymmetric padding. The loop
    # takes two blocks per trip: 12 blocks, and odd counts (3, 9, 39) with one left.
    monkeypatch.setattr(conv_module, "_ROW_COL_BLOCK_PIXELS", pixels)
    _check_weight_grad("row_col", (3, 13, 6, 2), (3, 2, 2, 4), stride, padding, dilation, 23)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), ((2, 1), ((2, 0), (1, 3)), (1, 2)),
                                                     (3, 0, 2), (1, "SAME", (3, 1)),
                                                     (1, ((5, 4), (0, 1)), 1)])
def test_per_image_weight_grad_in_row_blocks(x64, monkeypatch, stride, padding, dilation):
    # One-byte budgets split every image into blocks of output rows (as large
    # images are); each block reads its own input rows and zero padding, the last
    # one ragged; with wide padding the first and last blocks read only zeros.
    monkeypatch.setattr(conv_module, "_CHUNK_BYTES", 1)
    monkeypatch.setattr(conv_module, "_ROW_BLOCK_BYTES", 1)
    monkeypatch.setattr(conv_module, "_MIN_BLOCK_PIXELS", 2)
    monkeypatch.setattr(conv_module, "_MAX_CHUNKS", 1000)
    x, g = _check_weight_grad("per_image", (2, 11, 7, 2), (3, 2, 2, 3), stride, padding,
                              dilation, 22)
    blocks = conv_module._row_blocks(x, g, conv_module.to_pair(stride, "s"))
    assert len(blocks) > 1 and blocks[0][0] == 0 and blocks[-1][1] == g.shape[1]


@pytest.mark.parametrize("stride,dilation", [((1, 1), (1, 1)), ((2, 1), (1, 2)), ((3, 2), (2, 1))])
def test_patch_rows_against_numpy_loop(stride, dilation):
    # Row (a, b, c) of the stacked weight gradient's patches is channel c of the
    # window at filter offset (a, b); built from F_h + F_w slices, not F_h F_w.
    rng = np.random.default_rng(5)
    xp = rng.standard_normal((2, 11, 10, 3)).astype(np.float32)
    fh, fw = 3, 2
    ho = (11 - dilation[0] * (fh - 1) - 1) // stride[0] + 1
    wo = (10 - dilation[1] * (fw - 1) - 1) // stride[1] + 1
    rows = conv_module._patch_rows(jnp.asarray(xp), (ho, wo), (fh, fw), stride, dilation)
    ref = np.zeros((fh, fw, 3, 2, ho, wo), np.float32)
    for a in range(fh):
        for b in range(fw):
            for i in range(ho):
                for j in range(wo):
                    ref[a, b, :, :, i, j] = xp[:, i * stride[0] + a * dilation[0],
                                               j * stride[1] + b * dilation[1], :].T
    np.testing.assert_array_equal(np.asarray(rows), ref)
    jaxpr = str(jax.make_jaxpr(lambda x: conv_module._patch_rows(
        x, (ho, wo), (fh, fw), stride, dilation))(jnp.asarray(xp)))
    assert jaxpr.count(" slice[") == fh + fw


def test_stacked_weight_grad_in_batch_chunks(x64, monkeypatch):
    # A one-byte budget makes every image its own chunk; the chunk sums must add up.
    monkeypatch.setattr(conv_module, "_STACKED_CHUNK_BYTES", 1)
    rng = np.random.default_rng(21)
    x = jnp.asarray(rng.standard_normal((3, 8, 7, 2)))
    w = jnp.asarray(rng.standard_normal((3, 2, 2, 4)))
    f = functools.partial(conv2d, stride=(2, 1), padding=1, dilation=(1, 2),
                          weight_grad_impl="stacked", input_grad_impl="xla")
    y, vjp = jax.vjp(f, x, w)
    ref, ref_vjp = jax.vjp(lambda x, w: conv_lax(x, w, (2, 1), 1, (1, 2)), x, w)
    g = jnp.asarray(rng.standard_normal(y.shape))
    np.testing.assert_allclose(vjp(g)[1], ref_vjp(g)[1], rtol=1e-10, atol=1e-10)
    grad_jaxpr = str(jax.make_jaxpr(lambda x, w: jax.vjp(f, x, w)[1](g))(x, w))
    assert grad_jaxpr.count("dot_general") == 3


def test_im2col_blocked_weight_grad(x64, monkeypatch):
    # Real blocks only appear for large inputs; shrink the block budget so that a
    # small input is split into several image and row blocks, with a ragged last one:
    # here H_out = W_out = 5, so 3 images x 3 blocks of 2 output rows (the last one half).
    monkeypatch.setattr(conv_module, "_IM2COL_BLOCK_BYTES", 1)
    monkeypatch.setattr(conv_module, "_IM2COL_MIN_ROWS", 12)
    rng = np.random.default_rng(15)
    x = jnp.asarray(rng.standard_normal((3, 9, 5, 2)))
    w = jnp.asarray(rng.standard_normal((3, 2, 2, 3)))
    stride, dilation = (2, 1), (1, 2)
    f = functools.partial(conv2d, stride=stride, padding=1, dilation=dilation,
                          weight_grad_impl="im2col")
    y, vjp = jax.vjp(f, x, w)
    ref, ref_vjp = jax.vjp(lambda x, w: conv_lax(x, w, stride, 1, dilation), x, w)
    g = jnp.asarray(rng.standard_normal(y.shape))
    np.testing.assert_allclose(vjp(g)[1], ref_vjp(g)[1], rtol=1e-10, atol=1e-10)
    # The blocked path (a loop over blocks) really ran.
    jaxpr = str(jax.make_jaxpr(lambda x, w: jax.vjp(f, x, w)[1](g))(x, w))
    assert "while" in jaxpr or "scan" in jaxpr


def test_vjp_is_the_hand_written_rule():
    # The custom VJP is what jax.grad uses: its jaxpr contains a custom_vjp call.
    x, w = jnp.ones((1, 4, 4, 1), jnp.float32), jnp.ones((2, 2, 1, 1), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda x, w: conv2d(x, w))(x, w))
    assert "custom_vjp" in jaxpr


CHECK_GRID = list(itertools.product([1, 2], [((1, 0), (2, 1)), "SAME"], [1, 2]))


@pytest.mark.parametrize("stride,padding,dilation", CHECK_GRID)
def test_check_grads_order2(x64, stride, padding, dilation):
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((1, 6, 5, 2)))
    w = jnp.asarray(rng.standard_normal((3, 2, 2, 2)))

    def f(x, w):
        return conv2d(x, w, stride=stride, padding=padding, dilation=dilation)

    check_grads(f, (x, w), order=2, modes=["rev"])


@pytest.mark.parametrize(
    "dilation_impl,weight_grad_impl",
    [("space_to_batch", "auto")] + [("native", wg) for wg in WGRAD_IMPLS],
)
def test_check_grads_order2_other_impls(x64, dilation_impl, weight_grad_impl):
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((1, 6, 5, 2)))
    w = jnp.asarray(rng.standard_normal((2, 2, 2, 2)))

    def f(x, w):
        return conv2d(x, w, padding=((1, 0), (0, 2)), dilation=2,
                      dilation_impl=dilation_impl, weight_grad_impl=weight_grad_impl)

    check_grads(f, (x, w), order=2, modes=["rev"])


# --------------------------------------------------------------------------- bias, transforms


def test_bias_added_per_filter():
    rng = np.random.default_rng(8)
    x, w = _rand(rng, (2, 5, 5, 3)), _rand(rng, (3, 3, 3, 4))
    b = np.array([1.0, -2.0, 0.5, 10.0], np.float32)
    y = conv2d(x, w, b, padding=1)
    np.testing.assert_allclose(y, conv_lax(x, w, 1, 1, 1) + b, rtol=1e-5, atol=1e-5)


def test_grad_wrt_x_w_bias(x64):
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 2)))
    w = jnp.asarray(rng.standard_normal((3, 3, 2, 3)))
    b = jnp.asarray(rng.standard_normal((3,)))

    def loss(x, w, b):
        return jnp.sum(jnp.tanh(conv2d(x, w, b, stride=2, padding=1)) ** 2)

    def ref_loss(x, w, b):
        return jnp.sum(jnp.tanh(conv_lax(x, w, 2, 1, 1) + b) ** 2)

    got = jax.grad(loss, argnums=(0, 1, 2))(x, w, b)
    want = jax.grad(ref_loss, argnums=(0, 1, 2))(x, w, b)
    for g_, w_ in zip(got, want, strict=True):
        np.testing.assert_allclose(g_, w_, rtol=1e-10, atol=1e-12)
    # dL/db is the sum of dL/dy over batch and positions.
    y = conv_lax(x, w, 2, 1, 1) + b
    gy = 2 * jnp.tanh(y) * (1 - jnp.tanh(y) ** 2)
    np.testing.assert_allclose(got[2], gy.sum(axis=(0, 1, 2)), rtol=1e-10)


def test_jit_matches_eager():
    rng = np.random.default_rng(10)
    x, w = _rand(rng, (2, 8, 7, 3)), _rand(rng, (3, 3, 3, 2))
    f = jax.jit(functools.partial(conv2d, stride=2, padding="SAME", dilation=(1, 2)))
    np.testing.assert_allclose(f(x, w), conv_lax(x, w, 2, "SAME", (1, 2)), rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=1))(x, w)
    g_ref = jax.grad(lambda x, w: jnp.sum(conv_lax(x, w, 2, "SAME", (1, 2)) ** 2), argnums=1)(x, w)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_vmap_over_extra_leading_axis():
    rng = np.random.default_rng(11)
    xs, w = _rand(rng, (3, 2, 6, 6, 2)), _rand(rng, (3, 3, 2, 4))
    f = functools.partial(conv2d, stride=1, padding=1, dilation=2)
    ys = jax.vmap(f, in_axes=(0, None))(xs, w)
    assert ys.shape == (3, 2, 4, 4, 4)
    for i in range(3):
        np.testing.assert_allclose(ys[i], conv_lax(xs[i], w, 1, 1, 2), rtol=1e-5, atol=1e-5)
    # vmap over a stack of kernels, and grad through vmap.
    ws = _rand(rng, (2, 3, 3, 2, 4))
    yk = jax.vmap(f, in_axes=(None, 0))(xs[0], ws)
    for i in range(2):
        np.testing.assert_allclose(yk[i], conv_lax(xs[0], ws[i], 1, 1, 2), rtol=1e-5, atol=1e-5)
    dxs = jax.grad(lambda xs: jnp.sum(jax.vmap(f, in_axes=(0, None))(xs, w) ** 2))(xs)
    dxs_ref = jax.grad(lambda xs: sum(jnp.sum(conv_lax(xs[i], w, 1, 1, 2) ** 2)
                                      for i in range(3)))(xs)
    np.testing.assert_allclose(dxs, dxs_ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- dtypes


def test_float32_and_float64(x64):
    rng = np.random.default_rng(12)
    x, w = rng.standard_normal((1, 6, 6, 2)), rng.standard_normal((3, 3, 2, 2))
    for dtype in (jnp.float32, jnp.float64):
        y = conv2d(jnp.asarray(x, dtype), jnp.asarray(w, dtype), padding=1)
        assert y.dtype == dtype
        tol = 1e-5 if dtype == jnp.float32 else 1e-12
        np.testing.assert_allclose(y, conv_numpy(x, w, 1, 1, 1), rtol=tol, atol=tol)
        dx, dw = jax.grad(lambda x, w: jnp.sum(conv2d(x, w, padding=1)), argnums=(0, 1))(
            jnp.asarray(x, dtype), jnp.asarray(w, dtype))
        assert dx.dtype == dtype and dw.dtype == dtype


@pytest.mark.parametrize("weight_grad_impl", WGRAD_IMPLS)
def test_bfloat16(weight_grad_impl):
    rng = np.random.default_rng(13)
    x = jnp.asarray(_rand(rng, (2, 7, 7, 4)), jnp.bfloat16)
    w = jnp.asarray(_rand(rng, (3, 3, 4, 3)), jnp.bfloat16)
    b = jnp.asarray(_rand(rng, (3,)), jnp.bfloat16)
    f = functools.partial(conv2d, stride=2, padding=1, dilation=1,
                          weight_grad_impl=weight_grad_impl)
    y = f(x, w, b)
    assert y.dtype == jnp.bfloat16
    x32, w32, b32 = (a.astype(jnp.float32) for a in (x, w, b))
    ref = conv_lax(x32, w32, 2, 1, 1) + b32
    np.testing.assert_allclose(y.astype(jnp.float32), ref, rtol=3e-2, atol=1e-1)
    dx, dw = jax.grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) ** 2), argnums=(0, 1))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    rdx, rdw = jax.grad(lambda x, w: jnp.sum(conv_lax(x, w, 2, 1, 1) ** 2), argnums=(0, 1))(
        x32, w32)
    # Loose: y is rounded to bf16 before the loss, so compare relative to the scale.
    for got, want in ((dx, rdx), (dw, rdw)):
        err = np.max(np.abs(np.asarray(got, np.float32) - np.asarray(want)))
        assert err <= 3e-2 * np.max(np.abs(np.asarray(want))), err


def test_mixed_and_integer_dtypes():
    x = jnp.ones((1, 4, 4, 1), jnp.float32)
    w = jnp.ones((2, 2, 1, 1), jnp.bfloat16)
    assert conv2d(x, w).dtype == jnp.float32
    xi = jnp.ones((1, 4, 4, 1), jnp.int32)
    wi = jnp.ones((2, 2, 1, 1), jnp.int32)
    y = conv2d(xi, wi)
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(y, np.full((1, 3, 3, 1), 4.0))


# --------------------------------------------------------------------------- errors


X4 = np.zeros((1, 5, 5, 3), np.float32)
W4 = np.zeros((3, 3, 3, 2), np.float32)


@pytest.mark.parametrize(
    "x, w, kwargs, pattern",
    [
        (X4[0], W4, {}, r"conv2d: x must be a 4-D NHWC array .* got shape \(5, 5, 3\)"),
        (X4, W4[0], {}, r"conv2d: kernel must be 4-D HWIO .* got shape \(3, 3, 2\)"),
        (X4, np.zeros((3, 3, 2, 2), np.float32), {},
         r"conv2d: x has 3 channels but the kernel expects C_in = 2"),
        (X4, W4, {"bias": np.zeros((3,), np.float32)},
         r"conv2d: bias must have shape \(2,\) .* got \(3,\)"),
        (X4, W4, {"bias": np.zeros((1, 2), np.float32)}, r"bias must have shape \(2,\)"),
        (X4, W4, {"stride": 0}, r"stride must be >= 1, got 0"),
        (X4, W4, {"stride": (1, 0)}, r"stride must be >= 1, got 0"),
        (X4, W4, {"dilation": 0}, r"dilation must be >= 1, got 0"),
        (X4, W4, {"padding": -1}, r"padding must be >= 0, got -1"),
        (X4, W4, {"padding": ((0, 0), (1, -1))}, r"padding must be >= 0, got -1"),
        (X4, W4, {"padding": "FULL"}, r"padding must be an int, a pair, 'SAME' or 'VALID'"),
        (X4, W4, {"dilation_impl": "fft"}, r"conv2d: dilation_impl must be one of .*'fft'"),
        (X4, W4, {"weight_grad_impl": "fft"},
         r"conv2d: weight_grad_impl must be one of .*'fft'"),
        (X4, W4, {"forward_impl": "fft"}, r"conv2d: forward_impl must be one of .*'fft'"),
        (X4, W4, {"forward_impl": "winograd", "stride": 2},
         r"conv2d: forward_impl='winograd' needs a 3x3 or 5x5 filter at stride 1 and dilation 1, "
         r"got a 3x3 filter, stride \(2, 2\), dilation \(1, 1\); use forward_impl='auto'"),
        (X4, np.zeros((2, 3, 3, 2), np.float32), {"forward_impl": "winograd"},
         r"forward_impl='winograd' needs a 3x3 or 5x5 filter .* got a 2x3 filter"),
        (X4, np.zeros((7, 7, 3, 2), np.float32), {"forward_impl": "winograd", "padding": 3},
         r"forward_impl='winograd' needs a 3x3 or 5x5 filter .* got a 7x7 filter"),
        (X4, W4, {"forward_impl": "winograd", "dilation": (1, 2)},
         r"forward_impl='winograd' needs .* dilation \(1, 2\)"),
        (X4, W4, {"input_grad_impl": "fft"},
         r"conv2d: input_grad_impl must be one of .*'fft'"),
    ],
)
def test_errors_name_the_argument(x, w, kwargs, pattern):
    kwargs = dict(kwargs)
    bias = kwargs.pop("bias", None)
    with pytest.raises(ValueError, match=pattern):
        conv2d(x, w, bias, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"dilation": 3}, {"padding": 0, "stride": 2}],
)
def test_kernel_larger_than_padded_input(kwargs):
    x = np.zeros((1, 4, 6, 1), np.float32)
    w = np.zeros((5, 3, 1, 1), np.float32)
    with pytest.raises(ShapeError, match=r"conv2d \(height\).*larger than the padded input of 4"):
        conv2d(x, w, **kwargs)


def test_kernel_fits_after_padding():
    x = np.ones((1, 4, 4, 1), np.float32)
    w = np.ones((5, 5, 1, 1), np.float32)
    # (4 - 5 + 2) / 1 + 1 = 2
    np.testing.assert_allclose(conv2d(x, w, padding=1), conv_lax(x, w, 1, 1, 1))


# --------------------------------------------------------------------------- property tests


@st.composite
def conv_cases(draw):
    fh, fw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    kind = draw(st.sampled_from(["int", "pair", "explicit", "SAME", "VALID"]))
    if kind == "int":
        padding = draw(st.integers(0, 2))
    elif kind == "pair":
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    elif kind == "explicit":
        padding = tuple((draw(st.integers(0, 3)), draw(st.integers(0, 3))) for _ in range(2))
    else:
        padding = kind
    pads = explicit_pads(padding, (100, 100), (fh, fw), stride, dilation)
    hw = []
    for f, d, p in zip((fh, fw), dilation, pads, strict=True):
        need = max(1, d * (f - 1) + 1 - sum(p)) if kind != "SAME" else 1
        hw.append(draw(st.integers(need, need + 6)))
    n, c, k = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    impls = (draw(st.sampled_from(["auto", "native", "space_to_batch", "direct"])),
             draw(st.sampled_from(["auto", *WGRAD_IMPLS])),
             draw(st.sampled_from(["auto", *DGRAD_IMPLS])))
    seed = draw(st.integers(0, 2**16))
    return (n, *hw, c), (fh, fw, c, k), stride, padding, dilation, impls, seed


@settings(max_examples=6, deadline=None)
@given(case=conv_cases())
def test_property_forward_and_vjp_match_lax(case):
    x_shape, w_shape, stride, padding, dilation, (dil_impl, wg_impl, dg_impl), seed = case
    with jax.enable_x64(True):
        rng = np.random.default_rng(seed)
        x = jnp.asarray(rng.standard_normal(x_shape))
        w = jnp.asarray(rng.standard_normal(w_shape))
        f = functools.partial(conv2d, stride=stride, padding=padding, dilation=dilation,
                              dilation_impl="auto" if dil_impl == "direct" else dil_impl,
                              forward_impl="direct" if dil_impl == "direct" else "xla",
                              weight_grad_impl=wg_impl, input_grad_impl=dg_impl)
        y, vjp = jax.vjp(f, x, w)
        ref, ref_vjp = jax.vjp(lambda x, w: conv_lax(x, w, stride, padding, dilation), x, w)
        assert y.shape == ref.shape
        np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)
        g = jnp.asarray(rng.standard_normal(y.shape))
        for got, want in zip(vjp(g), ref_vjp(g), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- PyTorch


TORCH_CASES = [(1, 0, 1), (2, 1, 2), (3, (1, 2), (2, 1)), ((2, 1), 1, 3)]


@pytest.mark.parametrize("stride,padding,dilation", TORCH_CASES)
def test_matches_torch_forward_and_gradients(x64, stride, padding, dilation):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(14)
    x, w = rng.standard_normal((2, 8, 7, 3)), rng.standard_normal((3, 2, 3, 4))
    b = rng.standard_normal((4,))
    f = functools.partial(conv2d, stride=stride, padding=padding, dilation=dilation)
    y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w), jnp.asarray(b))
    g = rng.standard_normal(y.shape)
    dx, dw, db = vjp(jnp.asarray(g))

    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)  # NHWC -> NCHW
    tw = torch.tensor(w.transpose(3, 2, 0, 1), requires_grad=True)  # HWIO -> OIHW
    tb = torch.tensor(b, requires_grad=True)
    ty = torch.nn.functional.conv2d(tx, tw, tb, stride=stride, padding=padding,
                                    dilation=dilation)
    ty.backward(torch.tensor(g.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(y, ty.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-10,
                               atol=1e-10)
    np.testing.assert_allclose(dx, tx.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dw, tw.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(db, tb.grad.numpy(), rtol=1e-10, atol=1e-10)
