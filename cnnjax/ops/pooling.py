"""Max, average and L2-norm pooling over NHWC windows, and global pooling.

Every pool takes ``(x, window, stride=None, padding=0)``: ``window`` is F (an
int or ``(F_h, F_w)``), ``stride`` S defaults to F (non-overlapping; the
lecture's overlapping pooling is ``window=3, stride=2``), ``padding`` is any
form :func:`cnnjax.shapes.normalize_padding` accepts. The output size is
``floor((W - F + P_lo + P_hi) / S) + 1`` per dimension; pooling introduces no
parameters.

Padded cells: ``max_pool`` pads with -inf (a padded cell never wins);
``avg_pool`` counts padded zeros in the divisor by default
(``count_include_pad=True``, as PyTorch's ``AvgPool2d`` and Flax's
``avg_pool``); pass ``count_include_pad=False`` to divide by the number of real
cells, as Keras' ``AveragePooling2D(padding="same")`` does. ``l2_pool`` pads
with zeros, which add nothing to the sum of squares.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnjax.ops._checks import check_nhwc
from cnnjax.ops._windows import offset_windows
from cnnjax.shapes import (
    Padding2D,
    conv_output_hw,
    conv_output_size,
    normalize_padding,
    to_pair,
)

__all__ = ["max_pool", "avg_pool", "l2_pool", "global_avg_pool", "global_max_pool"]


# The reduce_window init values are numpy constants on purpose: lax.reduce_window
# only uses its differentiable max/sum primitives when the init value is concrete,
# and a jnp constant is a tracer under jit (grad of a jitted pool then fails).


def _window_args(x, window, stride, padding, op):
    check_nhwc(x, "x", op)
    f = to_pair(window, f"{op}: window")
    s = f if stride is None else to_pair(stride, f"{op}: stride")
    pads = normalize_padding(padding, x.shape[1:3], f, s)
    for dim, n, fi, si, p in zip(("height", "width"), x.shape[1:3], f, s, pads, strict=False):
        conv_output_size(n, fi, si, p, 1, exact=False, name=f"{op} ({dim})")
    return (1, *f, 1), (1, *s, 1), ((0, 0), *pads, (0, 0))


def _as_float(x):
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def max_pool(
    x: jax.Array,
    window: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: Padding2D = 0,
) -> jax.Array:
    """Maximum over each F_h x F_w window of every channel (padding never wins).

    The derivative sends each window's gradient to the first maximum of the
    window in row-major order (PyTorch's and XLA's ``select_and_scatter`` rule;
    ties after a ReLU included), through :func:`_max_pool`'s own JVP.
    """
    x = _as_float(x)
    dims, strides, pads = _window_args(x, window, stride, padding, "max_pool")
    return _max_pool(x, dims, strides, pads)


# Up to this many cells per window the CPU takes a window's maximum as the
# elementwise maximum of its F_h F_w strided slices instead of a reduce_window.
# XLA:CPU hands reduce_windows to YNNPACK, which fuses them with the products
# that follow: VGG-16's last pool and its classifier ran 20x slower in one such
# fusion than apart (NOTES.md, attempt 23). 0 = always reduce_window.
SLICE_MAX_WINDOW_BY_BACKEND = {"cpu": 16, "gpu": 0, "tpu": 0}


def _padded_windows(x, dims, strides, pads, fill):
    """The F_h F_w strided slices of x padded with ``fill``, one per window offset."""
    xp = lax.pad(x, np.array(fill, x.dtype), [(lo, hi, 0) for lo, hi in pads])
    out_hw = conv_output_hw(x.shape[1:3], dims[1:3], strides[1:3], pads[1:3], exact=False)
    return offset_windows(xp, out_hw, dims[1:3], strides[1:3], (1, 1))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, dims, strides, pads):
    if dims[1] * dims[2] <= SLICE_MAX_WINDOW_BY_BACKEND.get(jax.default_backend(), 0):
        return functools.reduce(lax.max, _padded_windows(x, dims, strides, pads, -np.inf))
    return lax.reduce_window(x, np.array(-np.inf, x.dtype), lax.max, dims, strides, pads)


@_max_pool.defjvp
def _max_pool_jvp(dims, strides, pads, primals, tangents):
    # The tangent of a window's max is the tangent of the cell that holds it: a
    # sum over the F_h F_w window offsets of a one-hot mask times the strided
    # slice of t. It is linear in t, so JAX transposes it into the backward pass
    # (slices become interior pads): elementwise work XLA fuses, instead of the
    # index-tracking select_and_scatter that reduce_window's own derivative
    # becomes on XLA:CPU (a variadic argmax reduce_window over int32 iotas and a
    # scatter: 2-3x the time in AlexNet and VGG training steps).
    (x,), (t,) = primals, tangents
    y = _max_pool(x, dims, strides, pads)
    if dims == strides and not any(lo or hi for lo, hi in pads):
        return y, _tiled_max_tangent(x, y, t, dims[1:3])
    found = jnp.zeros(y.shape, bool)
    out = jnp.zeros(y.shape, t.dtype)
    for xs, ts in zip(_padded_windows(x, dims, strides, pads, -np.inf),
                      _padded_windows(t, dims, strides, pads, 0), strict=True):
        hit = (xs == y) & ~found
        found = found | hit
        out = out + jnp.where(hit, ts, jnp.zeros((), t.dtype))
    return y, out


def _tiled_max_tangent(x, y, t, f_hw):
    """The max's tangent where the windows tile the input (stride = window, no padding).

    Each window's first maximum is found once, as its row-major offset in a
    small integer array (the window size where there is none: a NaN window).
    The tangent is then a sum over the window axes of t viewed as (N, H_o, F_h,
    W_o, F_w, C), and its transpose one broadcast and select per input cell:
    VGG-16's block1_pool backward (with the ReLU's) 37 -> 10 ms of op time, the
    train step x0.98 (NOTES.md, attempt 76). The general form below recomputes
    every earlier window offset's comparison for each offset of each cell.
    """
    (fh, fw), (n, ho, wo, c) = f_hw, y.shape
    code_dtype = jnp.int8 if fh * fw <= 127 else jnp.int32
    code = jnp.full(y.shape, fh * fw, code_dtype)
    windows = offset_windows(x, (ho, wo), f_hw, f_hw, (1, 1))
    for k in reversed(range(fh * fw)):        # the first maximum wins
        code = jnp.where(windows[k] == y, np.array(k, code_dtype), code)
    t6 = t[:, : ho * fh, : wo * fw].reshape(n, ho, fh, wo, fw, c)
    offsets = (np.arange(fh)[:, None] * fw + np.arange(fw)).astype(code_dtype)
    hit = code[:, :, None, :, None, :] == offsets[None, None, :, None, :, None]
    return jnp.sum(jnp.where(hit, t6, jnp.zeros((), t.dtype)), axis=(2, 4))


# Up to this many cells per window the CPU sums a window as F_h F_w strided
# slices (elementwise adds XLA fuses with the layer before) instead of a
# reduce_window: fused with a convolution's direct loop and its tanh, XLA:CPU's
# reduce_window fusion ran LeNet-5's conv1 + tanh + pool 5x slower (NOTES.md,
# attempt 17). 0 = always reduce_window.
SLICE_SUM_WINDOW_BY_BACKEND = {"cpu": 16, "gpu": 0, "tpu": 0}


def _window_sum(x, dims, strides, pads, impl="auto"):
    """The sum over each window: ``reduce_window`` or a sum of strided slices."""
    area = dims[1] * dims[2]
    if impl == "auto":
        small = area <= SLICE_SUM_WINDOW_BY_BACKEND.get(jax.default_backend(), 0)
        impl = "slices" if small else "reduce_window"
    if impl == "reduce_window":
        return _reduce_window_sum(x, dims, strides, pads)
    return _slice_sum(x, dims, strides, pads)


def _reduce_window_sum(x, dims, strides, pads):
    return lax.reduce_window(x, np.zeros((), x.dtype), lax.add, dims, strides, pads)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _slice_sum(x, dims, strides, pads):
    windows = _padded_windows(x, dims, strides, pads, 0)
    total = windows[0]
    for w in windows[1:]:
        total = total + w
    return total


def _rows_then_columns_sum(x, dims, strides):
    """The window sum of an unpadded x: over F_h rows by a reduce_window on the
    (N, H, W C) view, whose rows are contiguous, then over F_w columns by strided
    slices of that."""
    n, h, w, c = x.shape
    (fh, fw), (sh, sw) = dims[1:3], strides[1:3]
    rows = lax.reduce_window(x.reshape(n, h, w * c), np.zeros((), x.dtype), lax.add,
                             (1, fh, 1), (1, sh, 1), "VALID")
    rows = rows.reshape(n, rows.shape[1], w, c)
    columns = offset_windows(rows, (rows.shape[1], (w - fw) // sw + 1), (1, fw), (1, sw), (1, 1))
    return functools.reduce(operator.add, columns)


@_slice_sum.defjvp
def _slice_sum_jvp(dims, strides, pads, primals, tangents):
    # Under differentiation the tangent's sum is a reduce_window: the backward pass
    # is then its transpose (a pad and a reduce_window). The sliced form's
    # transpose (F_h F_w interior pads, fused with the layer's activation
    # derivative) made LeNet-5's train step 3x slower on XLA:CPU. The primal is
    # not a sliced sum either: XLA fuses cheap producers into every consumer, and
    # the pooled map's consumers (the next layer's shifted patch rows) would each
    # recompute it from the kept activation (10% slower). A reduce_window is
    # computed once, but XLA:CPU's YNNPACK takes 0.55 ms of LeNet-5's 6 ms step
    # over pool1 (NOTES.md, attempt 70); over rows only, on the (N, H, W C) view,
    # it takes 0.13, and the F_w column sums of that are cheap to repeat.
    (x,), (t,) = primals, tangents
    if all(p == (0, 0) for p in pads):
        y = _rows_then_columns_sum(x, dims, strides)
    else:
        y = _reduce_window_sum(x, dims, strides, pads)
    return y, _reduce_window_sum(t, dims, strides, pads)


def avg_pool(
    x: jax.Array,
    window: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: Padding2D = 0,
    *,
    count_include_pad: bool = True,
) -> jax.Array:
    """Mean over each window; padded zeros count in the divisor unless count_include_pad=False."""
    x = _as_float(x)
    dims, strides, pads = _window_args(x, window, stride, padding, "avg_pool")
    acc = jnp.float32 if jnp.dtype(x.dtype).itemsize < 4 else x.dtype
    total = _window_sum(x.astype(acc), dims, strides, pads)
    if count_include_pad or all(p == (0, 0) for p in pads):
        return (total / (dims[1] * dims[2])).astype(x.dtype)
    ones = jnp.ones((1, *x.shape[1:3], 1), acc)
    count = _window_sum(ones, dims, strides, pads, "reduce_window")
    return (total / count).astype(x.dtype)


@jax.custom_jvp
def _safe_sqrt(v):
    return jnp.sqrt(v)


@_safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
    (v,), (t,) = primals, tangents
    y = jnp.sqrt(v)
    positive = y > 0
    # d sqrt(v) = dv / (2 sqrt(v)); at v = 0 (an all-zero window) use 0, not inf.
    return y, jnp.where(positive, t / (2 * jnp.where(positive, y, 1)), 0)


def l2_pool(
    x: jax.Array,
    window: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: Padding2D = 0,
) -> jax.Array:
    """sqrt of the SUM of squares over each window (torch.nn.LPPool2d(2, ...) semantics).

    The gradient of an all-zero window is defined as 0 (instead of NaN).
    """
    x = _as_float(x)
    dims, strides, pads = _window_args(x, window, stride, padding, "l2_pool")
    acc = jnp.float32 if jnp.dtype(x.dtype).itemsize < 4 else x.dtype
    xa = x.astype(acc)
    total = lax.reduce_window(xa * xa, np.zeros((), acc), lax.add, dims, strides, pads)
    return _safe_sqrt(total).astype(x.dtype)


def global_avg_pool(x: jax.Array, keepdims: bool = False) -> jax.Array:
    """Mean over height and width: (N, H, W, C) -> (N, C) (or (N, 1, 1, C))."""
    check_nhwc(x, "x", "global_avg_pool")
    x = _as_float(x)
    acc = jnp.float32 if jnp.dtype(x.dtype).itemsize < 4 else x.dtype
    return jnp.mean(x.astype(acc), axis=(1, 2), keepdims=keepdims).astype(x.dtype)


def global_max_pool(x: jax.Array, keepdims: bool = False) -> jax.Array:
    """Maximum over height and width: (N, H, W, C) -> (N, C) (or (N, 1, 1, C))."""
    check_nhwc(x, "x", "global_max_pool")
    return jnp.max(_as_float(x), axis=(1, 2), keepdims=keepdims)
