"""Local response normalization (AlexNet, Krizhevsky et al. 2012, section 3.3).

For activations ``a`` with channels on the last axis::

    s_c = k + alpha * sum_{j = c - size//2}^{c + (size-1)//2} a_j^2      (j clipped to 0 .. C-1)
    b_c = a_c / s_c^beta

This is the paper's convention: alpha is NOT divided by ``size``. With the
paper's constants (size 5, k 2, alpha 1e-4, beta 0.75) it is AlexNet's LRN.

Reproducing the other libraries with this function:

* ``torch.nn.LocalResponseNorm(size, alpha, beta, k)`` divides alpha by size:
  ``local_response_norm(x, size=size, alpha=alpha / size, beta=beta, k=k)``.
  (For an even size both use the window ``[c - size//2, c + (size-1)//2]``.)
* ``tf.nn.local_response_normalization(x, depth_radius=r, bias=b, alpha=a, beta=be)``
  sums over ``2r + 1`` channels without dividing:
  ``local_response_norm(x, size=2 * r + 1, k=b, alpha=a, beta=be)``.

The derivative is written by hand. With ``g = dL/db`` and ``S^T`` the same
window sum with the window mirrored::

    dL/da_j = g_j s_j^-beta - 2 alpha beta a_j * S^T(g a s^(-beta-1))_j
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["local_response_norm"]


def _channel_window_sum(v, before: int, after: int):
    """out[..., c] = sum of v[..., j] for j in [c - before, c + after], clipped."""
    window = (1,) * (v.ndim - 1) + (before + after + 1,)
    pads = ((0, 0),) * (v.ndim - 1) + ((before, after),)
    # A numpy (concrete) init value keeps this the differentiable reduce_window_sum
    # under jit; a jnp zero would be a tracer and give a generic, non-differentiable one.
    return lax.reduce_window(v, np.zeros((), v.dtype), lax.add, window, (1,) * v.ndim, pads)


def _accumulation_dtype(dtype):
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype


def _pow_neg(s, beta):
    """s ** -beta; for AlexNet's beta = 0.75 as rsqrt(s) * rsqrt(sqrt(s)), 2-3x cheaper
    than the exp/log that a general power costs on the CPU (s >= k > 0 here)."""
    if beta == 0.75:
        return lax.rsqrt(s) * lax.rsqrt(jnp.sqrt(s))
    if beta == 0.5:
        return lax.rsqrt(s)
    return s ** (-beta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _lrn(x, size, k, alpha, beta):
    return _lrn_fwd(x, size, k, alpha, beta)[0]


def _lrn_fwd(x, size, k, alpha, beta):
    a = x.astype(_accumulation_dtype(x.dtype))
    s = k + alpha * _channel_window_sum(a * a, size // 2, (size - 1) // 2)
    b = a * _pow_neg(s, beta)
    return b.astype(x.dtype), (x, s)


def _lrn_bwd(size, k, alpha, beta, residuals, g):
    x, s = residuals
    a = x.astype(s.dtype)
    g = g.astype(s.dtype)
    s_pow = _pow_neg(s, beta)
    inner = g * a * s_pow / s  # g a s^(-beta-1)
    # The mirrored window: channel j contributes to c for c in [j - (size-1)//2, j + size//2].
    back = _channel_window_sum(inner, (size - 1) // 2, size // 2)
    dx = g * s_pow - 2.0 * alpha * beta * a * back
    return (dx.astype(x.dtype),)


_lrn.defvjp(_lrn_fwd, _lrn_bwd)


def local_response_norm(
    x: jax.Array,
    *,
    size: int = 5,
    k: float = 2.0,
    alpha: float = 1e-4,
    beta: float = 0.75,
) -> jax.Array:
    """Local response normalization across channels (last axis), the AlexNet paper's form.

    Args:
      x: activations with channels last, e.g. NHWC; any rank >= 1.
      size: n, the number of adjacent channels summed (window centred on c).
      k, alpha, beta: constants of ``a_c / (k + alpha * sum a_j^2)^beta``.

    Returns:
      An array of ``x``'s shape and dtype (bfloat16 inputs are normalized in float32).
    """
    if getattr(x, "ndim", 0) < 1:
        raise ValueError("local_response_norm: x must have a channel axis (last axis).")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"local_response_norm: size must be a positive integer, got {size!r}.")
    if not k > 0 and not alpha > 0:
        raise ValueError(
            f"local_response_norm: k = {k} and alpha = {alpha} give a zero denominator; "
            "use k > 0 (the paper uses 2)."
        )
    if k < 0 or alpha < 0:
        raise ValueError(
            f"local_response_norm: k and alpha must be >= 0, got k={k}, alpha={alpha}."
        )
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return _lrn(x, size, float(k), float(alpha), float(beta))
