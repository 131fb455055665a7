"""local_response_norm against numpy references of the paper, PyTorch and TensorFlow formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from cnnjax.ops import local_response_norm

# --------------------------------------------------------------------------- references


def lrn_paper(x, size, k, alpha, beta):
    """Krizhevsky et al. 2012, 3.3: b_c = a_c / (k + alpha * sum_j a_j^2)^beta, alpha not / n.

    The window is [c - size//2, c + (size-1)//2], clipped to the channels that exist.
    """
    x = np.asarray(x, np.float64)
    channels = x.shape[-1]
    out = np.empty_like(x)
    for c in range(channels):
        lo, hi = max(0, c - size // 2), min(channels - 1, c + (size - 1) // 2)
        s = k + alpha * np.sum(x[..., lo : hi + 1] ** 2, axis=-1)
        out[..., c] = x[..., c] / s**beta
    return out


def lrn_torch_formula(x_nchw, size, alpha, beta, k):
    """torch.nn.LocalResponseNorm as torch.nn.functional.local_response_norm computes it.

    Square, zero-pad the channel axis by (size//2, (size-1)//2), take the MEAN over a
    window of ``size`` channels (padding counted), then x / (k + alpha * mean)^beta.
    """
    x = np.asarray(x_nchw, np.float64)
    sq = np.pad(x**2, ((0, 0), (size // 2, (size - 1) // 2), (0, 0), (0, 0)))
    channels = x.shape[1]
    mean = np.stack([sq[:, c : c + size].mean(axis=1) for c in range(channels)], axis=1)
    return x / (k + alpha * mean) ** beta


def lrn_tf_formula(x, depth_radius, bias, alpha, beta):
    """tf.nn.local_response_normalization's documented formula (channels last)::

    sqr_sum[a, b, c, d] = sum(input[a, b, c, d - depth_radius : d + depth_radius + 1] ** 2)
    output = input / (bias + alpha * sqr_sum) ** beta
    """
    x = np.asarray(x, np.float64)
    sqr_sum = np.stack(
        [np.sum(x[..., max(0, d - depth_radius) : d + depth_radius + 1] ** 2, axis=-1)
         for d in range(x.shape[-1])],
        axis=-1,
    )
    return x / (bias + alpha * sqr_sum) ** beta


def lrn_jnp(x, size, k, alpha, beta):
    """A plain jnp LRN (autodiff reference for the hand-written VJP)."""
    channels = x.shape[-1]
    sq = jnp.pad(x * x, [(0, 0)] * (x.ndim - 1) + [(size // 2, (size - 1) // 2)])
    s = k + alpha * sum(sq[..., i : i + channels] for i in range(size))
    return x / s**beta


# A large alpha so that the normalization visibly depends on the neighbours.
K, ALPHA, BETA = 1.5, 0.3, 0.75


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6])
def test_matches_paper_formula(x64, rng, size):
    x = rng.standard_normal((2, 3, 4, 7))
    y = local_response_norm(jnp.asarray(x), size=size, k=K, alpha=ALPHA, beta=BETA)
    assert y.dtype == jnp.float64 and y.shape == x.shape
    np.testing.assert_allclose(y, lrn_paper(x, size, K, ALPHA, BETA), rtol=1e-12, atol=1e-12)


def test_default_is_alexnet(x64, rng):
    # AlexNet: size 5, k 2, alpha 1e-4, beta 0.75.
    x = 30 * rng.standard_normal((1, 2, 2, 8))
    np.testing.assert_allclose(local_response_norm(jnp.asarray(x)),
                               lrn_paper(x, 5, 2.0, 1e-4, 0.75), rtol=1e-12)


def test_window_wider_than_channels(x64, rng):
    x = rng.standard_normal((3, 3))
    for size in (4, 7):
        np.testing.assert_allclose(local_response_norm(jnp.asarray(x), size=size, k=K,
                                                       alpha=ALPHA, beta=BETA),
                                   lrn_paper(x, size, K, ALPHA, BETA), rtol=1e-12)


def test_even_window_is_asymmetric(x64):
    # size 2 sums channels c-1 and c. x = [1, 3, 1, 1], k = alpha = beta = 1:
    # s = [1 + 1, 1 + 1 + 9, 1 + 9 + 1, 1 + 1 + 1] = [2, 11, 11, 3]
    x = jnp.asarray([[1.0, 3.0, 1.0, 1.0]], jnp.float64)
    y = local_response_norm(x, size=2, k=1.0, alpha=1.0, beta=1.0)
    np.testing.assert_allclose(y, [[1 / 2, 3 / 11, 1 / 11, 1 / 3]], rtol=1e-14)


def test_any_rank(x64, rng):
    for shape in [(7,), (3, 7), (2, 3, 7), (1, 2, 3, 7)]:
        x = rng.standard_normal(shape)
        np.testing.assert_allclose(local_response_norm(jnp.asarray(x), size=3, k=K, alpha=ALPHA,
                                                       beta=BETA),
                                   lrn_paper(x, 3, K, ALPHA, BETA), rtol=1e-12)


# --------------------------------------------------------------------------- other libraries


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6])
def test_torch_recipe_against_torch_formula(x64, rng, size):
    # torch.nn.LocalResponseNorm(size, alpha, beta, k) = local_response_norm(alpha=alpha/size)
    alpha, beta, k = 0.4, 0.6, 1.2
    x = rng.standard_normal((2, 5, 3, 4))  # NHWC
    want = lrn_torch_formula(x.transpose(0, 3, 1, 2), size, alpha, beta, k).transpose(0, 2, 3, 1)
    got = local_response_norm(jnp.asarray(x), size=size, alpha=alpha / size, beta=beta, k=k)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6])
def test_torch_recipe_against_torch(x64, rng, size):
    torch = pytest.importorskip("torch")
    alpha, beta, k = 0.4, 0.6, 1.2
    x = rng.standard_normal((2, 5, 3, 4))
    g = rng.standard_normal(x.shape)
    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    ty = torch.nn.LocalResponseNorm(size, alpha=alpha, beta=beta, k=k)(tx)
    ty.backward(torch.tensor(g.transpose(0, 3, 1, 2)))
    # The independent numpy formula agrees with torch itself ...
    np.testing.assert_allclose(lrn_torch_formula(x.transpose(0, 3, 1, 2), size, alpha, beta, k),
                               ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    # ... and so does the documented recipe, forward and backward.
    y, vjp = jax.vjp(lambda x: local_response_norm(x, size=size, alpha=alpha / size,
                                                   beta=beta, k=k), jnp.asarray(x))
    np.testing.assert_allclose(y, ty.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(vjp(jnp.asarray(g))[0], tx.grad.numpy().transpose(0, 2, 3, 1),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("depth_radius", [0, 1, 2, 3])
def test_tf_recipe_against_tf_formula(x64, rng, depth_radius):
    # tf.nn.local_response_normalization(depth_radius=r, bias, alpha, beta)
    #   = local_response_norm(size=2r+1, k=bias, alpha=alpha, beta=beta)
    bias, alpha, beta = 1.0, 0.25, 0.5
    x = rng.standard_normal((2, 3, 3, 6))
    got = local_response_norm(jnp.asarray(x), size=2 * depth_radius + 1, k=bias, alpha=alpha,
                              beta=beta)
    np.testing.assert_allclose(got, lrn_tf_formula(x, depth_radius, bias, alpha, beta),
                               rtol=1e-12, atol=1e-12)


def test_recipes_differ_from_paper(x64, rng):
    # Guard against a test that cannot fail: the torch convention really differs.
    x = rng.standard_normal((1, 2, 2, 6))
    paper = lrn_paper(x, 5, 1.0, 0.5, 0.75)
    torch_like = lrn_torch_formula(x.transpose(0, 3, 1, 2), 5, 0.5, 0.75, 1.0).transpose(
        0, 2, 3, 1)
    assert np.max(np.abs(paper - torch_like)) > 1e-2


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("size", [1, 2, 5])
def test_check_grads_order2(x64, rng, size):
    x = jnp.asarray(rng.standard_normal((2, 2, 6)))
    check_grads(lambda x: local_response_norm(x, size=size, k=K, alpha=ALPHA, beta=BETA), (x,),
                order=2, modes=["rev"])


@pytest.mark.parametrize("size", [2, 3])
def test_vjp_matches_autodiff(x64, rng, size):
    x = jnp.asarray(rng.standard_normal((2, 3, 7)))
    g = jnp.asarray(rng.standard_normal((2, 3, 7)))
    y, vjp = jax.vjp(lambda x: local_response_norm(x, size=size, k=K, alpha=ALPHA, beta=BETA), x)
    ref, ref_vjp = jax.vjp(lambda x: lrn_jnp(x, size, K, ALPHA, BETA), x)
    np.testing.assert_allclose(y, ref, rtol=1e-12)
    np.testing.assert_allclose(vjp(g)[0], ref_vjp(g)[0], rtol=1e-10, atol=1e-12)


def test_second_order_under_jit(x64, rng):
    # Regression: the channel window sum must stay differentiable under jit, where the
    # hand-written backward pass is itself differentiated (order 2).
    x = jnp.asarray(rng.standard_normal((2, 5)))

    def grad_norm(f):
        return lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(f(x) ** 2))(x) ** 2)

    ours = grad_norm(lambda x: local_response_norm(x, size=3, k=K, alpha=ALPHA, beta=BETA))
    ref = grad_norm(lambda x: lrn_jnp(x, 3, K, ALPHA, BETA))
    np.testing.assert_allclose(jax.jit(jax.grad(ours))(x), jax.grad(ref)(x), rtol=1e-10)


def test_uses_a_custom_vjp():
    jaxpr = str(jax.make_jaxpr(lambda x: local_response_norm(x))(jnp.ones((1, 4), jnp.float32)))
    assert "custom_vjp" in jaxpr


# --------------------------------------------------------------------------- dtypes, transforms


def test_float32(rng):
    x = rng.standard_normal((2, 3, 3, 8)).astype(np.float32)
    y = local_response_norm(jnp.asarray(x), size=3, k=K, alpha=ALPHA, beta=BETA)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, lrn_paper(x, 3, K, ALPHA, BETA), rtol=1e-5, atol=1e-6)


def test_bfloat16(rng):
    x = jnp.asarray(rng.standard_normal((2, 3, 3, 8)), jnp.bfloat16)
    y = local_response_norm(x, size=5, k=K, alpha=ALPHA, beta=BETA)
    assert y.dtype == jnp.bfloat16
    ref = lrn_paper(np.asarray(x, np.float32), 5, K, ALPHA, BETA)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=1e-2, atol=1e-2)
    dx = jax.grad(lambda x: jnp.sum(local_response_norm(x, size=5, k=K, alpha=ALPHA,
                                                        beta=BETA).astype(jnp.float32)))(x)
    assert dx.dtype == jnp.bfloat16
    ref_dx = jax.grad(lambda x: jnp.sum(lrn_jnp(x, 5, K, ALPHA, BETA)))(x.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(dx, np.float32), ref_dx, rtol=3e-2, atol=3e-2)


def test_integer_input_becomes_float32():
    y = local_response_norm(jnp.arange(6, dtype=jnp.int32).reshape(1, 6), size=3, k=1.0,
                            alpha=1.0, beta=1.0)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, lrn_paper(np.arange(6.0).reshape(1, 6), 3, 1.0, 1.0, 1.0),
                               rtol=1e-6)


def test_jit_vmap_grad(rng):
    x = rng.standard_normal((3, 2, 4, 4, 6)).astype(np.float32)
    f = jax.jit(lambda x: local_response_norm(x, size=3, k=K, alpha=ALPHA, beta=BETA))
    ys = jax.vmap(f)(x)
    np.testing.assert_allclose(ys, lrn_paper(x, 3, K, ALPHA, BETA), rtol=1e-5, atol=1e-6)
    dx = jax.jit(jax.grad(lambda x: jnp.sum(jax.vmap(f)(x) ** 2)))(x)
    ref = jax.grad(lambda x: jnp.sum(lrn_jnp(x, 3, K, ALPHA, BETA) ** 2))(x)
    np.testing.assert_allclose(dx, ref, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "x, kwargs, pattern",
    [
        (np.float32(1.0), {}, r"x must have a channel axis"),
        (np.ones((1, 4), np.float32), {"size": 0}, r"size must be a positive integer, got 0"),
        (np.ones((1, 4), np.float32), {"size": 2.5}, r"size must be a positive integer, got 2.5"),
        (np.ones((1, 4), np.float32), {"size": True}, r"size must be a positive integer, got True"),
        (np.ones((1, 4), np.float32), {"k": 0.0, "alpha": 0.0}, r"zero denominator; use k > 0"),
        (np.ones((1, 4), np.float32), {"k": -1.0}, r"k and alpha must be >= 0, got k=-1.0"),
        (np.ones((1, 4), np.float32), {"alpha": -1e-4}, r"k and alpha must be >= 0"),
    ],
)
def test_bad_arguments(x, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        local_response_norm(x, **kwargs)
