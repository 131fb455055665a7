"""cnnjax.ops.tanh: the rational form against float64 tanh, its derivatives and its rule."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import layers as L
from cnnjax.ops import activations as activations_module
from cnnjax.ops import tanh


def _ulps(y32, x):
    """Distance of float32 results from the correctly rounded tanh, in units in the last place."""
    ref = np.tanh(np.asarray(x, np.float64))
    spacing = np.abs(np.spacing(ref.astype(np.float32))).astype(np.float64)
    return np.abs(np.asarray(y32, np.float64) - ref) / spacing


def test_rational_tanh_is_within_six_ulps_of_float64_tanh():
    magnitudes = np.geomspace(1e-30, 30.0, 400_000, dtype=np.float32)
    x = np.concatenate([magnitudes, -magnitudes, np.linspace(-10, 10, 100_001, dtype=np.float32)])
    y = np.asarray(jax.jit(lambda v: tanh(v, impl="rational"))(x))
    assert y.dtype == np.float32
    ulps = _ulps(y, x)
    assert ulps.max() <= 6.0
    assert ulps.mean() <= 0.5
    # Odd, and never outside [-1, 1].
    np.testing.assert_array_equal(y[: magnitudes.size], -y[magnitudes.size : 2 * magnitudes.size])
    assert np.all(np.abs(y) <= 1.0)


def test_rational_tanh_special_values():
    x = jnp.asarray([0.0, -0.0, np.inf, -np.inf, np.nan, 9.0, 1e4, -1e30], jnp.float32)
    y = np.asarray(tanh(x, impl="rational"))
    np.testing.assert_array_equal(y[[0, 2, 3, 6, 7]], [0.0, 1.0, -1.0, 1.0, -1.0])
    assert np.signbit(y[1]) and y[1] == 0.0
    assert np.isnan(y[4])
    assert abs(y[5] - np.tanh(9.0)) <= 1e-7


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_narrow_floats_are_computed_in_float32(dtype):
    x = jnp.linspace(-6, 6, 1001).astype(dtype)
    y = tanh(x, impl="rational")
    assert y.dtype == dtype
    ref = np.tanh(np.asarray(x.astype(jnp.float32), np.float64))
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), ref, rtol=2**-7, atol=2**-9)


def test_float64_and_integers_use_jnp_tanh():
    with jax.enable_x64(True):
        x = jnp.linspace(-5, 5, 101, dtype=jnp.float64)
        np.testing.assert_array_equal(tanh(x, impl="rational"), jnp.tanh(x))
        assert tanh(x).dtype == jnp.float64
    ints = jnp.arange(-3, 4)
    np.testing.assert_allclose(tanh(ints), np.tanh(np.arange(-3, 4)), rtol=1e-6)


def test_derivatives_are_one_minus_tanh_squared():
    x = jnp.linspace(-8, 8, 2001, dtype=jnp.float32)
    t = np.tanh(np.asarray(x, np.float64))
    # 1 - y^2 is taken from the float32 y: near |y| = 1 its error is a few float32
    # ulps of 1 (6e-8 each), as for jnp.tanh's own derivative.
    d1 = jax.vmap(jax.grad(lambda v: tanh(v, impl="rational")))(x)
    np.testing.assert_allclose(d1, 1 - t**2, rtol=1e-5, atol=1e-6)
    d2 = jax.vmap(jax.grad(jax.grad(lambda v: tanh(v, impl="rational"))))(x)
    np.testing.assert_allclose(d2, -2 * t * (1 - t**2), rtol=1e-4, atol=2e-6)
    # Forward mode and reverse mode agree.
    tangent = jnp.asarray(np.random.default_rng(0).standard_normal(x.shape), jnp.float32)
    _, jvp_out = jax.jvp(lambda v: tanh(v, impl="rational"), (x,), (tangent,))
    np.testing.assert_allclose(jvp_out, (1 - t**2) * np.asarray(tangent), rtol=1e-5, atol=4e-6)


def test_rule_picks_the_rational_form_on_cpu_only(monkeypatch):
    x = jnp.ones((4,), jnp.float32)

    def uses_lax_tanh(f):
        return re.search(r"= tanh ", str(jax.make_jaxpr(f)(x))) is not None

    # Fresh lambdas: make_jaxpr caches traces by function.
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert not uses_lax_tanh(lambda v: tanh(v))
    assert uses_lax_tanh(lambda v: tanh(v, impl="xla"))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert uses_lax_tanh(lambda v: tanh(v))


def test_tanh_layers_use_it():
    assert L.get_activation("tanh") is tanh


def test_unknown_impl():
    with pytest.raises(ValueError, match="impl must be one of"):
        tanh(jnp.ones(3), impl="fast")


def test_table_lists_the_backends():
    assert set(activations_module.TANH_IMPL_BY_BACKEND) >= {"cpu", "gpu", "tpu"}
    assert set(activations_module.TANH_IMPL_BY_BACKEND.values()) <= {"rational", "xla"}


def test_fit_script_reproduces_the_coefficients():
    # The coefficients are the output of experiments/benchmarks/fit_tanh.py, not
    # numbers copied from elsewhere: refitting gives them back.
    script = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "fit_tanh.py"
    spec = importlib.util.spec_from_file_location("fit_tanh", script)
    fit_tanh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit_tanh)
    p, q, relative = fit_tanh.fit(4, 4)
    assert relative < 5e-8
    np.testing.assert_allclose(p, activations_module._P, rtol=1e-9)
    np.testing.assert_allclose(q, activations_module._Q, rtol=1e-9)
