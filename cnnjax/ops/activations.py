"""tanh as a rational function that XLA:CPU can fuse into a convolution's loop.

XLA:CPU emits ``tanh`` as a call to its own approximation. Alone, or after one
of XLA's convolutions, that is as fast as it gets; but fused into a large loop
(the direct form of LeNet-5's conv1: 25 shifted multiply-adds, the bias, the
tanh and the 2x2 average pool in one pass) the loop stops being vectorised and
runs 7-10x slower (experiments/benchmarks/NOTES.md, attempt 17). Written as
plain arithmetic, ``x P(x^2) / Q(x^2)`` on ``x`` clamped to [-9, 9], it fuses
like any multiply-add.

P (degree 4 in x^2) and Q (degree 4) are a relative-minimax fit to tanh on
[0, 9] (experiments/benchmarks/fit_tanh.py reproduces them): 2e-8 relative in
exact arithmetic. Evaluated in float32 by XLA:CPU and held within [-1, 1], the
result is at most 4.6 units in the last place from the correctly rounded tanh,
mean 0.32 (XLA:CPU's own tanh: at most 4.9, mean 0.49). Beyond 9, float32 tanh
is 1.

Only float32 (and float16/bfloat16, computed in float32) take the rational
form, and only on the backends listed in ``TANH_IMPL_BY_BACKEND``; float64 and
every other backend use ``jnp.tanh``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["tanh", "TANH_IMPL_BY_BACKEND"]

# "rational" (the fit below) or "xla" (jnp.tanh) per backend, for float32 and narrower.
TANH_IMPL_BY_BACKEND = {"cpu": "rational", "gpu": "xla", "tpu": "xla"}
_IMPLS = ("auto", "rational", "xla")

# Coefficients of P and Q in powers of s = x^2, constant term first.
_P = (
    0.9999999795839988,
    0.13381080463659206,
    0.0034956527314412475,
    2.0610125767250903e-05,
    1.3356071440939455e-08,
)
_Q = (
    1.0,
    0.46714396097659966,
    0.025877229280138577,
    0.0003285739615892446,
    7.777142908204251e-07,
)
_CLAMP = 9.0


def _horner(coefficients, s):
    out = jnp.asarray(np.float32(coefficients[-1]))
    for c in coefficients[-2::-1]:
        out = out * s + np.float32(c)
    return out


@jax.custom_jvp
def _tanh_rational(x):
    y = jnp.clip(x.astype(jnp.float32), -_CLAMP, _CLAMP)
    s = y * y
    num = y * _horner(_P, s)
    # Rounding can put num / Q a few ulps above 1 near the clamp; tanh never is.
    # Bounded in the divisor (Q > 0): |num| > Q gives num / |num| = +-1 exactly,
    # otherwise the same num / Q. Bounding the quotient afterwards read it more
    # than once (a select on |r| > 1) or not at all vectorised (a min/max: the fused
    # loop ran 3x slower); and XLA:CPU would not fuse the expensive divide into a
    # select reading it three times, which cost an extra pass over every kept
    # activation in training (NOTES.md, attempt 67).
    return (num / jnp.maximum(_horner(_Q, s), jnp.abs(num))).astype(x.dtype)


@_tanh_rational.defjvp
def _tanh_rational_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    y = _tanh_rational(x)
    # d tanh = (1 - tanh^2) dx, as (1 + y)(1 - y): exact where y is near +-1.
    return y, t * ((1 + y) * (1 - y))


def tanh(x: jax.Array, impl: str = "auto") -> jax.Array:
    """Hyperbolic tangent, elementwise; ``impl`` is "auto", "rational" or "xla" (jnp.tanh).

    "auto" takes ``TANH_IMPL_BY_BACKEND[jax.default_backend()]``. Float64 (and
    non-float input) always uses ``jnp.tanh``. The derivative is ``1 - tanh^2``
    at every order.
    """
    if impl not in _IMPLS:
        raise ValueError(f"tanh: impl must be one of {_IMPLS}, got {impl!r}.")
    x = jnp.asarray(x)
    if impl == "auto":
        impl = TANH_IMPL_BY_BACKEND.get(jax.default_backend(), "xla")
    if impl == "xla" or not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype.itemsize > 4:
        return jnp.tanh(x)
    return _tanh_rational(x)
