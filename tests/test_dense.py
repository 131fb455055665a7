"""The dense product ``x @ kernel``: both forms against numpy, their derivatives, the rule."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from cnnjax import layers
from cnnjax.ops import dense
from cnnjax.ops import linear as dense_module

IMPLS = ["xla", "transposed_rows"]


def _uses_transposed_rows(f, *args) -> bool:
    # A fresh function each time: make_jaxpr's trace cache does not key on the backend.
    return "optimization_barrier" in str(jax.make_jaxpr(lambda *a: f(*a))(*args))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("x_shape", [(7,), (4, 7), (2, 3, 7), (1, 1, 1, 7)])
def test_dense_matches_numpy(x64, rng, impl, x_shape):
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal((7, 5))
    y = dense(jnp.asarray(x), jnp.asarray(w), impl=impl)
    assert y.shape == (*x_shape[:-1], 5)
    np.testing.assert_allclose(y, x @ w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_dense_derivatives_against_finite_differences(x64, rng, impl):
    x = jnp.asarray(rng.standard_normal((3, 6)))
    w = jnp.asarray(rng.standard_normal((6, 4)))
    check_grads(lambda x, w: jnp.tanh(dense(x, w, impl=impl)), (x, w), order=2,
                modes=["fwd", "rev"])


def test_dense_gradients_of_both_forms_agree_in_float32(rng):
    x = jnp.asarray(rng.standard_normal((4, 300)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((300, 50)), jnp.float32)
    grads = [jax.grad(lambda x, w, impl=impl: jnp.sum(jnp.sin(dense(x, w, impl=impl))),
                      (0, 1))(x, w) for impl in IMPLS]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    ys = jax.vmap(lambda v: dense(v, w, impl="transposed_rows"))(x[:, None, :])
    np.testing.assert_allclose(ys[:, 0], np.asarray(x) @ np.asarray(w), rtol=2e-5, atol=2e-4)


def test_auto_rule_takes_transposed_rows_for_few_rows_and_large_kernels(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.setattr(dense_module, "DENSE_TRANSPOSED_ROWS_BY_BACKEND", {"cpu": (8, 600)})
    w = jnp.ones((30, 20), jnp.float32)                       # 600 entries
    f = dense
    assert _uses_transposed_rows(f, jnp.ones((8, 30), jnp.float32), w)
    assert _uses_transposed_rows(f, jnp.ones((2, 4, 30), jnp.float32), w)   # 8 rows
    assert not _uses_transposed_rows(f, jnp.ones((9, 30), jnp.float32), w)  # too many rows
    assert not _uses_transposed_rows(f, jnp.ones((8, 29), jnp.float32), w[:29])  # too small
    assert not _uses_transposed_rows(f, jnp.ones((8, 30), jnp.bfloat16), w.astype(jnp.bfloat16))
    with jax.enable_x64(True):
        assert not _uses_transposed_rows(f, jnp.ones((8, 30), jnp.float64), w.astype(jnp.float64))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not _uses_transposed_rows(f, jnp.ones((8, 30), jnp.float32), w)


def test_the_shipped_rule_covers_vgg_and_alexnet_classifiers(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    fc1 = jax.ShapeDtypeStruct((25088, 4096), jnp.float32)   # VGG-16's fc1
    fc6 = jax.ShapeDtypeStruct((9216, 4096), jnp.float32)    # AlexNet's fc6
    lenet = jax.ShapeDtypeStruct((400, 120), jnp.float32)
    for w, rows, expected in [(fc1, 4, True), (fc1, 64, True), (fc1, 128, False),
                              (fc6, 16, True), (lenet, 4, False)]:
        x = jax.ShapeDtypeStruct((rows, w.shape[0]), jnp.float32)
        assert _uses_transposed_rows(dense, x, w) is expected, (w.shape, rows)


def test_dense_layer_uses_the_rule_and_keeps_its_values(monkeypatch, rng):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.setattr(dense_module, "DENSE_TRANSPOSED_ROWS_BY_BACKEND", {"cpu": (64, 1)})
    layer = layers.Dense(features=5, activation="relu")
    x = jnp.asarray(rng.standard_normal((3, 7)), jnp.float32)
    params = layer.init(jax.random.PRNGKey(0), x)
    assert _uses_transposed_rows(lambda x: layer.apply(params, x), x)
    kernel, bias = params["params"]["kernel"], params["params"]["bias"]
    np.testing.assert_allclose(layer.apply(params, x),
                               np.maximum(np.asarray(x) @ np.asarray(kernel) + bias, 0),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("x_shape,w_shape,impl,pattern", [
    ((4, 7), (6, 5), "auto", r"dense: x's last axis \(7\) must match the kernel's first"),
    ((4, 7), (7,), "auto", r"the kernel is \(in_features, out_features\)"),
    ((), (7, 5), "auto", r"x's last axis \(none\)"),
    ((4, 7), (7, 5), "fast", r"dense: impl must be one of auto, xla, transposed_rows"),
])
def test_dense_errors(x_shape, w_shape, impl, pattern):
    with pytest.raises(ValueError, match=pattern):
        dense(jnp.ones(x_shape), jnp.ones(w_shape), impl=impl)


_SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from cnnjax.ops import dense
    assert jax.device_count() == 8, jax.device_count()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 64)).astype(np.float32)
    w = rng.standard_normal((64, 24)).astype(np.float32)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    wr = jax.device_put(w, NamedSharding(mesh, P()))
    def loss(x, w):
        return jnp.sum(jnp.sin(dense(x, w, impl="transposed_rows")))
    y = jax.jit(lambda x, w: dense(x, w, impl="transposed_rows"))(xs, wr)
    gx, gw = jax.jit(jax.grad(loss, (0, 1)))(xs, wr)
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-4)
    gy = np.cos(x @ w)
    np.testing.assert_allclose(gx, gy @ w.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gw, x.T @ gy, rtol=1e-4, atol=1e-4)
    print("ok", y.sharding.spec)
""")


def test_transposed_rows_on_eight_devices_with_a_sharded_batch():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, timeout=300,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")
