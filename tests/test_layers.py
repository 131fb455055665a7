"""The linen layers against numpy references written out loop by loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import layers as L
from cnnjax.shapes import ShapeError


def _np_conv(x, w, b, stride, pad):
    """Direct cross-correlation, NHWC x HWIO, symmetric zero padding."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    n, h, wd, _ = x.shape
    fh, fw, _, k = w.shape
    ho, wo = (h - fh) // stride + 1, (wd - fw) // stride + 1
    y = np.zeros((n, ho, wo, k))
    for i in range(ho):
        for j in range(wo):
            patch = x[:, i * stride:i * stride + fh, j * stride:j * stride + fw, :]
            y[:, i, j, :] = np.einsum("nabc,abck->nk", patch, w)
    return y + b


def _init_apply(module, x, **kw):
    variables = module.init(jax.random.key(0), x, **kw)
    return variables, module.apply(variables, x, **kw)


def test_conv_matches_direct_correlation(rng):
    x = rng.standard_normal((2, 7, 7, 3)).astype(np.float32)
    conv = L.Conv(features=4, kernel_size=3, stride=2, padding=1, activation="tanh")
    variables, y = _init_apply(conv, x)
    p = variables["params"]
    assert set(p) == {"kernel", "bias"}
    assert p["kernel"].shape == (3, 3, 3, 4) and p["kernel"].dtype == jnp.float32
    # A nonzero bias so the bias path is checked too.
    bias = rng.standard_normal(4).astype(np.float32)
    y = conv.apply({"params": {"kernel": p["kernel"], "bias": bias}}, x)
    ref = np.tanh(_np_conv(x, np.asarray(p["kernel"]), bias, 2, 1))
    assert y.shape == (2, 4, 4, 4) == (2, *conv.output_shape((7, 7, 3)))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_keras_default_initialization():
    conv = L.Conv(features=8, kernel_size=5)
    p = conv.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    assert not np.any(p["bias"])
    limit = np.sqrt(6.0 / (5 * 5 * 3 + 5 * 5 * 8))  # glorot_uniform: fan_in, fan_out
    assert np.abs(p["kernel"]).max() <= limit
    assert np.abs(p["kernel"]).max() > 0.8 * limit


def test_dense_matches_matmul(rng):
    x = rng.standard_normal((3, 5)).astype(np.float32)
    dense = L.Dense(features=2, activation="relu")
    variables, _ = _init_apply(dense, x)
    k = np.asarray(variables["params"]["kernel"])
    assert k.shape == (5, 2)
    b = rng.standard_normal(2).astype(np.float32)
    y = dense.apply({"params": {"kernel": k, "bias": b}}, x)
    np.testing.assert_allclose(y, np.maximum(x @ k + b, 0), rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params(rng):
    x = rng.standard_normal((1, 6, 6, 2)).astype(np.float32)
    conv = L.Conv(features=3, kernel_size=3, dtype=jnp.bfloat16)
    variables, y = _init_apply(conv, x)
    assert variables["params"]["kernel"].dtype == jnp.float32
    assert y.dtype == jnp.bfloat16
    y32 = L.Conv(features=3, kernel_size=3).apply(variables, x)
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, atol=0.05, rtol=0.05)


def test_flatten_is_h_w_c_order(rng):
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    _, y = _init_apply(L.Flatten(), x)
    np.testing.assert_array_equal(y, x.reshape(2, -1))
    assert y[0, 1] == x[0, 0, 0, 1]  # channels vary fastest
    assert L.Flatten().output_shape((3, 4, 5)) == (60,)


def test_lrn_matches_paper_formula(rng):
    x = rng.standard_normal((1, 2, 2, 7)).astype(np.float32) * 10
    _, y = _init_apply(L.LRN(), x)
    ref = np.empty_like(x)
    for c in range(7):
        lo, hi = max(0, c - 2), min(6, c + 2)
        s = 2.0 + 1e-4 * np.sum(x[..., lo:hi + 1] ** 2, axis=-1)
        ref[..., c] = x[..., c] / s**0.75
    np.testing.assert_allclose(y, ref, rtol=1e-5)


@pytest.mark.parametrize(
    "layer, reduce",
    [
        (L.MaxPool(window=3, stride=2), np.max),
        (L.AvgPool(window=3, stride=2), np.mean),
        (L.L2Pool(window=3, stride=2), lambda p, axis: np.sqrt(np.sum(p**2, axis=axis))),
    ],
)
def test_pools_match_window_reduction(rng, layer, reduce):
    x = rng.standard_normal((2, 7, 7, 3)).astype(np.float32)
    _, y = _init_apply(layer, x)
    assert y.shape == (2, 3, 3, 3) == (2, *layer.output_shape((7, 7, 3)))
    for i in range(3):
        for j in range(3):
            ref = reduce(x[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :], axis=(1, 2))
            np.testing.assert_allclose(y[:, i, j, :], ref, rtol=1e-5, atol=1e-6)


def test_pool_output_shape_floors():
    # 7 / 2: Keras' MaxPooling2D floors to 3.
    assert L.MaxPool(window=2).output_shape((7, 7, 4)) == (3, 3, 4)


def test_global_pools(rng):
    x = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(_init_apply(L.GlobalAvgPool(), x)[1], x.mean((1, 2)), rtol=1e-6)
    np.testing.assert_allclose(_init_apply(L.GlobalMaxPool(), x)[1], x.max((1, 2)))


def test_dropout_only_in_train_mode():
    x = jnp.ones((4, 1000))
    drop = L.Dropout(rate=0.25)
    assert drop.init(jax.random.key(0), x) == {}
    np.testing.assert_array_equal(drop.apply({}, x), x)
    y = np.asarray(drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)}))
    kept = y != 0
    assert 0.7 < kept.mean() < 0.8
    np.testing.assert_allclose(y[kept], 1 / 0.75)
    with pytest.raises(Exception, match="dropout"):
        drop.apply({}, x, deterministic=False)


def test_activation_layer():
    x = jnp.array([[-1.0, 0.5]])
    np.testing.assert_allclose(L.Activation("relu").apply({}, x), [[0.0, 0.5]])
    np.testing.assert_allclose(L.Activation("softmax").apply({}, x).sum(), 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: L.Conv(features=0), "features"),
        (lambda: L.Dense(features=2.5), "features"),
        (lambda: L.Conv(features=2, activation="swishy"), "activation"),
        (lambda: L.Dropout(rate=1.0), "rate"),
        (lambda: L.Activation("nope"), "activation"),
    ],
)
def test_bad_hyperparameters_raise_value_error(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_conv_output_shape_insists_on_exact_division():
    conv = L.Conv(features=96, kernel_size=11, stride=4, name="conv1")
    assert conv.output_shape((227, 227, 3)) == (55, 55, 96)
    with pytest.raises(ShapeError, match=r"conv1: \(224 - 11 \+ 2\*0\) / 4 \+ 1 = 54.25"):
        conv.output_shape((224, 224, 3))


@pytest.mark.parametrize("layer", [L.MaxPool(window=2), L.AvgPool(window=2), L.L2Pool(window=2)])
def test_pool_gradients_under_jit(rng, layer):
    x = jnp.asarray(rng.standard_normal((1, 4, 4, 2)).astype(np.float32))

    def f(x):
        return (layer.apply({}, x) ** 2).sum()

    np.testing.assert_allclose(jax.jit(jax.grad(f))(x), jax.grad(f)(x), rtol=1e-6)
