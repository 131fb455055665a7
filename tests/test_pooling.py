"""Max, average, L2 and global pooling against numpy loops and PyTorch."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from cnnjax.ops import avg_pool, global_avg_pool, global_max_pool, l2_pool, max_pool
from cnnjax.ops import pooling as pooling_module
from cnnjax.shapes import ShapeError

# --------------------------------------------------------------------------- reference


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _explicit_pads(padding, hw, window, stride):
    if isinstance(padding, str):
        if padding == "VALID":
            return ((0, 0), (0, 0))
        pads = []  # TensorFlow's SAME: output ceil(W / S)
        for n, f, s in zip(hw, window, stride, strict=True):
            out = -(-n // s)
            total = max((out - 1) * s + f - n, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    if isinstance(padding[0], int):
        return ((padding[0], padding[0]), (padding[1], padding[1]))
    return tuple(tuple(p) for p in padding)


def pool_numpy(x, kind, window, stride=None, padding=0, count_include_pad=True):
    """Loops over output cells; each window is clipped to the real input."""
    x = np.asarray(x, np.float64)
    (fh, fw) = _pair(window)
    (sh, sw) = (fh, fw) if stride is None else _pair(stride)
    (pt, pb), (pl, pr) = _explicit_pads(padding, x.shape[1:3], (fh, fw), (sh, sw))
    n, h, w, c = x.shape
    ho, wo = (h + pt + pb - fh) // sh + 1, (w + pl + pr - fw) // sw + 1
    y = np.empty((n, ho, wo, c))
    for i in range(ho):
        for j in range(wo):
            r0, c0 = i * sh - pt, j * sw - pl
            win = x[:, max(r0, 0) : min(r0 + fh, h), max(c0, 0) : min(c0 + fw, w), :]
            if kind == "max":
                y[:, i, j] = win.max(axis=(1, 2))
            elif kind == "avg":
                count = fh * fw if count_include_pad else win.shape[1] * win.shape[2]
                y[:, i, j] = win.sum(axis=(1, 2)) / count
            else:  # "l2": sqrt of the SUM of squares (padded zeros add nothing)
                y[:, i, j] = np.sqrt((win**2).sum(axis=(1, 2)))
    return y


POOLS = {
    "max": max_pool,
    "avg": avg_pool,
    "avg_excl": functools.partial(avg_pool, count_include_pad=False),
    "l2": l2_pool,
}


def _ref(name, x, window, stride=None, padding=0):
    kind = "avg" if name.startswith("avg") else name
    return pool_numpy(x, kind, window, stride, padding, count_include_pad=name != "avg_excl")


def distinct_values(rng, shape):
    """Inputs without ties (spaced 0.1 apart), so that the max has a unique winner."""
    return (rng.permutation(np.prod(shape)).reshape(shape) * 0.1 - 2.0).astype(np.float64)


# --------------------------------------------------------------------------- forward


GRID = list(itertools.product([3, (2, 3)], [None, 2, (1, 2)], [0, ((0, 1), (1, 0)), "SAME"]))


@pytest.mark.parametrize("window,stride,padding", GRID)
def test_pools_match_numpy(x64, window, stride, padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 8, 3))
    for name, pool in POOLS.items():
        y = pool(jnp.asarray(x), window, stride, padding)
        ref = _ref(name, x, window, stride, padding)
        assert y.shape == ref.shape, name
        assert y.dtype == jnp.float64
        np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("impl", ["slices", "reduce_window"])
@pytest.mark.parametrize("window,stride,padding", GRID)
def test_window_sum_impls_match_numpy_with_derivatives(x64, impl, window, stride, padding):
    # Both ways of summing a window: the values, the VJP against lax's own
    # reduce_window autodiff, and forward mode through the custom JVP.
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 7, 8, 3)))
    dims, strides, pads = pooling_module._window_args(x, window, stride, padding, "test")
    total = pooling_module._window_sum(x, dims, strides, pads, impl)
    area = dims[1] * dims[2]
    np.testing.assert_allclose(total / area, pool_numpy(x, "avg", window, stride, padding),
                               rtol=1e-12, atol=1e-12)

    def lax_sum(v):
        return jax.lax.reduce_window(v, 0.0, jax.lax.add, dims, strides, pads)

    g = jnp.asarray(rng.standard_normal(total.shape))
    mine = jax.vjp(lambda v: pooling_module._window_sum(v, dims, strides, pads, impl), x)[1](g)
    np.testing.assert_allclose(mine[0], jax.vjp(lax_sum, x)[1](g)[0], rtol=1e-12, atol=1e-12)
    t = jnp.asarray(rng.standard_normal(x.shape))
    y, dy = jax.jvp(lambda v: pooling_module._window_sum(v, dims, strides, pads, impl), (x,), (t,))
    np.testing.assert_allclose(y, total, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dy, lax_sum(t), rtol=1e-12, atol=1e-12)


def test_avg_pool_sums_small_windows_as_slices_on_cpu(monkeypatch):
    # The rule: on the CPU a window of up to 16 cells is summed as strided slices
    # (no reduce_window in the forward pass), larger windows by reduce_window; under
    # differentiation the sum goes through reduce_window whatever the size.
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    x = jnp.ones((1, 8, 8, 2), jnp.float32)
    assert "reduce_window" not in str(jax.make_jaxpr(lambda v: avg_pool(v, 2))(x))
    assert "reduce_window" in str(jax.make_jaxpr(lambda v: avg_pool(v, 5, 1))(x))
    grad_jaxpr = str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(avg_pool(v, 2) ** 2)))(x))
    assert "reduce_window" in grad_jaxpr
    # There the primal of an unpadded input is summed over rows by a reduce_window on
    # the (N, H, W C) view, then over columns by slices; padded, by one reduce_window.
    assert "window_dimensions=(1, 2, 1)" in grad_jaxpr
    padded = str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(avg_pool(v, 2, 2, 1) ** 2)))(x))
    assert "window_dimensions=(1, 2, 1)" not in padded
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert "reduce_window" in str(jax.make_jaxpr(lambda v: avg_pool(v, 2))(x))


@pytest.mark.parametrize("table", [{"cpu": 16}, {}])
@pytest.mark.parametrize("window,stride,padding", GRID)
def test_max_pool_slices_and_reduce_window_agree(x64, monkeypatch, table, window, stride,
                                                 padding):
    # Both ways of taking a window's maximum (strided slices on the CPU for small
    # windows, reduce_window otherwise): values against the numpy loop, -inf padding,
    # NaN propagation, and the gradient against lax's own reduce_window autodiff.
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.setattr(pooling_module, "SLICE_MAX_WINDOW_BY_BACKEND", table)
    lax_stride = window if stride is None else stride
    rng = np.random.default_rng(2)
    x = distinct_values(rng, (2, 7, 8, 3))
    y = max_pool(jnp.asarray(x), window, stride, padding)
    np.testing.assert_array_equal(y, pool_numpy(x, "max", window, stride, padding))
    xn = x.copy()
    xn[0, 3, 4, 1] = np.nan
    yn = np.asarray(max_pool(jnp.asarray(xn), window, stride, padding))
    np.testing.assert_array_equal(np.isnan(yn), np.isnan(np.asarray(
        _max_pool_lax(jnp.asarray(xn), window, lax_stride, padding))))
    assert np.isnan(yn).any()
    g = jnp.asarray(rng.standard_normal(y.shape))
    mine = jax.vjp(lambda v: max_pool(v, window, stride, padding), jnp.asarray(x))[1](g)[0]
    ref = jax.vjp(lambda v: _max_pool_lax(v, window, lax_stride, padding),
                  jnp.asarray(x))[1](g)[0]
    np.testing.assert_array_equal(mine, ref)


def test_max_pool_takes_small_windows_as_slices_on_cpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    x = jnp.ones((1, 8, 8, 2), jnp.float32)
    assert "reduce_window" not in str(jax.make_jaxpr(lambda v: max_pool(v, 3, 2))(x))
    assert "reduce_window" in str(jax.make_jaxpr(lambda v: max_pool(v, 5, 1))(x))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert "reduce_window" in str(jax.make_jaxpr(lambda v: max_pool(v, 2))(x))


def test_overlapping_pool_window3_stride2(x64, rng):
    # AlexNet's overlapping pooling: 55 -> 27 (and 13 -> 6 on this small input).
    x = rng.standard_normal((1, 13, 13, 2))
    for name, pool in POOLS.items():
        y = pool(jnp.asarray(x), 3, 2)
        assert y.shape == (1, 6, 6, 2)
        np.testing.assert_allclose(y, _ref(name, x, 3, 2), rtol=1e-12, err_msg=name)
    assert max_pool(jnp.zeros((1, 55, 55, 1)), 3, 2).shape == (1, 27, 27, 1)


def test_stride_defaults_to_window(rng):
    x = rng.standard_normal((1, 6, 9, 2)).astype(np.float32)
    for pool in POOLS.values():
        y = pool(x, (2, 3))
        assert y.shape == (1, 3, 3, 2)
        np.testing.assert_array_equal(y, pool(x, (2, 3), (2, 3)))
    # non-overlapping 2x2 max by reshaping, independent of any window code
    want = x.reshape(1, 3, 2, 3, 3, 2).max(axis=(2, 4))
    np.testing.assert_array_equal(max_pool(x, (2, 3)), want)


def test_max_pool_padding_never_wins():
    x = -np.ones((1, 2, 2, 1), np.float32)  # all negative: zero padding would win
    y = max_pool(x, 2, 1, padding=1)
    assert y.shape == (1, 3, 3, 1)
    np.testing.assert_array_equal(y, -np.ones((1, 3, 3, 1)))


def test_avg_pool_count_include_pad():
    x = np.ones((1, 2, 2, 1), np.float32)
    inc = avg_pool(x, 2, 1, padding=1)
    exc = avg_pool(x, 2, 1, padding=1, count_include_pad=False)
    # corners see 1 real cell of 4, edges 2, the centre 4
    np.testing.assert_allclose(inc[0, :, :, 0], [[0.25, 0.5, 0.25], [0.5, 1, 0.5],
                                                 [0.25, 0.5, 0.25]])
    np.testing.assert_allclose(exc, np.ones((1, 3, 3, 1)))


def test_l2_pool_is_sqrt_of_sum_not_mean():
    x = np.full((1, 2, 2, 1), 3.0, np.float32)
    # sqrt(4 * 9) = 6 (a mean would give 3)
    np.testing.assert_allclose(l2_pool(x, 2), [[[[6.0]]]])


def test_global_pools(x64, rng):
    x = rng.standard_normal((2, 5, 4, 3))
    np.testing.assert_allclose(global_avg_pool(jnp.asarray(x)), x.mean(axis=(1, 2)), rtol=1e-12)
    np.testing.assert_array_equal(global_max_pool(jnp.asarray(x)), x.max(axis=(1, 2)))
    assert global_avg_pool(jnp.asarray(x), keepdims=True).shape == (2, 1, 1, 3)
    assert global_max_pool(jnp.asarray(x), keepdims=True).shape == (2, 1, 1, 3)
    np.testing.assert_allclose(global_avg_pool(jnp.asarray(x), keepdims=True),
                               x.mean(axis=(1, 2), keepdims=True), rtol=1e-12)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", list(POOLS))
def test_check_grads_order2(x64, name):
    rng = np.random.default_rng(1)
    x = jnp.asarray(distinct_values(rng, (1, 5, 6, 2)))
    pool = POOLS[name]
    check_grads(lambda x: pool(x, 3, 2, ((1, 0), (0, 1))), (x,), order=2, modes=["rev"])


@pytest.mark.parametrize("pool", [global_avg_pool, global_max_pool])
def test_check_grads_order2_global(x64, pool):
    x = jnp.asarray(distinct_values(np.random.default_rng(2), (2, 3, 3, 2)))
    check_grads(pool, (x,), order=2, modes=["rev"])


def test_max_pool_grad_routes_to_the_winner(x64):
    x = distinct_values(np.random.default_rng(3), (1, 4, 4, 1))
    dx = jax.grad(lambda x: jnp.sum(max_pool(x, 2)))(jnp.asarray(x))
    want = np.zeros_like(x)
    for i in range(2):
        for j in range(2):
            block = x[0, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, 0]
            a, b = np.unravel_index(np.argmax(block), (2, 2))
            want[0, 2 * i + a, 2 * j + b, 0] = 1.0
    np.testing.assert_array_equal(dx, want)


def test_avg_pool_grad_is_one_over_count(x64):
    x = jnp.ones((1, 2, 2, 1), jnp.float64)
    d_inc = jax.grad(lambda x: jnp.sum(avg_pool(x, 2, 1, padding=1)))(x)
    d_exc = jax.grad(lambda x: jnp.sum(avg_pool(x, 2, 1, padding=1, count_include_pad=False)))(x)
    # each input cell sits in 4 windows: inclusive 4 * 1/4; exclusive 1/1 + 1/2 + 1/2 + 1/4
    np.testing.assert_allclose(d_inc, np.full((1, 2, 2, 1), 1.0))
    np.testing.assert_allclose(d_exc, np.full((1, 2, 2, 1), 2.25))


def test_l2_pool_gradient_at_all_zero_window_is_zero(x64):
    x = np.zeros((1, 4, 4, 1))
    x[0, 2:, 2:, 0] = [[1.0, 2.0], [2.0, 4.0]]  # one non-zero window of four, norm 5
    dx = np.asarray(jax.grad(lambda x: jnp.sum(l2_pool(x, 2)))(jnp.asarray(x)))
    assert np.all(np.isfinite(dx))
    want = np.zeros_like(x)
    want[0, 2:, 2:, 0] = x[0, 2:, 2:, 0] / 5.0  # d||v|| / dv = v / ||v||
    np.testing.assert_allclose(dx, want, rtol=1e-12, atol=0)
    dz = jax.grad(lambda x: jnp.sum(l2_pool(x, 2, 1, padding=1)))(jnp.zeros((1, 3, 3, 2)))
    assert np.all(np.asarray(dz) == 0)


def test_l2_pool_second_order_at_zero_is_finite(x64):
    x = jnp.zeros((1, 2, 2, 1))
    hvp = jax.jvp(jax.grad(lambda x: jnp.sum(l2_pool(x, 2))), (x,), (jnp.ones_like(x),))[1]
    assert np.all(np.isfinite(np.asarray(hvp)))


# --------------------------------------------------------------------------- dtypes, transforms


@pytest.mark.parametrize("name", list(POOLS))
def test_float32_and_bfloat16(rng, name):
    x = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
    pool = POOLS[name]
    y32 = pool(jnp.asarray(x), 3, 2, 1)
    assert y32.dtype == jnp.float32
    ref = _ref(name, x, 3, 2, 1)
    np.testing.assert_allclose(y32, ref, rtol=1e-5, atol=1e-6)
    xb = jnp.asarray(x, jnp.bfloat16)
    yb = pool(xb, 3, 2, 1)
    assert yb.dtype == jnp.bfloat16
    ref_b = _ref(name, np.asarray(xb, np.float32), 3, 2, 1)
    np.testing.assert_allclose(np.asarray(yb, np.float32), ref_b, rtol=1e-2, atol=1e-2)
    dx = jax.grad(lambda x: jnp.sum(pool(x, 3, 2, 1).astype(jnp.float32)))(xb)
    assert dx.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(dx, np.float32)))


def test_global_pool_dtypes(rng):
    x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        xa = jnp.asarray(x, dtype)
        assert global_avg_pool(xa).dtype == dtype
        assert global_max_pool(xa).dtype == dtype
        np.testing.assert_allclose(np.asarray(global_avg_pool(xa), np.float32),
                                   np.asarray(xa, np.float32).mean(axis=(1, 2)), rtol=1e-2,
                                   atol=1e-2)


def test_integer_inputs_become_float32():
    x = jnp.arange(16, dtype=jnp.int32).reshape(1, 4, 4, 1)
    for pool in POOLS.values():
        assert pool(x, 2).dtype == jnp.float32
    np.testing.assert_allclose(avg_pool(x, 2)[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])
    assert global_avg_pool(x).dtype == jnp.float32
    assert global_max_pool(x).dtype == jnp.float32


@pytest.mark.parametrize("name", list(POOLS))
def test_grad_under_jit(name):
    # Regression: a jnp init value made reduce_window generic (not differentiable) under jit.
    x = jnp.asarray(distinct_values(np.random.default_rng(6), (2, 6, 6, 2)), jnp.float32)
    pool = POOLS[name]

    def loss(x):
        return jnp.sum(pool(x, 3, 2, 1) ** 2)

    np.testing.assert_allclose(jax.jit(jax.grad(loss))(x), jax.grad(loss)(x), rtol=1e-6)


def test_jit_vmap_grad(rng):
    xs = rng.standard_normal((3, 2, 6, 6, 2)).astype(np.float32)
    for name, pool in POOLS.items():
        f = jax.jit(lambda x, pool=pool: pool(x, 3, 2, 1))
        ys = jax.vmap(f)(xs)
        assert ys.shape == (3, 2, 3, 3, 2)
        for i in range(3):
            np.testing.assert_allclose(ys[i], _ref(name, xs[i], 3, 2, 1), rtol=1e-5, atol=1e-6)
        dx = jax.jit(jax.grad(lambda x, f=f: jnp.sum(jax.vmap(f)(x))))(xs)
        dx_loop = np.stack([jax.grad(lambda x, f=f: jnp.sum(f(x)))(xs[i]) for i in range(3)])
        np.testing.assert_allclose(dx, dx_loop, rtol=1e-6)
    g = jax.vmap(global_avg_pool)(xs)
    np.testing.assert_allclose(g, xs.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- PyTorch


@pytest.mark.parametrize("kernel,stride,padding", [(2, None, 0), (3, 2, 1), ((3, 2), (2, 1), 0)])
def test_matches_torch(x64, kernel, stride, padding):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = distinct_values(np.random.default_rng(4), (2, 7, 6, 3))
    g = np.random.default_rng(5).standard_normal

    def torch_run(fn):
        tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
        ty = fn(tx)
        gy = g(ty.shape)
        ty.backward(torch.tensor(gy))
        return ty.detach().numpy().transpose(0, 2, 3, 1), tx.grad.numpy().transpose(0, 2, 3, 1), gy

    s = kernel if stride is None else stride
    cases = [
        (max_pool, lambda t: F.max_pool2d(t, kernel, s, padding)),
        (avg_pool, lambda t: F.avg_pool2d(t, kernel, s, padding, count_include_pad=True)),
        (functools.partial(avg_pool, count_include_pad=False),
         lambda t: F.avg_pool2d(t, kernel, s, padding, count_include_pad=False)),
    ]
    if padding == 0:  # LPPool2d has no padding argument
        cases.append((l2_pool, lambda t: F.lp_pool2d(t, 2, kernel, s)))
    for ours, theirs in cases:
        ty, tdx, gy = torch_run(theirs)
        y, vjp = jax.vjp(lambda x, ours=ours: ours(x, kernel, stride, padding), jnp.asarray(x))
        np.testing.assert_allclose(y, ty, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(vjp(jnp.asarray(gy.transpose(0, 2, 3, 1)))[0], tdx,
                                   rtol=1e-10, atol=1e-12)


def _tied_values(seed, shape):
    """ReLU of values rounded to 0.5: many windows hold ties, zeros above all."""
    x = np.round(np.random.default_rng(seed).standard_normal(shape) * 2) / 2
    return np.maximum(x, 0.0)


def _max_pool_lax(x, window, stride, padding):
    """max pooling through lax.reduce_window and JAX's own derivative (the reference)."""
    from jax import lax

    from cnnjax.shapes import normalize_padding

    f, s = _pair(window), _pair(stride)
    pads = normalize_padding(padding, x.shape[1:3], f, s)
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, *f, 1), (1, *s, 1), ((0, 0), *pads, (0, 0)))


@pytest.mark.parametrize("window,stride,padding", [(2, 2, 0), (3, 2, 1), (3, 1, "SAME"),
                                                   ((3, 2), (2, 1), ((1, 0), (0, 1)))])
def test_max_pool_ties_match_lax_autodiff(x64, window, stride, padding):
    """With ties, every window's gradient goes to its first maximum, as XLA's own rule."""
    x = jnp.asarray(_tied_values(6, (2, 9, 8, 3)))
    g = jnp.asarray(np.random.default_rng(7).standard_normal(
        _max_pool_lax(x, window, stride, padding).shape))
    y, vjp = jax.vjp(lambda x: max_pool(x, window, stride, padding), x)
    y_ref, vjp_ref = jax.vjp(lambda x: _max_pool_lax(x, window, stride, padding), x)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(vjp(g)[0], vjp_ref(g)[0])


@pytest.mark.parametrize("window,shape", [(2, (2, 9, 8, 3)), (3, (1, 10, 9, 2)),
                                          ((2, 3), (2, 6, 7, 2)), (12, (1, 25, 24, 1))])
def test_tiled_max_pool_derivatives_match_lax_autodiff(x64, monkeypatch, window, shape):
    """Windows that tile the input (stride = window, no padding) take their own tangent:
    each window's first maximum as an offset code (int32 beyond 127 cells). Ties,
    -inf and rows/columns left over by the last window against XLA's own rule; a
    window holding a NaN has no maximum and passes no gradient (XLA's picks a cell)."""
    calls = []
    tiled = pooling_module._tiled_max_tangent
    monkeypatch.setattr(pooling_module, "_tiled_max_tangent",
                        lambda *a: calls.append(a[-1]) or tiled(*a))
    x = _tied_values(11, shape)
    x[0, 0, 0, 0] = np.nan
    x[0, -1, -1, -1] = -np.inf
    x[-1, 1:4, 1:4, 0] = -np.inf
    x = jnp.asarray(x)
    y, vjp = jax.vjp(lambda v: max_pool(v, window), x)
    y_ref, vjp_ref = jax.vjp(lambda v: _max_pool_lax(v, window, window, 0), x)
    np.testing.assert_array_equal(y, y_ref)
    g = jnp.asarray(np.random.default_rng(12).standard_normal(y.shape))
    fh, fw = _pair(window)
    dx, dx_ref = np.asarray(vjp(g)[0]), np.array(vjp_ref(g)[0])
    assert np.isnan(y[0, 0, 0, 0]) and not dx[0, :fh, :fw, 0].any()
    dx_ref[0, :fh, :fw, 0] = 0
    np.testing.assert_array_equal(dx, dx_ref)
    t = jnp.asarray(np.random.default_rng(13).standard_normal(shape))
    jvp = np.asarray(jax.jvp(lambda v: max_pool(v, window), (x,), (t,))[1])
    jvp_ref = np.array(jax.jvp(lambda v: _max_pool_lax(v, window, window, 0), (x,), (t,))[1])
    assert jvp[0, 0, 0, 0] == 0
    jvp_ref[0, 0, 0, 0] = 0
    # lax's forward mode sends an all -inf window nothing; its reverse mode and ours
    # pick the first cell. Forward and reverse mode must be each other's transpose.
    all_inf = np.isneginf(np.asarray(y))
    np.testing.assert_array_equal(jvp[~all_inf], jvp_ref[~all_inf])
    np.testing.assert_allclose(np.vdot(jvp, g), np.vdot(t, dx), rtol=1e-12)
    assert calls and calls[0] == _pair(window)


@pytest.mark.parametrize("window,stride,padding", [(3, 2, 1), (2, 2, 0), (3, 3, 0)])
def test_max_pool_ties_match_torch(x64, window, stride, padding):
    torch = pytest.importorskip("torch")
    x = _tied_values(8, (2, 11, 10, 4))
    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    ty = torch.nn.functional.max_pool2d(tx, window, stride, padding)
    gy = np.random.default_rng(9).standard_normal(tuple(ty.shape))
    ty.backward(torch.tensor(gy))
    _, vjp = jax.vjp(lambda x: max_pool(x, window, stride, padding), jnp.asarray(x))
    np.testing.assert_allclose(vjp(jnp.asarray(gy.transpose(0, 2, 3, 1)))[0],
                               tx.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-12, atol=1e-12)


def test_max_pool_forward_mode(x64):
    """Forward- and reverse-mode derivatives, to second order, against finite differences."""
    x = jnp.asarray(distinct_values(np.random.default_rng(10), (2, 6, 7, 2)))
    check_grads(lambda x: max_pool(x, 3, 2, 1), (x,), order=2, modes=["fwd", "rev"])
    jvp = jax.jvp(lambda x: max_pool(x, 2), (x,), (jnp.ones_like(x),))[1]
    np.testing.assert_array_equal(jvp, np.ones((2, 3, 3, 2)))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["max_pool", "avg_pool", "l2_pool"])
@pytest.mark.parametrize(
    "x_shape, args, pattern",
    [
        ((4, 4, 1), (2,), r"{op}: x must be a 4-D NHWC array"),
        ((1, 4, 4, 1), (0,), r"{op}: window must be >= 1, got 0"),
        ((1, 4, 4, 1), ((2, 2, 2),), r"{op}: window must be an int or a pair"),
        ((1, 4, 4, 1), (2, 0), r"{op}: stride must be >= 1, got 0"),
        ((1, 4, 4, 1), (2, 1, -1), r"padding must be >= 0, got -1"),
        ((1, 4, 4, 1), (2, 1, "FULL"), r"padding must be an int, a pair, 'SAME' or 'VALID'"),
    ],
)
def test_errors(name, x_shape, args, pattern):
    pool = {"max_pool": max_pool, "avg_pool": avg_pool, "l2_pool": l2_pool}[name]
    with pytest.raises(ValueError, match=pattern.format(op=name)):
        pool(np.zeros(x_shape, np.float32), *args)


@pytest.mark.parametrize("pool", [max_pool, avg_pool, l2_pool])
def test_window_larger_than_padded_input(pool):
    name = pool.__name__
    with pytest.raises(ShapeError, match=rf"{name} \(width\).*larger than the padded input of 4"):
        pool(np.zeros((1, 6, 3, 1), np.float32), (2, 5), 1, ((0, 0), (1, 0)))


@pytest.mark.parametrize("pool", [global_avg_pool, global_max_pool])
def test_global_pool_rank_error(pool):
    with pytest.raises(ValueError, match=r"must be a 4-D NHWC array"):
        pool(np.zeros((4, 4, 3), np.float32))
