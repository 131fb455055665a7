"""2-D convolution with stride, zero padding and dilation, and a hand-written derivative.

Notation (one spatial dimension shown; the other is the same). Input ``x`` of
length ``W`` padded to ``xp`` with ``P_lo`` / ``P_hi`` zeros, filter ``w`` of size
``F``, stride ``S``, dilation ``D``::

    y[i, k] = sum_{a, c} xp[i*S + a*D, c] * w[a, c, k],
    i = 0 .. (W + P_lo + P_hi - D(F-1) - 1) // S

The derivative (the lecture: "backpropagation is a convolution with spatially
flipped filters"), with ``g = dL/dy``:

* ``dL/dx``: insert ``S - 1`` zeros between the entries of ``g`` (the
  stride-dilated ``g``), pad it by ``D(F-1) - P_lo`` in front, and correlate it
  with the spatially flipped, in/out-swapped filter ``w[F-1-a, k, c]`` at
  dilation ``D``; this is a forward convolution (``lhs_dilation = S``), so it
  runs at forward speed.
* ``dL/dw[a, c, k] = sum_{n, i} xp[n, i*S + a*D, c] * g[n, i, k]``: the
  correlation of the input with ``g``. Flatten the output pixels ``(n, i)`` to
  rows: with the patch matrix ``X[(n, i), (a, c)] = xp[n, i*S + a*D, c]``
  (im2col) this is the single matrix product ``dL/dw = X^T g`` of shapes
  ``(F C_in, N W_out) x (N W_out, K)``. ``weight_grad_impl`` picks how it is
  computed: ``"im2col"`` forms ``X`` one cache-sized block of rows at a time and
  sums ``X_block^T g_block`` over the blocks; ``"offsets"`` computes one
  product per filter offset ``a`` between the strided slice of ``xp`` that
  offset sees and ``g``; ``"xla"`` is the correlation as one convolution of
  ``xp`` with ``g`` (batch and feature axes exchanged); ``"per_image"`` (the
  CPU default for most layers) uses that the sum over ``n`` splits: it sums, over chunks of
  the batch small enough to stay in cache (usually one image), XLA's own
  derived weight gradient of the chunk, which XLA:CPU computes several times
  faster per image on a small chunk than on a large batch (an image larger
  than the chunk is split the same way into blocks of output rows).
  ``"stacked"`` forms the patch matrix the other way round, ``(F C_in, N W_out)``,
  one contiguous strided slice per (offset, channel) row, and takes the plain
  product with ``g``: the cheapest form when ``F C_in`` is small.
  ``"row_col"`` splits the two spatial offsets: a filter row offset ``a`` only
  selects rows of ``xp``, a column offset ``b`` only shifts ``g`` along the
  width. With ``G`` the ``F_w`` shifted copies of ``g`` stacked as
  ``(F_w K, pixels)`` rows, one plain product ``G xp_a`` per filter row gives
  the ``F_w`` offsets of that row at once: ``F_h`` products with ``F_w K`` rows
  and an ``F_w``-fold copy of ``g`` instead of im2col's ``F_h F_w``-fold patch
  matrix. It runs one cache-sized block of pixels at a time in a loop.
  ``"banded"`` uses that along the width a convolution is a product with a
  banded (Toeplitz) matrix: segments of ``F_h`` input rows against blocks of
  ``B_w`` output columns, one product ``(F_h B_in C_in, M / B_w) x (M / B_w,
  B_w K)`` whose band holds dL/dw (the cheapest form over a single input
  channel, LeNet-5's conv1; its product also yields dL/db, from a column of ones).
* ``dL/dx`` can also be taken as col2im (``input_grad_impl="col2im"``): the
  patch gradients ``g W^T``, each offset's slice added back at the input cells
  it read (``lax.pad`` with interior padding ``S - 1`` and edge padding that
  crops padded cells), which beats a convolution when ``F C_in`` is small; or
  as XLA's convolution per batch chunk (``input_grad_impl="per_image"``), which
  the CPU takes for strided filters; or in the banded form (``"banded"``): g
  times the transposed band, the row segments added back.
* ``dL/db[k] = sum_{n, i, j} g[n, i, j, k]`` (the bias is part of the VJP: the
  banded form takes it from its own product, the others sum ``g``).

A filter that covers the whole unpadded input (output ``1 x 1``) is a dense
layer, ``y = x_flat W_flat``, and is computed as one matrix product forward and
backward. The forward pass itself can also be the direct sum of ``F_h F_w
C_in`` shifted copies of ``x`` times a filter row (``forward_impl="direct"``,
picked on the CPU for patch widths up to 25, such as LeNet-5's conv1, where XLA
fuses it with the bias, :func:`cnnjax.ops.tanh` and a small average pool into
one loop), XLA's convolution per batch chunk (``"per_image"``, picked on the
CPU for a strided filter over an RGB image, such as AlexNet's conv1) or the banded
product, the input row segments times the filter's band (``"banded"``, picked on
the CPU for small unpadded layers with 5-wide filters, such as LeNet-5's conv2).

A 3x3 or 5x5 filter at stride 1 can take Winograd's minimal filtering
F(2x2, 3x3) or F(2x2, 5x5) (``forward_impl="winograd"``, picked on the CPU
for float32 from 96 input channels for 3x3 filters: VGG-16 from block2_conv2
on, AlexNet's conv3-5, the all-convolutional net's 96- and 192-channel 3x3
layers; from 32 for 5x5 filters: AlexNet's conv2): each 2x2 output tile comes
from the input tile under it as ``A^T [(G w G^T) * (B^T d B)] A``, 16
multiplications per tile and channel pair instead of 36 (3x3), 36 instead of
100 (5x5), i.e. 16 or 36 matrix products of 4/9 or 9/25 of the direct method's
work in all. Both gradients are such products too: dL/dx is the Winograd form
of the flipped filter's convolution, dL/dw the products of the transformed
input and the transformed output gradient.

Dilated convolutions can run natively (XLA's ``rhs_dilation``) or by the
"atrous" space-to-batch trick: split the padded input into ``D_h * D_w``
interleaved sub-images, run an undilated convolution over all of them as one
batch, and interleave the results back. Which one is faster depends on the
backend; ``dilation_impl="auto"`` picks the measured winner (see
``DILATION_IMPL_BY_BACKEND`` and experiments/benchmarks/).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnjax.ops._checks import check_nhwc, compute_dtype
from cnnjax.ops._windows import offset_windows as _offset_windows
from cnnjax.ops.linear import dense
from cnnjax.shapes import (
    Padding2D,
    ShapeError,
    conv_output_hw,
    conv_output_size,
    normalize_padding,
    to_pair,
)

__all__ = [
    "conv2d",
    "DILATION_IMPL_BY_BACKEND",
    "WEIGHT_GRAD_IMPL_BY_BACKEND",
    "ROW_COL_CHANNELS_BY_BACKEND",
    "STRIDED_INPUT_GRAD_IMPL_BY_BACKEND",
    "SMALL_PATCH_WIDTH_BY_BACKEND",
    "BANDED_MAX_CHANNELS_BY_BACKEND",
    "BANDED_FORWARD_MIN_WIDTH_BY_BACKEND",
    "DIRECT_PATCH_WIDTH_BY_BACKEND",
    "STRIDED_INPUT_CHANNELS_BY_BACKEND",
    "WINOGRAD_MIN_CHANNELS_BY_BACKEND",
]

_DN = ("NHWC", "HWIO", "NHWC")

# Measured on a 2-core x86 CPU (experiments/benchmarks/conv_kernels.py): the
# native dilated convolution costs the same at dilation 1, 2 and 4, while the
# space-to-batch form was 2-4x slower. Accelerators keep the native path until
# measured otherwise.
DILATION_IMPL_BY_BACKEND = {"cpu": "native", "gpu": "native", "tpu": "native"}
# The weight gradient: "per_image" (XLA's derived weight-gradient convolution per
# cache-sized chunk of the batch, summed), "im2col" (patches^T g, one matrix
# product per cache-sized block of patch rows), "offsets" (one matrix product per
# filter offset) or "xla" (the correlation of xp with g as one convolution with
# batch and feature axes exchanged). On the 2-core CPU "per_image" measured
# fastest for 3x3 64->64 at dilation 1, 2, 4 and for AlexNet's 11x11 stride-4
# conv1 (experiments/benchmarks/NOTES.md).
WEIGHT_GRAD_IMPL_BY_BACKEND = {"cpu": "per_image", "gpu": "xla", "tpu": "xla"}
# Stride-1 filters over at least this many input channels (C_in), with at most
# this many rows F_w K in the stacked shifted copies of g, take the "row_col"
# weight gradient instead on the CPU: (min C_in, max F_w K). There the F_h
# products (F_w K, M) x (M, C_in) of "row_col" ran at 100-130 GFLOP/s and XLA:CPU's
# weight-gradient convolution at 17-100: 1.8x faster on VGG-16's block1_conv2,
# 1.3-1.4x on block2_conv1 (2-3% of the whole train step), 2-6x on 1x1 filters,
# 1.2x at 3x3, 96 -> 256 (F_w K = 768). Slower: fewer input channels (16-48);
# torchvision AlexNet's conv2 (5x5, 192 filters: F_w K = 960) in the whole train
# step, though 1.1x faster alone; AlexNet's conv2 (F_w K = 1280) even alone
# (NOTES.md, attempts 47 and 53). Absent = never.
ROW_COL_CHANNELS_BY_BACKEND = {"cpu": (64, 768)}
# dL/dx of a strided filter: "per_image" is XLA's input-gradient convolution (a
# convolution of the stride-dilated g) per batch chunk of about _DGRAD_CHUNK_BYTES
# of g and dL/dx, when at least two images fit in one (else the whole batch at
# once, as "xla"). On the 2-core Intel CPU the all-convolutional net's 3x3 stride-2
# layer over 96 channels at 32x32 took 32 ms in chunks against 71 at once (its
# train step 6% faster); stride-1 layers measured the same or slower, AlexNet's
# 5x5 conv2 in the whole train step included (NOTES.md, attempt 58).
STRIDED_INPUT_GRAD_IMPL_BY_BACKEND = {"cpu": "per_image", "gpu": "xla", "tpu": "xla"}
# Layers with few input channels (LeNet-5's conv1/conv2, a 3x3 conv on RGB) are
# where XLA:CPU's convolutions are slowest: up to a patch width F_h F_w C_in of
# this many columns the CPU takes dL/dW from the stacked patch matrix
# ("stacked", unpadded inputs only) and dL/dx as col2im of g W^T ("col2im"),
# 1.5-2x faster there (NOTES.md). 0 = never.
SMALL_PATCH_WIDTH_BY_BACKEND = {"cpu": 256, "gpu": 0, "tpu": 0}
# Of those small unpadded layers, the ones with at most (C_in, K) input channels
# and filters (LeNet-5's conv1: one channel, 6 filters) take dL/dW in the "banded"
# form: input row segments against blocks of output columns, 2.3x faster than
# "stacked" there, 1.1-1.6x for one channel and 8-20 filters (3x3, 5x5, 7x7);
# from 32 filters (blocks of one or two columns) 1.1-1.2x slower, and LeNet-5's
# conv2 (6 -> 16) 1.3x slower (NOTES.md, attempt 66).
BANDED_MAX_CHANNELS_BY_BACKEND = {"cpu": (1, 24)}
# Small unpadded stride-1 layers (patch width up to SMALL_PATCH_WIDTH_BY_BACKEND,
# beyond the direct form's) with filters at least this wide, whose banded blocks
# hold two or more output columns, take the forward pass in the banded form: input
# row segments times the filter's band, one product. LeNet-5's conv2 (5x5, 6 ->
# 16, blocks of 2 columns): alone 0.79 -> 0.61 ms, train step x0.96, inference
# x0.92; a 5x5 6 -> 8 layer 0.58 -> 0.43; but 3x3 filters 1.2x slower and blocks
# of one column (im2col) x1.12 (NOTES.md, attempt 72). Absent = never.
BANDED_FORWARD_MIN_WIDTH_BY_BACKEND = {"cpu": 5}
# Up to this patch width the forward pass is the direct sum of F_h F_w C_in
# shifted, scaled copies of the input ("direct"), which XLA fuses into one loop
# together with the bias, the activation and a small pool. Alone it is 9x
# faster than XLA:CPU's convolution for LeNet-5's conv1 (25 columns). Fused
# with jnp.tanh the loop lost its vectorisation and the gain; with
# cnnjax.ops.tanh's rational form and avg_pool's sliced window sum, LeNet-5
# inference is 2x faster. VGG's block1_conv1 (27 columns) is 1.4x faster alone,
# but inside the whole network XLA splits its loop into five passes over the
# 224x224x64 output and inference got 8-16% slower: 25 is the limit (NOTES.md,
# attempts 10 and 17).
DIRECT_PATCH_WIDTH_BY_BACKEND = {"cpu": 25, "gpu": 0, "tpu": 0}

# A strided filter over an image with this many channels or fewer (AlexNet's
# conv1: 11x11, stride 4, RGB) runs its forward pass per batch chunk on the CPU:
# XLA:CPU's convolution of that shape is 2-2.5x faster on one or two images at a
# time than on a batch of 16 or 64. Other layers were 5-25% slower chunked (NOTES.md).
STRIDED_INPUT_CHANNELS_BY_BACKEND = {"cpu": 4, "gpu": 0, "tpu": 0}

# A 3x3 or 5x5 filter at stride 1 and dilation 1 over at least this many float32
# input channels (per filter size) takes Winograd's F(2x2, 3x3) or F(2x2, 5x5)
# form, forward and backward ("winograd"). 3x3, on the 2-core CPU, whole train
# steps: VGG-16 is faster with it from 128 input channels than from 256
# (block2_conv2 and block3_conv1 join; their weight gradients alone are 1.5x
# faster) and slower from 64 (block 1, where the tile transforms outweigh the
# saved products; again so with the hand-written backward of attempt 59); the
# all-convolutional net is about 1.4x faster from 96 than from 256, training and
# inference alike (NOTES.md, attempts 22 and 28). 5x5: AlexNet's train step
# x0.86, torchvision AlexNet's x0.90; a layer's forward and backward alone
# x0.71-0.85 from 32 channels, x1.3 at 16 and x2 at LeNet-5's 6 (attempt 59).
# "auto" takes it only when both gradient formulations are "auto" too (it has
# its own backward). Absent = never.
WINOGRAD_MIN_CHANNELS_BY_BACKEND = {"cpu": {3: 96, 5: 32}}

_IMPLS = ("auto", "native", "space_to_batch")
_FWD_IMPLS = ("auto", "xla", "direct", "banded", "per_image", "winograd")
_WGRAD_IMPLS = ("auto", "per_image", "row_col", "banded", "im2col", "stacked", "offsets",
                "xla")
_DGRAD_IMPLS = ("auto", "xla", "per_image", "col2im", "banded")


def _pick(table: dict, impl: str) -> str:
    if impl != "auto":
        return impl
    return table.get(
        jax.default_backend(), "native" if table is DILATION_IMPL_BY_BACKEND else "xla"
    )


def _is_full_window(x_hw, f_hw, pads, dilation) -> bool:
    """The filter covers the whole unpadded input: the convolution is one matrix product."""
    return tuple(x_hw) == tuple(f_hw) and pads == ((0, 0), (0, 0)) and dilation == (1, 1)


def _pick_grads(input_grad_impl, weight_grad_impl, w_shape, pads=((0, 0), (0, 0)),
                stride=(1, 1)):
    """The dL/dx and dL/dW formulations "auto" stands for, for this filter on this backend.

    The stacked weight gradient is only picked for unpadded inputs: with zero
    padding its patch rows are slices of a padded, channel-major copy, and it
    measured 1.4-6x slower than "per_image" (NOTES.md, attempt 18); those over a
    single input channel and few filters take "banded"
    (``BANDED_MAX_CHANNELS_BY_BACKEND``). Other stride-1 filters over many
    input channels take "row_col" where ``ROW_COL_CHANNELS_BY_BACKEND`` says so.
    """
    fh, fw, c, k = w_shape
    backend = jax.default_backend()
    small = fh * fw * c <= SMALL_PATCH_WIDTH_BY_BACKEND.get(backend, 0)
    if input_grad_impl == "auto":
        input_grad_impl = ("col2im" if small
                           else _pick(STRIDED_INPUT_GRAD_IMPL_BY_BACKEND, "auto")
                           if max(stride) > 1 else "xla")
    if weight_grad_impl == "auto":
        unpadded = all(p == (0, 0) for p in pads)
        min_c, max_rows = ROW_COL_CHANNELS_BY_BACKEND.get(backend, (None, None))
        max_c, max_k = BANDED_MAX_CHANNELS_BY_BACKEND.get(backend, (0, 0))
        if small and unpadded:
            weight_grad_impl = "banded" if c <= max_c and k <= max_k else "stacked"
        elif (min_c is not None and tuple(stride) == (1, 1) and c >= min_c
              and fw * k <= max_rows):
            weight_grad_impl = "row_col"
        else:
            weight_grad_impl = _pick(WEIGHT_GRAD_IMPL_BY_BACKEND, "auto")
    return input_grad_impl, weight_grad_impl


def _winograd_fits(w_shape, stride, dilation) -> bool:
    return (w_shape[0] == w_shape[1] and w_shape[0] in _WINOGRAD_TILE
            and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1))


def _pick_forward(forward_impl, w_shape, stride=(1, 1), dilation=(1, 1), dtype=jnp.float32,
                  grads_auto=True, pads=None, out_w=None):
    """The forward formulation "auto" stands for. Winograd's form brings its own
    backward, so it is only picked when the gradient formulations are left to
    "auto" as well (``grads_auto``). The banded form needs the padding and the
    output width (``pads``, ``out_w``) to be picked."""
    if forward_impl != "auto":
        return forward_impl
    fh, fw, c, k = w_shape
    backend = jax.default_backend()
    if fh * fw * c <= DIRECT_PATCH_WIDTH_BY_BACKEND.get(backend, 0):
        return "direct"
    min_width = BANDED_FORWARD_MIN_WIDTH_BY_BACKEND.get(backend)
    if (min_width is not None and out_w is not None and pads is not None
            and fh * fw * c <= SMALL_PATCH_WIDTH_BY_BACKEND.get(backend, 0)
            and all(p == (0, 0) for p in pads) and tuple(stride) == (1, 1)
            and tuple(dilation) == (1, 1) and fw >= min_width and _band_block(out_w, k) >= 2):
        return "banded"
    min_channels = WINOGRAD_MIN_CHANNELS_BY_BACKEND.get(backend, {}).get(fh)
    if (grads_auto and min_channels is not None and c >= min_channels
            and jnp.dtype(dtype) == jnp.float32 and _winograd_fits(w_shape, stride, dilation)):
        return "winograd"
    if max(stride) > 1 and c <= STRIDED_INPUT_CHANNELS_BY_BACKEND.get(backend, 0):
        return "per_image"
    return "xla"


def _native_conv(x, w, stride, pads, dilation, lhs_dilation=(1, 1)):
    return lax.conv_general_dilated(
        x,
        w,
        window_strides=stride,
        padding=pads,
        lhs_dilation=lhs_dilation,
        rhs_dilation=dilation,
        dimension_numbers=_DN,
    )


def _space_to_batch_conv(x, w, pads, dilation):
    """Stride-1 dilated convolution as an undilated one over D_h*D_w sub-images."""
    dh, dw = dilation
    # Negative padding (from the input-gradient formula) crops; lax.pad does both.
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
    n, hp, wp, c = xp.shape
    fh, fw = w.shape[:2]
    ho, wo = hp - dh * (fh - 1), wp - dw * (fw - 1)
    hq, wq = -(-hp // dh), -(-wp // dw)
    xp = jnp.pad(xp, ((0, 0), (0, hq * dh - hp), (0, wq * dw - wp), (0, 0)))
    xb = (
        xp.reshape(n, hq, dh, wq, dw, c).transpose(2, 4, 0, 1, 3, 5).reshape(dh * dw * n, hq, wq, c)
    )
    yb = lax.conv_general_dilated(xb, w, (1, 1), "VALID", dimension_numbers=_DN)
    hb, wb, k = yb.shape[1], yb.shape[2], yb.shape[3]
    y = yb.reshape(dh, dw, n, hb, wb, k).transpose(2, 3, 0, 4, 1, 5).reshape(n, hb * dh, wb * dw, k)
    return y[:, :ho, :wo, :]


def _dense(x, w):
    """A full-window convolution as (N, F_h F_w C) x (F_h F_w C, K): output 1 x 1, the
    same product as the fully connected layer it equals (:func:`cnnjax.ops.dense`)."""
    y = dense(x.reshape(x.shape[0], -1), w.reshape(-1, w.shape[3]))
    return y.reshape(x.shape[0], 1, 1, w.shape[3])


def _direct_conv(x, w, stride, pads, dilation):
    """y = sum over (a, b, c) of the strided slice of xp that offset (a, b) sees, channel c,
    times the filter row w[a, b, c, :]: F_h F_w C_in multiply-adds per output, one fused loop."""
    fh, fw, c, _ = w.shape
    acc = jnp.float32 if jnp.dtype(x.dtype).itemsize < 4 else x.dtype
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
    out_hw = conv_output_hw(x.shape[1:3], (fh, fw), stride, pads, dilation, exact=False)
    windows = _offset_windows(xp, out_hw, (fh, fw), stride, dilation)
    wa = w.astype(acc)
    y = None
    for i, window in enumerate(windows):
        a, b = divmod(i, fw)
        for ci in range(c):
            term = window[..., ci : ci + 1].astype(acc) * wa[a, b, ci]
            y = term if y is None else y + term
    return y.astype(x.dtype)


def _forward_per_image(x, w, stride, pads, dilation):
    """XLA's convolution over batch chunks of about _CHUNK_BYTES of input and output."""
    n = x.shape[0]
    out_hw = conv_output_hw(x.shape[1:3], w.shape[:2], stride, pads, dilation, exact=False)
    per_image = (x[0].size + out_hw[0] * out_hw[1] * w.shape[3]) * jnp.dtype(x.dtype).itemsize
    size = max(1, _CHUNK_BYTES // per_image, -(-n // _MAX_CHUNKS))
    return _native_conv_in_chunks(x, w, size, stride, pads, dilation)


def _in_batch_chunks(f, x, size):
    """f(x) for a per-image f, computed on batch chunks of ``size`` images, concatenated."""
    if size >= x.shape[0]:
        return f(x)
    return jnp.concatenate([f(x[i : i + size]) for i in range(0, x.shape[0], size)])


def _native_conv_in_chunks(x, w, size, stride, pads, dilation, lhs_dilation=(1, 1)):
    """XLA's convolution of x in batch chunks of ``size`` images, concatenated."""
    return _in_batch_chunks(
        lambda chunk: _native_conv(chunk, w, stride, pads, dilation, lhs_dilation), x, size)


# Winograd's minimal filtering F(m, r) (Lavin & Gray, "Fast Algorithms for
# Convolutional Neural Networks", 2016): m outputs of an r-tap correlation from
# a tile d of t = m + r - 1 cells as A^T [(G w) * (B^T d)], t products instead
# of m r. In 2-D, F(m x m, r x r): Y = A^T [(G w G^T) * (B^T d B)] A, t^2
# products instead of m^2 r^2. The tile per filter size (F(2x2, 3x3): 16
# products instead of 36; F(2x2, 5x5): 36 instead of 100) and the points the
# matrices are built on follow; larger tiles save more products but need points
# further from 0 and lose float32 accuracy (F(4x4, 3x3) measured 20x the error
# of F(2x2, 3x3); NOTES.md, attempt 59).
_WINOGRAD_TILE = {3: 2, 5: 2}
_WINOGRAD_POINTS = (0, 1, -1, 2, Fraction(-1, 2))


@functools.cache
def _winograd_matrices(m: int, r: int):
    """(B^T, G, A^T) of F(m, r) by the Toom-Cook construction, as tuples of floats.

    F(m, r) is the transpose of the linear convolution of a degree m - 1 and a
    degree r - 1 polynomial, computed by evaluating both at t - 1 finite points
    p_j and at infinity (the leading coefficients), multiplying, and
    interpolating the degree t - 1 product: ``A^T`` evaluates the m-term
    polynomial (rows ``p_j^i``, the point at infinity picks the last
    coefficient), ``G`` the filter (``p_j^k / f_j`` with ``f_j = prod_{l != j}
    (p_j - p_l)``, the Lagrange denominators moved onto the filter), and row j of
    ``B^T`` holds the coefficients of ``prod_{l != j} (x - p_l)`` (infinity's:
    ``prod_l (x - p_l)``). Exact in rational arithmetic, then rounded once.
    """
    t = m + r - 1
    if t - 1 > len(_WINOGRAD_POINTS):
        raise ValueError(f"F({m}, {r}) needs {t - 1} points; {len(_WINOGRAD_POINTS)} are set.")
    points = [Fraction(p) for p in _WINOGRAD_POINTS[: t - 1]]

    def poly(roots):  # coefficients of prod (x - root), constant term first
        c = [Fraction(1)]
        for root in roots:
            c = [(c[i - 1] if i > 0 else 0) - root * (c[i] if i < len(c) else 0)
                 for i in range(len(c) + 1)]
        return c

    bt, g = [], []
    for j, p in enumerate(points):
        others = points[:j] + points[j + 1 :]
        f = functools.reduce(lambda a, q: a * (p - q), others, Fraction(1))
        bt.append([*poly(others), Fraction(0)])
        g.append([p**k / f for k in range(r)])
    bt.append(poly(points))
    g.append([Fraction(int(k == r - 1)) for k in range(r)])
    at = [[p**i for p in points] + [Fraction(int(i == m - 1))] for i in range(m)]

    def as_float(rows):
        return tuple(tuple(float(v) for v in row) for row in rows)

    return as_float(bt), as_float(g), as_float(at)


def _combine(coefficients, terms):
    """sum_i coefficients[i] * terms[i], skipping zeros and multiplying by +-1 for free."""
    total = None
    for coefficient, term in zip(coefficients, terms, strict=True):
        if coefficient == 0:
            continue
        if coefficient != 1:
            term = -term if coefficient == -1 else term * jnp.asarray(coefficient, term.dtype)
        total = term if total is None else total + term
    return total


def _winograd_tiles(xp, mat, m, th, tw):
    """``T[a][b] = sum_{u,v} mat[a][u] mat[b][v] xp[:, m i + u, m j + v]`` per tile (i, j).

    ``mat`` has one coefficient row per transformed entry, over the offsets in a
    tile; with B^T it is Winograd's input transform ``B^T d B``, with the
    transposed A^T the transpose of its output transform. Rows first: each
    entry is a sum of strided slices, which XLA fuses into one loop.
    """
    span = len(mat[0])
    rows = [lax.slice_in_dim(xp, u, u + m * (th - 1) + 1, m, axis=1) for u in range(span)]
    out = []
    for row in mat:
        row_a = _combine(row, rows)  # (N, T_h, W_p, C)
        cols = [lax.slice_in_dim(row_a, v, v + m * (tw - 1) + 1, m, axis=2) for v in range(span)]
        out.append([_combine(col, cols) for col in mat])
    return out


def _winograd_setup(x_hw, r, pads):
    m = _WINOGRAD_TILE[r]
    ho, wo = conv_output_hw(x_hw, (r, r), 1, pads, exact=False)
    return m, ho, wo, -(-ho // m), -(-wo // m)


def _winograd_input(x, r, pads, acc, m, th, tw):
    """The padded input, completed with zero rows/columns to T_h x T_w whole tiles."""
    (top, _), (left, _) = pads
    h, wd = x.shape[1:3]
    return lax.pad(x.astype(acc), jnp.zeros((), acc),
                   ((0, 0, 0), (top, m * th + r - 1 - h - top, 0),
                    (left, m * tw + r - 1 - wd - left, 0), (0, 0, 0)))


# The transformed tiles of a Winograd convolution (t^2 / m^2 times the input and
# the output: 4x for F(2x2, 3x3), 9x for F(2x2, 5x5)) are held for at most this
# many bytes at once: a larger batch runs in chunks of images (chunks measured
# as fast as the whole batch; NOTES.md, attempt 59).
_WINOGRAD_CHUNK_BYTES = 256 * 2**20


def _winograd_chunk(x_shape, r, pads, c, k, itemsize=4):
    """Images per chunk that keep the transformed tiles within _WINOGRAD_CHUNK_BYTES."""
    m, _, _, th, tw = _winograd_setup(x_shape[1:3], r, pads)
    per_image = (m + r - 1) ** 2 * th * tw * (c + k) * max(itemsize, 4)
    return max(1, _WINOGRAD_CHUNK_BYTES // per_image)


def _winograd_conv(x, w, pads, flipped=False):
    """An r x r (3x3 or 5x5), stride-1 convolution in Winograd's F(m x m, r x r) form.

    The output is cut into m x m tiles (m from ``_WINOGRAD_TILE``); tile (i, j)
    reads the input tile of t = m + r - 1 cells square at rows m i.., columns
    m j.. of the padded input. With ``V = B^T d B`` per input tile and channel,
    ``U = G w G^T`` per filter, the t^2 entries ``(a, b)`` of a tile are
    independent: ``M_ab = V_ab U_ab`` is one matrix product ``(N T_h T_w, C_in)
    x (C_in, K)`` per entry (F(2x2, 3x3): 16 products of 4/9 of the direct
    method's multiply-adds in all; F(2x2, 5x5): 36 of 9/25), and ``Y = A^T M A``
    gives the m x m outputs. Every transform is a sum of strided slices scaled
    by small constants (XLA fuses each into one loop); the products stay
    separate arrays (stacking them for one batched product was slower on
    XLA:CPU). The float32 error stays within a small factor of XLA's
    convolution's (F(2x2, 3x3): about 1x; F(2x2, 5x5): 2-3x for the output and
    dL/dx, up to 10x for dL/dw; a few 1e-6 of the largest value or less);
    narrower floats are computed in float32. A NaN or infinite input makes the
    same outputs non-finite as the direct sum, but as NaN where the direct sum
    gives +-inf (the transforms subtract it from itself). With ``flipped`` the
    filter is ``w[::-1, ::-1]`` with its two channel axes swapped (dL/dx's
    filter), taken from ``w`` without forming it. The gradients are
    :func:`_winograd_grads`.
    """
    acc = jnp.float32 if jnp.dtype(x.dtype).itemsize < 4 else x.dtype
    n, _, _, c = x.shape
    r, k = w.shape[0], w.shape[2 if flipped else 3]
    size = _winograd_chunk(x.shape, r, pads, c, k, jnp.dtype(acc).itemsize)
    if size < n:
        return _in_batch_chunks(lambda chunk: _winograd_conv(chunk, w, pads, flipped), x, size)
    m, ho, wo, th, tw = _winograd_setup(x.shape[1:3], r, pads)
    t = m + r - 1
    bt, gm, at = _winograd_matrices(m, r)
    v = _winograd_tiles(_winograd_input(x, r, pads, acc, m, th, tw), bt, m, th, tw)
    wa = w.astype(acc)
    if flipped:  # the filter w[::-1, ::-1] with C and K swapped, without forming it
        gm = tuple(row[::-1] for row in gm)
    g_rows = [_combine(gi, [wa[i] for i in range(r)]) for gi in gm]  # (t, r, ., .): G w
    contract = (((1,), (1,)) if flipped else ((1,), (0,)), ((), ()))
    prods = [[None] * t for _ in range(t)]
    for a in range(t):
        for b in range(t):
            u_ab = _combine(gm[b], [g_rows[a][j] for j in range(r)])
            prods[a][b] = lax.dot_general(v[a][b].reshape(-1, c), u_ab, contract,
                                          preferred_element_type=acc).reshape(n, th, tw, k)
    tiles = []
    for i in range(m):
        rows_i = [_combine(at[i], [prods[a][b] for a in range(t)]) for b in range(t)]
        tiles.append(jnp.stack([_combine(at[j], rows_i) for j in range(m)], axis=3))
    y = jnp.stack(tiles, axis=2).reshape(n, m * th, m * tw, k)  # (N, T_h, i, T_w, j, K)
    return y[:, :ho, :wo].astype(x.dtype)


def _winograd_grads(x, w, g, pads):
    """(dL/dx, dL/dw) of :func:`_winograd_conv`, both in Winograd's form again.

    dL/dx is the stride-1 correlation of g with the flipped, in/out-swapped
    filter (this module's docstring), itself a Winograd convolution of the same
    filter size. dL/dw: with ``dM = A g A^T`` per output tile (the transpose of
    the output transform, zero where the last tile overhangs the output),
    ``dU_ab = V_ab^T dM_ab`` is one ``(C_in, N T_h T_w) x (N T_h T_w, K)``
    product per entry and ``dL/dw = G^T dU G``. Taken this way, rather than by
    differentiating the form, every transform is again a fused sum of strided
    slices: autodiff's transposes of them (interior-padded copies of the input
    added up) took more time than the products (NOTES.md, attempt 59).
    Padding wider than the filter (a negative pad for dL/dx) takes the
    derivative of the form instead.
    """
    r = w.shape[0]
    if any(lo > r - 1 or hi > r - 1 for lo, hi in pads):
        return jax.vjp(lambda x, w: _winograd_conv(x, w, pads), x, w)[1](g)
    acc = jnp.float32 if jnp.dtype(x.dtype).itemsize < 4 else x.dtype
    dx = _winograd_conv(g, w, tuple((r - 1 - lo, r - 1 - hi) for lo, hi in pads), flipped=True)
    n, c, k = x.shape[0], w.shape[2], w.shape[3]
    size = _winograd_chunk(x.shape, r, pads, c, k, jnp.dtype(acc).itemsize)
    dw = None
    for i in range(0, n, size):
        term = _winograd_weight_grad(x[i : i + size], g[i : i + size], w.shape, pads, acc)
        dw = term if dw is None else dw + term
    return dx.astype(x.dtype), dw.astype(w.dtype)


def _winograd_weight_grad(x, g, w_shape, pads, acc):
    """dL/dw = G^T dU G with dU_ab = V_ab^T dM_ab (see _winograd_grads)."""
    r, _, c, k = w_shape
    m, ho, wo, th, tw = _winograd_setup(x.shape[1:3], r, pads)
    t = m + r - 1
    bt, gm, at = _winograd_matrices(m, r)
    v = _winograd_tiles(_winograd_input(x, r, pads, acc, m, th, tw), bt, m, th, tw)
    gp = lax.pad(g.astype(acc), jnp.zeros((), acc),
                 ((0, 0, 0), (0, m * th - ho, 0), (0, m * tw - wo, 0), (0, 0, 0)))
    dm = _winograd_tiles(gp, tuple(zip(*at, strict=True)), m, th, tw)
    du = [[_tn_dot(v[a][b].reshape(-1, c), dm[a][b].reshape(-1, k), acc) for b in range(t)]
          for a in range(t)]  # (C, K) each
    g_cols = tuple(zip(*gm, strict=True))  # G^T, (r, t)
    rows = [[_combine(gi, [du[a][b] for a in range(t)]) for b in range(t)] for gi in g_cols]
    return jnp.stack([jnp.stack([_combine(gj, row) for gj in g_cols]) for row in rows])


def _forward(x, w, stride, pads, dilation, impl):
    if impl == "winograd":
        return _winograd_conv(x, w, pads)
    if impl == "dense":
        return _dense(x, w)
    if impl == "per_image":
        return _forward_per_image(x, w, stride, pads, dilation)
    if impl == "direct":
        return _direct_conv(x, w, stride, pads, dilation)
    if impl == "banded":
        return _banded_conv(x, w, stride, pads, dilation)
    if impl == "space_to_batch" and stride == (1, 1) and dilation != (1, 1):
        return _space_to_batch_conv(x, w, pads, dilation)
    return _native_conv(x, w, stride, pads, dilation)


def _input_grad_col2im(g, w, x_hw, stride, pads, dilation):
    """dL/dx as col2im: the patch gradients g W^T, each added back where its patch was read.

    ``G = g W^T`` (shape ``(N H_out W_out, F_h F_w C)``) holds, per output pixel and
    filter offset ``(a, b)``, the gradient of the input cell that offset read:
    ``x[i S_h + a D_h - P_top, j S_w + b D_w - P_left]``. Each offset's slice of
    ``G`` is spread back onto the input grid by ``lax.pad`` (interior padding S - 1,
    edge padding that may be negative, which crops cells that were padding): first
    along the width, the F_w slices of one filter row summed, then each of the F_h
    row sums along the height. XLA fuses it all into one loop; nested so, the
    loop checks the row bounds F_h times per cell instead of F_h F_w times
    (LeNet-5's conv2: the fused col2im 0.70 -> 0.49 ms of the train step, the step
    x0.95; NOTES.md, attempt 73).
    """
    fh, fw, c, k = w.shape
    n, ho, wo, _ = g.shape
    cols = jnp.dot(g.reshape(-1, k), w.reshape(-1, k).T).reshape(n, ho, wo, fh, fw, c)
    zero = jnp.zeros((), g.dtype)
    dx = None
    for a in range(fh):
        row = None
        for b in range(fw):
            edges = _scatter_edges(x_hw, (ho, wo), stride, pads, dilation, 1, b)
            term = lax.pad(cols[:, :, :, a, b, :], zero, ((0, 0, 0), (0, 0, 0), edges, (0, 0, 0)))
            row = term if row is None else row + term
        edges = _scatter_edges(x_hw, (ho, wo), stride, pads, dilation, 0, a)
        term = lax.pad(row, zero, ((0, 0, 0), edges, (0, 0, 0), (0, 0, 0)))
        dx = term if dx is None else dx + term
    return dx


def _scatter_edges(x_hw, out_hw, stride, pads, dilation, axis, offset):
    """``lax.pad``'s (low, high, interior) along ``axis`` that puts the values filter
    offset ``offset`` read (one per output position) back on the input grid: low is
    the input index output 0 read there (negative high or low crops padding)."""
    start = offset * dilation[axis] - pads[axis][0]
    return (start, x_hw[axis] - start - (out_hw[axis] - 1) * stride[axis] - 1, stride[axis] - 1)


def _input_grad_banded(g, w, x_hw, stride, pads, dilation):
    """dL/dx through the banded form (see :func:`_weight_grad_banded`).

    ``g`` in blocks of B_w output columns times the transposed band of the filter
    gives, per output row and block, the gradient of the F_h input row segments
    of B_in columns that block read. The segments are added back along the width
    (block j's columns q B_w S_w onwards land on block j + q's) and then the F_h
    rows along the height, which crops the cells that were padding.
    """
    fh, fw, c, k = w.shape
    sw, dw = stride[1], dilation[1]
    n, ho, wo, _ = g.shape
    bw, nb, bin_ = _band_geometry(wo, k, fw, sw, dw)
    step = bw * sw
    band = _band_matrix(w, bin_, bw, sw, dw)
    segs = lax.dot_general(g.reshape(-1, bw * k), band, (((1,), (1,)), ((), ())))
    segs = segs.reshape(n, ho, nb, fh, bin_, c)
    pieces = -(-bin_ // step)
    if pieces * step > bin_:
        segs = jnp.pad(segs, ((0, 0),) * 4 + ((0, pieces * step - bin_), (0, 0)))
    segs = jnp.moveaxis(segs, 3, 2)  # (N, H_out, F_h, nb, pieces * step, C)
    cols = None
    for q in range(pieces):
        piece = segs[:, :, :, :, q * step : (q + 1) * step].reshape(n, ho, fh, nb * step, c)
        piece = jnp.pad(piece, ((0, 0), (0, 0), (0, 0), (q * step, (pieces - 1 - q) * step),
                                (0, 0)))
        cols = piece if cols is None else cols + piece
    # cols: (N, H_out, F_h, width, C) over padded input columns 0 .. width - 1.
    left, width = pads[1][0], cols.shape[3]
    cols = lax.pad(cols, jnp.zeros((), cols.dtype),
                   ((0, 0, 0),) * 3 + ((-left, left + x_hw[1] - width, 0), (0, 0, 0)))
    zero = jnp.zeros((), g.dtype)
    dx = None
    for a in range(fh):
        edges = _scatter_edges(x_hw, (ho, wo), stride, pads, dilation, 0, a)
        term = lax.pad(cols[:, :, a], zero, ((0, 0, 0), edges, (0, 0, 0), (0, 0, 0)))
        dx = term if dx is None else dx + term
    return dx


def _input_grad(g, w, x_hw, stride, pads, dilation, impl, dgrad_impl="xla"):
    """dL/dx: forward convolution of the stride-dilated g with the flipped filter."""
    if impl == "dense":
        return jnp.dot(g.reshape(g.shape[0], -1), w.reshape(-1, w.shape[3]).T).reshape(
            g.shape[0], *x_hw, w.shape[2])
    if dgrad_impl == "col2im":
        return _input_grad_col2im(g, w, x_hw, stride, pads, dilation)
    if dgrad_impl == "banded":
        return _input_grad_banded(g, w, x_hw, stride, pads, dilation)
    fh, fw = w.shape[:2]
    w_flipped = jnp.swapaxes(w[::-1, ::-1], 2, 3)  # (F_h, F_w, K, C)
    grad_pads = []
    for n, f, s, d, (lo, _), out in zip(
        x_hw, (fh, fw), stride, dilation, pads, g.shape[1:3], strict=True
    ):
        f_eff = d * (f - 1) + 1
        before = f_eff - 1 - lo
        after = n + f_eff - 1 - before - ((out - 1) * s + 1)
        grad_pads.append((before, after))
    grad_pads = tuple(grad_pads)
    if stride == (1, 1) and impl == "space_to_batch" and dilation != (1, 1):
        return _space_to_batch_conv(g, w_flipped, grad_pads, dilation)
    if dgrad_impl == "per_image":
        n = g.shape[0]
        per_image = (g[0].size + x_hw[0] * x_hw[1] * w.shape[2]) * jnp.dtype(g.dtype).itemsize
        size = max(_DGRAD_CHUNK_BYTES // per_image, -(-n // _MAX_CHUNKS))
        if size >= 2:  # one image per chunk measured slower than the whole batch
            return _native_conv_in_chunks(g, w_flipped, size, (1, 1), grad_pads, dilation,
                                          lhs_dilation=stride)
    return _native_conv(g, w_flipped, (1, 1), grad_pads, dilation, lhs_dilation=stride)


def _tn_dot(a, b, acc):
    """a^T b for 2-D a (M, P) and b (M, K), contracting the long axis M."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=acc)


# Patch rows per block of the blocked im2col weight gradient: the block's
# patches, (rows, F_h F_w C_in), should stay in the last-level cache.
_IM2COL_BLOCK_BYTES = 4 * 2**20
_IM2COL_MIN_ROWS = 256


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


def _im2col_blocks(n, ho, wo, row_bytes):
    """(images per block, output rows per block): about _IM2COL_BLOCK_BYTES of patches."""
    target = max(_IM2COL_MIN_ROWS, _IM2COL_BLOCK_BYTES // row_bytes)
    if n * ho * wo <= target:
        return n, ho
    if n * wo <= target:
        return n, max(1, target // (n * wo))
    if ho * wo <= target:
        return _largest_divisor_at_most(n, target // (ho * wo)), ho
    return 1, max(1, target // wo)


def _weight_grad_im2col(xp, g, w_shape, stride, dilation, acc):
    """dL/dw as (patches)^T g, one matrix product per cache-sized block of patches.

    The patch matrix of a block of output pixels holds, per pixel, the F_h F_w C_in
    input values its filter window sees; dL/dw (flattened to (F_h F_w C_in, K)) is
    the sum over blocks of patches^T (M_block, F_h F_w C_in) x g (M_block, K).
    Blocking keeps the patches in cache instead of materialising all of them.
    """
    fh, fw, c, k = w_shape
    n, ho, wo, _ = g.shape
    bn, r = _im2col_blocks(n, ho, wo, fh * fw * c * jnp.dtype(xp.dtype).itemsize)

    def block(xb, gb):
        windows = _offset_windows(xb, (gb.shape[1], wo), (fh, fw), stride, dilation)
        patches = jnp.concatenate(windows, axis=-1).reshape(-1, fh * fw * c)
        return _tn_dot(patches, gb.reshape(-1, k), acc)

    if (bn, r) == (n, ho):
        return block(xp, g).reshape(fh, fw, c, k)
    n_row_blocks = -(-ho // r)
    n_blocks = (n // bn) * n_row_blocks
    span = (r - 1) * stride[0] + (fh - 1) * dilation[0] + 1
    need = (n_row_blocks * r - 1) * stride[0] + (fh - 1) * dilation[0] + 1
    # Zero rows of g (and of xp) complete the last row block; they add nothing.
    g = jnp.pad(g, ((0, 0), (0, n_row_blocks * r - ho), (0, 0), (0, 0)))
    xp = jnp.pad(xp, ((0, 0), (0, max(0, need - xp.shape[1])), (0, 0), (0, 0)))

    def body(i, total):
        bi, hi = i // n_row_blocks, i % n_row_blocks
        xb = lax.dynamic_slice(xp, (bi * bn, hi * r * stride[0], 0, 0), (bn, span, xp.shape[2], c))
        gb = lax.dynamic_slice(g, (bi * bn, hi * r, 0, 0), (bn, r, wo, k))
        return total + block(xb, gb)

    total = lax.fori_loop(0, n_blocks, body, jnp.zeros((fh * fw * c, k), acc))
    return total.reshape(fh, fw, c, k)


# Chunks of the "per_image" weight gradient: about this many bytes of x and g per
# chunk (one 128x128x64 image already exceeds it), at most this many chunks. An
# image larger than the budget is split into blocks of output rows (with the
# input rows their windows read), each block at least _MIN_BLOCK_PIXELS output
# pixels long: on VGG-16's 224x224x64 layer this is 1.7x faster than whole images.
_CHUNK_BYTES = 2 * 2**20
# The chunk budget (g and dL/dx) of input_grad_impl="per_image"; 4 and 8 MiB were
# no better (NOTES.md, attempt 58).
_DGRAD_CHUNK_BYTES = 2 * 2**20
_MAX_CHUNKS = 32
_ROW_BLOCK_BYTES = 1 * 2**20
_MIN_BLOCK_PIXELS = 1024


def _row_blocks(x, g, stride):
    """Output-row blocks [(r0, r1)] of one image for the per-chunk weight gradient."""
    n, ho, wo, k = g.shape
    itemsize = jnp.dtype(x.dtype).itemsize
    row_bytes = (stride[0] * x.shape[2] * x.shape[3] + wo * k) * itemsize
    rows = max(_ROW_BLOCK_BYTES // row_bytes, -(-_MIN_BLOCK_PIXELS // wo),
               -(-n * ho // _MAX_CHUNKS), 1)
    return [(r, min(r + rows, ho)) for r in range(0, ho, rows)]


def _weight_grad_per_image(x, g, w_shape, stride, pads, dilation, acc):
    """dL/dw summed over batch chunks, each chunk's term being XLA's derived gradient.

    The sum over ``n`` in the formula splits into independent terms. XLA:CPU's
    own weight-gradient convolution is fast while x and g of the chunk stay in
    cache and several times slower (per image) on a whole large batch. So is
    the sum over output rows: an image too large for the budget is split into
    blocks of output rows, each paired with the padded input rows it reads.
    """
    n = x.shape[0]
    per_image = (x[0].size + g[0].size) * jnp.dtype(x.dtype).itemsize
    size = max(1, _CHUNK_BYTES // per_image, -(-n // _MAX_CHUNKS))

    def term(xc, gc, conv_pads):
        def f(w):
            return _native_conv(xc, w, stride, conv_pads, dilation)

        return jax.vjp(f, jnp.zeros(w_shape, x.dtype))[1](gc)[0].astype(acc)

    blocks = _row_blocks(x, g, stride) if per_image > _CHUNK_BYTES else []
    if len(blocks) > 1:
        # Output rows [r0, r1) read the padded input's rows [r0 S, (r1 - 1) S + E): x's
        # rows [lo, hi) with lo, hi shifted by the top padding, the part outside x
        # (zero padding) given to the block's own convolution instead of padding x
        # once (a copy of the whole input).
        extent = dilation[0] * (w_shape[0] - 1) + 1
        h, top = x.shape[1], pads[0][0]
        total = None
        for i in range(n):
            for r0, r1 in blocks:
                lo, hi = r0 * stride[0] - top, (r1 - 1) * stride[0] + extent - top
                if min(hi, h) <= max(lo, 0):
                    continue  # the block's windows read only padding: no term
                xb = x[i : i + 1, max(lo, 0) : min(hi, h)]
                block_pads = ((max(-lo, 0), max(hi - h, 0)), pads[1])
                t = term(xb, g[i : i + 1, r0:r1], block_pads)
                total = t if total is None else total + t
        return total if total is not None else jnp.zeros(w_shape, acc)
    total = term(x[:size], g[:size], pads)
    for i in range(size, n, size):
        total = total + term(x[i : i + size], g[i : i + size], pads)
    return total


# Pixels (images x output rows x padded input width) per block of the "row_col"
# weight gradient: blocks of 1,000-4,000 pixels measured alike on VGG-16's
# 64-channel layers, smaller ones up to 1.5x slower (NOTES.md, attempt 47).
_ROW_COL_BLOCK_PIXELS = 2048
# Blocks per trip of the "row_col" loop: two independent blocks per trip let
# XLA:CPU overlap them and halve the loop's per-trip cost (VGG-16's block1_conv2
# weight gradient alone 101 -> 94 ms; 4 alike; all 112 unrolled 110; NOTES.md,
# attempt 74).
_ROW_COL_UNROLL = 2


def _row_col_blocks(n: int, ho: int, wp: int) -> tuple[int, int]:
    """(images, output rows) per "row_col" block: about _ROW_COL_BLOCK_PIXELS pixels.

    Whole images, as many as divide the batch, when one image is small enough;
    otherwise blocks of rows of one image, preferably as many rows as divide the
    image's (the loop then covers it exactly), else a remainder of rows that
    one more product takes for the whole batch.
    """
    if ho * wp <= _ROW_COL_BLOCK_PIXELS:
        return _largest_divisor_at_most(n, _ROW_COL_BLOCK_PIXELS // (ho * wp)), ho
    rows = max(1, _ROW_COL_BLOCK_PIXELS // wp)
    divisor = _largest_divisor_at_most(ho, rows)
    return 1, divisor if 2 * divisor >= rows else rows


def _weight_grad_row_col(xp, g, w_shape, stride, dilation, acc):
    """dL/dw from row slices of xp and F_w column-shifted copies of g.

    dL/dw[a, b, c, k] = sum_{n, i, j'} xp[n, i S_h + a D_h, j', c] gd[n, i, j' - b D_w, k],
    where j' runs over xp's padded width and gd is g with S_w - 1 zeros between its
    columns (zero outside). For each block of pixels, the F_w shifted copies of gd
    are stacked channel-major into G (F_w K, M); the F_h products G xp_a, with xp_a
    the (M, C_in) rows filter row a reads, give dL/dw[a] for all b at once. The
    columns between the strided ones are zeros in gd: at S_w > 1 the products do
    S_w times the work, which is why "auto" picks this form at stride 1 only.
    """
    fh, fw, c, k = w_shape
    (sh, sw), (dh, dw) = stride, dilation
    n, ho, wo, _ = g.shape
    wp = xp.shape[2]
    if sw > 1:
        g = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), (0, 0, 0), (0, 0, sw - 1), (0, 0, 0)))
    left = (fw - 1) * dw

    def block(xb, gb):
        # xb: (m, (r - 1) S_h + (F_h - 1) D_h + 1, W_p, C_in) rows of xp; gb: (m, r, ., K).
        m, r = gb.shape[:2]
        # Padded here, per block: cut from a g padded once before the loop, the
        # stack below ran 1.7x slower (NOTES.md, attempt 47).
        gb = jnp.pad(gb, ((0, 0), (0, 0), (left, wp - gb.shape[2]), (0, 0)))
        shifted = jnp.stack([jnp.moveaxis(gb[:, :, left - b * dw : left - b * dw + wp], 3, 0)
                             for b in range(fw)])
        shifted = shifted.reshape(fw * k, m * r * wp)
        return jnp.stack([
            lax.dot(shifted, xb[:, a * dh : a * dh + (r - 1) * sh + 1 : sh].reshape(-1, c),
                    preferred_element_type=acc)
            for a in range(fh)])

    per, rows = _row_col_blocks(n, ho, wp)
    span = (rows - 1) * sh + (fh - 1) * dh + 1
    row_blocks = ho // rows

    def body(i, total):
        bi, r0 = (i // row_blocks) * per, (i % row_blocks) * rows
        xb = lax.dynamic_slice(xp, (bi, r0 * sh, 0, 0), (per, span, wp, c))
        gb = lax.dynamic_slice(g, (bi, r0, 0, 0), (per, rows, g.shape[2], k))
        return total + block(xb, gb)

    trips = (n // per) * row_blocks
    if trips == 1:
        total = block(xp[:, :span], g)
    else:
        total = lax.fori_loop(0, trips, body, jnp.zeros((fh, fw * k, c), acc),
                               unroll=_ROW_COL_UNROLL)
    if row_blocks * rows < ho:  # the remaining rows, for the whole batch at once
        r0 = row_blocks * rows
        total = total + block(xp[:, r0 * sh :], g[:, r0:])
    return total.reshape(fh, fw, k, c).transpose(0, 1, 3, 2)


# Batch chunks of the "stacked" weight gradient: about this many bytes of patches each.
_STACKED_CHUNK_BYTES = 16 * 2**20


def _patch_rows(xp, out_hw, f_hw, stride, dilation):
    """The patches of ``xp`` as rows, ``(F_h, F_w, C_in, N, H_out, W_out)``.

    Row (a, b, c) is channel c of the strided window at filter offset (a, b),
    the order of the filter's (F_h, F_w, C_in) axes. Built in two steps, the
    F_h row shifts of the channel-major input and then the F_w column shifts
    of those: XLA fuses each step's few slices into its stack, where one
    stack of F_h F_w slices became F_h F_w + 1 kernels that wrote the patches
    twice (LeNet-5's conv1: 1.3 -> 1.0 ms alone; NOTES.md, attempt 61).
    """
    (ho, wo), (fh, fw) = out_hw, f_hw
    n, _, wp, c = xp.shape
    t = jnp.moveaxis(xp, 3, 0)  # (C, N, H, W)
    shifted_rows = jnp.stack([
        lax.slice(t, (0, 0, a * dilation[0], 0),
                  (c, n, a * dilation[0] + (ho - 1) * stride[0] + 1, wp), (1, 1, stride[0], 1))
        for a in range(fh)])  # (F_h, C, N, H_out, W)
    return jnp.stack([
        lax.slice(shifted_rows, (0, 0, 0, 0, b * dilation[1]),
                  (fh, c, n, ho, b * dilation[1] + (wo - 1) * stride[1] + 1),
                  (1, 1, 1, 1, stride[1]))
        for b in range(fw)], axis=1)


def _weight_grad_stacked(xp, g, w_shape, stride, dilation, acc):
    """dL/dw = P g with the patch matrix P laid out (F_h F_w C_in, N H_out W_out).

    Each row of P is one (offset, channel) strided slice of xp, flattened: a
    contiguous copy, so P is cheap to build when F_h F_w C_in is small, and the
    product is a plain (F_h F_w C_in, M) x (M, K) matrix product. Chunks of the
    batch (static slices, summed) bound the memory of P.
    """
    fh, fw, c, k = w_shape
    n, ho, wo, _ = g.shape
    per_image = fh * fw * c * ho * wo * jnp.dtype(xp.dtype).itemsize
    size = max(1, _STACKED_CHUNK_BYTES // max(per_image, 1))
    total = None
    for i in range(0, n, size):
        gc = g[i : i + size]
        rows = _patch_rows(xp[i : i + size], (ho, wo), (fh, fw), stride, dilation)
        term = lax.dot_general(rows.reshape(fh * fw * c, -1), gc.reshape(-1, k),
                               (((1,), (0,)), ((), ())), preferred_element_type=acc)
        total = term if total is None else total + term
    return total.reshape(fh, fw, c, k)


# Output columns per block of the banded forms: the largest divisor of W_out with
# at most this many columns B_w K in a block row of g. LeNet-5's conv1 (K = 6, W_out
# = 28), weight gradient alone: B_w = 7 0.93 ms, 4 1.05, 14 1.32, 28 1.23, 2 1.61;
# widths that do not divide W_out (5, 6, 8: 1.14-1.19) are never taken.
_BAND_MAX_COLUMNS = 64


def _band_block(wo: int, k: int) -> int:
    """The largest divisor B_w of W_out with B_w K <= _BAND_MAX_COLUMNS (at least 1)."""
    return max(d for d in range(1, wo + 1)
               if wo % d == 0 and (d * k <= _BAND_MAX_COLUMNS or d == 1))


def _band_geometry(wo, k, fw, s, d):
    """(B_w, nb, B_in): columns per block, blocks per output row, input columns per block."""
    bw = _band_block(wo, k)
    return bw, wo // bw, (bw - 1) * s + (fw - 1) * d + 1


def _band_selection(fw, bin_, bw, s, d, dtype):
    """The 0/1 tensor (F_w, B_in, B_w) that is 1 where input column u = j S + b D."""
    sel = np.zeros((fw, bin_, bw), dtype)
    for b in range(fw):
        sel[b, np.arange(bw) * s + b * d, np.arange(bw)] = 1
    return sel


def _band_matrix(w, bin_, bw, s, d):
    """The filter's band for blocks of B_w output columns, ``(F_h B_in C_in, B_w K)``:
    entry ((a, u, c), (j, k)) is w[a, b, c, k] where u = j S + b D, else 0."""
    fh, fw, c, k = w.shape
    sel = jnp.asarray(_band_selection(fw, bin_, bw, s, d, jnp.dtype(w.dtype)))
    return jnp.einsum("abck,buj->aucjk", w, sel).reshape(fh * bin_ * c, bw * k)


def _band_rows(xp, ho, fh, nb, bw, bin_, stride, dilation):
    """Row (n, i, j) of R: for each filter row a, the B_in columns from j B_w S_w on
    of input row i S_h + a D_h; ``(N H_out nb, F_h B_in C)``. One stack of the F_h
    nb segments, which XLA fuses into one loop (built from the F_h row shifts first,
    it took two: LeNet-5's train step 2-8% slower)."""
    (sh, sw), dh = stride, dilation[0]
    m, c = xp.shape[0], xp.shape[3]
    rows = jnp.stack([jnp.stack([
        lax.slice(xp, (0, a * dh, j * bw * sw, 0),
                  (m, a * dh + (ho - 1) * sh + 1, j * bw * sw + bin_, c), (1, sh, 1, 1))
        for a in range(fh)], axis=2) for j in range(nb)], axis=2)
    return rows.reshape(-1, fh * bin_ * c)  # from (m, H_out, nb, F_h, B_in, C)


def _banded_conv(x, w, stride, pads, dilation):
    """The forward pass in the banded form: ``R`` (see :func:`_weight_grad_banded`)
    times the filter's band, ``(N H_out W_out / B_w, F_h B_in C_in) x (F_h B_in
    C_in, B_w K)``, in batch chunks of about _STACKED_CHUNK_BYTES of R."""
    fh, fw, c, k = w.shape
    acc = jnp.float32 if jnp.dtype(x.dtype).itemsize < 4 else x.dtype
    ho, wo = conv_output_hw(x.shape[1:3], (fh, fw), stride, pads, dilation, exact=False)
    bw, nb, bin_ = _band_geometry(wo, k, fw, stride[1], dilation[1])
    band = _band_matrix(w, bin_, bw, stride[1], dilation[1])
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))

    def block(xc):
        rows = _band_rows(xc, ho, fh, nb, bw, bin_, stride, dilation)
        y = lax.dot(rows, band, preferred_element_type=acc)
        return y.reshape(xc.shape[0], ho, wo, k).astype(x.dtype)

    per_image = ho * nb * fh * bin_ * c * jnp.dtype(x.dtype).itemsize
    return _in_batch_chunks(block, xp, max(1, _STACKED_CHUNK_BYTES // max(per_image, 1)))


def _weight_grad_banded(xp, g, w_shape, stride, dilation, acc, with_bias=False):
    """dL/dw from segments of input rows against blocks of output columns.

    Along the width a convolution is a product with a banded (Toeplitz) matrix.
    Split the output columns into blocks of B_w; block j reads the B_in = (B_w - 1)
    S_w + (F_w - 1) D_w input columns from j B_w S_w on. Row (n, i, j) of R holds,
    for each filter row a, those columns of input row i S_h + a D_h: R is
    ``(N H_out W_out / B_w, F_h B_in C_in)``; row (n, i, j) of G holds the block's
    B_w K outputs of g. Then ``R^T G`` is ``(F_h B_in C_in, B_w K)`` and
    dL/dw[a, b, c, k] is the sum over j' < B_w of its entry at input column
    j' S_w + b D_w, output column j', i.e. the band. One product with
    ``(B_w + F_w - 1) / F_w`` times the multiply-adds of the direct sum but
    F_w B_w / (B_w + F_w - 1) times fewer rows of patches than im2col: the
    cheapest form when C_in is 1 (LeNet-5's conv1: 2x faster than "stacked";
    NOTES.md, attempt 66). Chunks of the batch bound the memory of R as in "stacked".
    ``with_bias``: R gets a column of ones, whose row of the product sums g, and
    ``(dL/dw, dL/db)`` is returned.
    """
    fh, fw, c, k = w_shape
    sw, dw = stride[1], dilation[1]
    n, ho, wo, _ = g.shape
    bw, nb, bin_ = _band_geometry(wo, k, fw, sw, dw)
    per_image = ho * nb * fh * bin_ * c * jnp.dtype(xp.dtype).itemsize
    size = max(1, _STACKED_CHUNK_BYTES // max(per_image, 1))
    total = None
    for i in range(0, n, size):
        rows = _band_rows(xp[i : i + size], ho, fh, nb, bw, bin_, stride, dilation)
        if with_bias:
            rows = jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), rows.dtype)], axis=1)
        term = _tn_dot(rows, g[i : i + size].reshape(-1, bw * k), acc)
        total = term if total is None else total + term
    sel = jnp.asarray(_band_selection(fw, bin_, bw, sw, dw, jnp.dtype(acc)))
    grad = jnp.einsum("aucjk,buj->abck", total[: fh * bin_ * c].reshape(fh, bin_, c, bw, k),
                      sel, preferred_element_type=acc)
    if with_bias:
        return grad, total[-1].reshape(bw, k).sum(0)
    return grad


def _weight_grad(x, g, w_shape, stride, pads, dilation, impl):
    """dL/dw[a, b, c, k] = sum_{n,i,j} xp[n, i*S_h + a*D_h, j*S_w + b*D_w, c] g[n, i, j, k]."""
    fh, fw, c, k = w_shape
    acc = jnp.float32 if jnp.dtype(x.dtype).itemsize < 4 else x.dtype
    if impl == "dense":
        return _tn_dot(x.reshape(x.shape[0], -1), g.reshape(g.shape[0], -1), acc).reshape(w_shape)
    if impl == "per_image":
        return _weight_grad_per_image(x, g, w_shape, stride, pads, dilation, acc)
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    if impl == "xla":
        # XLA's formulation: a convolution with batch and feature axes exchanged.
        dw = lax.conv_general_dilated(
            xp,
            g,
            window_strides=dilation,
            padding="VALID",
            rhs_dilation=stride,
            dimension_numbers=("CHWN", "IHWO", "HWNC"),
            preferred_element_type=acc,
        )
        # Trailing input rows the forward pass never read can add extra offsets.
        return dw[:fh, :fw]
    if impl == "im2col":
        return _weight_grad_im2col(xp, g, w_shape, stride, dilation, acc)
    if impl == "stacked":
        return _weight_grad_stacked(xp, g, w_shape, stride, dilation, acc)
    if impl == "row_col":
        return _weight_grad_row_col(xp, g, w_shape, stride, dilation, acc)
    if impl == "banded":
        return _weight_grad_banded(xp, g, w_shape, stride, dilation, acc)
    # "offsets": one (N H_out W_out, C_in)^T (N H_out W_out, K) product per offset.
    g2 = g.reshape(-1, k)
    windows = _offset_windows(xp, g.shape[1:3], (fh, fw), stride, dilation)
    return jnp.stack([_tn_dot(wd.reshape(-1, c), g2, acc) for wd in windows]).reshape(fh, fw, c, k)


def _bias_grad(g):
    """dL/db = sum of g over N, H, W (accumulated in float32 for narrower floats)."""
    acc = jnp.float32 if jnp.dtype(g.dtype).itemsize < 4 else g.dtype
    return jnp.sum(g, axis=(0, 1, 2), dtype=acc)


def _weight_and_bias_grad(x, g, w_shape, stride, pads, dilation, impl):
    """(dL/dw, dL/db). The banded form takes dL/db = sum g from its own product (a
    column of ones in its rows), where a separate sum over g was a pass of its own
    (LeNet-5's conv1); the others sum g."""
    if impl == "banded":
        acc = jnp.float32 if jnp.dtype(x.dtype).itemsize < 4 else x.dtype
        xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
        return _weight_grad_banded(xp, g, w_shape, stride, dilation, acc, with_bias=True)
    return _weight_grad(x, g, w_shape, stride, pads, dilation, impl), _bias_grad(g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def _conv(x, w, b, stride, pads, dilation, impl, dgrad_impl, wgrad_impl):
    y = _forward(x, w, stride, pads, dilation, impl)
    return y if b is None else y + b


def _conv_fwd(x, w, b, stride, pads, dilation, impl, dgrad_impl, wgrad_impl):
    return _conv(x, w, b, stride, pads, dilation, impl, dgrad_impl, wgrad_impl), (x, w, b)


def _conv_bwd(stride, pads, dilation, impl, dgrad_impl, wgrad_impl, residuals, g):
    x, w, b = residuals
    wgrad_impl = "dense" if impl == "dense" else wgrad_impl
    if impl == "winograd":
        dx, dw = _winograd_grads(x, w, g, pads)  # in x's and w's dtypes
        db = None if b is None else _bias_grad(g)
    else:
        dx = _input_grad(g, w, x.shape[1:3], stride, pads, dilation, impl, dgrad_impl)
        if b is None:
            dw, db = _weight_grad(x, g, w.shape, stride, pads, dilation, wgrad_impl), None
        else:
            dw, db = _weight_and_bias_grad(x, g, w.shape, stride, pads, dilation, wgrad_impl)
    return dx.astype(x.dtype), dw.astype(w.dtype), None if b is None else db.astype(b.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    stride: int | Sequence[int] = 1,
    padding: Padding2D = 0,
    dilation: int | Sequence[int] = 1,
    dilation_impl: str = "auto",
    weight_grad_impl: str = "auto",
    input_grad_impl: str = "auto",
    forward_impl: str = "auto",
) -> jax.Array:
    """2-D convolution (cross-correlation, as every deep-learning library computes it).

    Args:
      x: input, NHWC ``(N, H, W, C_in)``.
      kernel: filters, HWIO ``(F_h, F_w, C_in, K)``; K filters give K output channels.
      bias: optional ``(K,)``.
      stride: S, an int or ``(S_h, S_w)``.
      padding: zeros added around the input: an int P, ``(P_h, P_w)``,
        ``((top, bottom), (left, right))``, "SAME" (output ``ceil(W / S)``) or
        "VALID" (= 0).
      dilation: D, an int or ``(D_h, D_w)``; the filter spans ``D (F - 1) + 1`` cells.
      dilation_impl: "auto", "native" or "space_to_batch" (the atrous trick; only
        used for stride 1 and dilation > 1).
      weight_grad_impl: "auto", "per_image", "row_col", "banded", "im2col", "stacked",
        "offsets" or "xla": how dL/dkernel is formed (see the module docstring); "auto"
        picks per backend from ``WEIGHT_GRAD_IMPL_BY_BACKEND``,
        ``ROW_COL_CHANNELS_BY_BACKEND``, ``SMALL_PATCH_WIDTH_BY_BACKEND`` and
        ``BANDED_MAX_CHANNELS_BY_BACKEND``.
      forward_impl: "auto", "xla" (XLA's convolution, dilated per ``dilation_impl``),
        "direct" (the sum of F_h F_w C_in shifted copies of x times a filter row, for
        filters with a small patch width; see ``DIRECT_PATCH_WIDTH_BY_BACKEND``),
        "per_image" (XLA's convolution per cache-sized batch chunk; "auto" picks it
        for strided filters over few channels, ``STRIDED_INPUT_CHANNELS_BY_BACKEND``),
        "banded" (input row segments times the filter's band, one matrix product;
        "auto" picks it per ``BANDED_FORWARD_MIN_WIDTH_BY_BACKEND``) or "winograd"
        (Winograd's F(2x2, 3x3) or F(2x2, 5x5), forward and backward: 3x3 and 5x5
        filters at stride 1 and dilation 1 only; its backward is in the
        same form, so ``input_grad_impl`` and ``weight_grad_impl`` do not apply;
        "auto" picks it for many float32 input channels,
        ``WINOGRAD_MIN_CHANNELS_BY_BACKEND``, when both of those are "auto").
      input_grad_impl: "auto", "xla" (a forward convolution of the stride-dilated g with
        the flipped filter), "per_image" (the same per cache-sized batch chunk, when two
        or more images fit in one), "col2im" (g W^T added back where each patch was
        read) or "banded" (g times the filter's transposed band); "auto" picks col2im
        for small patch widths on the backends that gain from it, and for strided
        filters per ``STRIDED_INPUT_GRAD_IMPL_BY_BACKEND``.

    A filter that covers the whole unpadded input (output 1 x 1, e.g. LeNet-5's
    conv3 or a classifier layer written as a convolution) is computed as the one
    matrix product it is, forward and backward, whatever the impl arguments say.

    Returns:
      ``(N, H_out, W_out, K)`` with ``H_out = floor((H + P_top + P_bottom - F_eff) / S) + 1``
      (use :func:`cnnjax.shapes.conv_output_size` to insist on an exact division).
      The result dtype is the common floating dtype of ``x`` and ``kernel``.

    The derivative is the hand-written VJP described in this module's docstring.

    Raises:
      ValueError: wrong ranks, channel mismatch, bias of the wrong shape, a
        stride or dilation < 1, negative padding, an unknown impl.
      ShapeError: the dilated filter is larger than the padded input.
    """
    check_nhwc(x, "x", "conv2d")
    if getattr(kernel, "ndim", None) != 4:
        raise ValueError(
            f"conv2d: kernel must be 4-D HWIO (F_h, F_w, C_in, K), got shape "
            f"{getattr(kernel, 'shape', None)}."
        )
    if x.shape[3] != kernel.shape[2]:
        raise ValueError(
            f"conv2d: x has {x.shape[3]} channels but the kernel expects C_in = "
            f"{kernel.shape[2]} (kernel shape {tuple(kernel.shape)} is HWIO); make the "
            "kernel's third axis equal to the input's channel count."
        )
    if dilation_impl not in _IMPLS:
        raise ValueError(f"conv2d: dilation_impl must be one of {_IMPLS}, got {dilation_impl!r}.")
    if weight_grad_impl not in _WGRAD_IMPLS:
        raise ValueError(
            f"conv2d: weight_grad_impl must be one of {_WGRAD_IMPLS}, got {weight_grad_impl!r}."
        )
    if forward_impl not in _FWD_IMPLS:
        raise ValueError(f"conv2d: forward_impl must be one of {_FWD_IMPLS}, got {forward_impl!r}.")
    if input_grad_impl not in _DGRAD_IMPLS:
        raise ValueError(
            f"conv2d: input_grad_impl must be one of {_DGRAD_IMPLS}, got {input_grad_impl!r}."
        )
    s = to_pair(stride, "stride")
    d = to_pair(dilation, "dilation")
    fhw = tuple(kernel.shape[:2])
    if min(fhw) < 1:
        raise ValueError(f"conv2d: kernel spatial size must be >= 1, got {fhw}.")
    pads = normalize_padding(padding, x.shape[1:3], fhw, s, d)
    for dim, n, f, st, p, dl in zip(
        ("height", "width"), x.shape[1:3], fhw, s, pads, d, strict=True
    ):
        try:
            conv_output_size(n, f, st, p, dl, exact=False, name=f"conv2d ({dim})")
        except ShapeError:
            raise
    dtype = compute_dtype(x, kernel)
    if _is_full_window(x.shape[1:3], fhw, pads, d):
        impl = "dense"
    elif (forward := _pick_forward(
            forward_impl, kernel.shape, s, d, dtype,
            grads_auto=(input_grad_impl, weight_grad_impl) == ("auto", "auto"), pads=pads,
            out_w=conv_output_hw(x.shape[1:3], fhw, s, pads, d, exact=False)[1])) != "xla":
        if forward == "winograd" and not _winograd_fits(kernel.shape, s, d):
            raise ValueError(
                f"conv2d: forward_impl='winograd' needs a 3x3 or 5x5 filter at stride 1 and "
                f"dilation 1, got a {fhw[0]}x{fhw[1]} filter, stride {s}, dilation {d}; use "
                "forward_impl='auto' or 'xla'.")
        impl = forward
    else:
        impl = _pick(DILATION_IMPL_BY_BACKEND, dilation_impl)
    dgrad, wgrad = _pick_grads(input_grad_impl, weight_grad_impl, kernel.shape, pads, s)
    if bias is not None:
        if getattr(bias, "shape", None) != (kernel.shape[3],):
            raise ValueError(
                f"conv2d: bias must have shape ({kernel.shape[3]},) (one per filter), got "
                f"{getattr(bias, 'shape', None)}."
            )
        bias = bias.astype(dtype)
    return _conv(x.astype(dtype), kernel.astype(dtype), bias, s, pads, d, impl, dgrad, wgrad)
