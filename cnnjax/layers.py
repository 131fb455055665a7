"""Thin Flax linen layers over :mod:`cnnjax.ops`: parameters plus hyperparameters.

Every layer takes an NHWC batch (Dense and Flatten also any ``(N, ...)``
array) and holds its parameters in float32 (``param_dtype``); ``dtype``
(e.g. ``jnp.bfloat16``) is the compute dtype, ``None`` computing in the
input's dtype. Parameter names and layouts follow Keras: ``kernel`` (conv HWIO
``(F_h, F_w, C_in, K)``, dense ``(in, out)``) and ``bias``. Default
initialization is Keras': Glorot-uniform kernels and zero biases.

Each layer also answers ``output_shape(input_shape)`` for a per-example shape
(no batch axis) from the shape arithmetic of :mod:`cnnjax.shapes`, so a model
can check an input size before anything is traced. Convolutions insist on an
exact division (the lecture's 224 vs 227 lesson); pooling floors it as Keras,
TensorFlow and PyTorch do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import ops
from cnnjax.shapes import (
    Padding2D,
    ShapeError,
    conv_output_hw,
    normalize_padding,
    to_pair,
)

__all__ = [
    "ACTIVATIONS",
    "get_activation",
    "Activation",
    "Conv",
    "Dense",
    "LRN",
    "MaxPool",
    "AvgPool",
    "L2Pool",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "Flatten",
    "Dropout",
]

Shape = tuple[int, ...]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "tanh": ops.tanh,
    "sigmoid": nn.sigmoid,
    "softmax": nn.softmax,
    "log_softmax": nn.log_softmax,
    "linear": lambda x: x,
}


def get_activation(name: str | None) -> Callable[[jax.Array], jax.Array]:
    """The activation function called ``name`` (None and "linear" are the identity)."""
    if name is None:
        return ACTIVATIONS["linear"]
    if not isinstance(name, str) or name.lower() not in ACTIVATIONS:
        raise ValueError(
            f"activation must be None or one of {sorted(ACTIVATIONS)}, got {name!r}."
        )
    return ACTIVATIONS[name.lower()]


def _cast(x, dtype):
    x = jnp.asarray(x)
    if dtype is not None:
        return x.astype(dtype)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def _check_rank(shape: Shape, layer: str, rank: int = 3) -> None:
    if len(shape) != rank:
        raise ValueError(
            f"{layer}: expects a per-example shape of rank {rank} (H, W, C), got {tuple(shape)}."
        )


class Activation(nn.Module):
    """An elementwise activation by name: relu, tanh, sigmoid, softmax, log_softmax, linear.

    "tanh" is :func:`cnnjax.ops.tanh` (on the CPU a rational form that XLA fuses
    into the layer's loop; within 4.6 ulps of tanh in float32).
    """

    activation: str = "relu"

    def __post_init__(self):
        get_activation(self.activation)
        super().__post_init__()

    def __call__(self, x):
        return get_activation(self.activation)(x)

    def output_shape(self, input_shape: Shape) -> Shape:
        return tuple(input_shape)


class Conv(nn.Module):
    """2-D convolution via :func:`cnnjax.ops.conv2d`, plus bias and an optional activation.

    Attributes:
      features: K, the number of filters (output channels).
      kernel_size: F, an int or ``(F_h, F_w)``.
      stride, padding, dilation: as :func:`cnnjax.ops.conv2d`; padding 0 = "VALID"
        (the Keras default), 1 keeps a 3x3 stride-1 map's size, "SAME" as TensorFlow.
      activation: None (linear) or a name from :data:`ACTIVATIONS`, applied after the bias.
    """

    features: int
    kernel_size: int | Sequence[int] = 3
    stride: int | Sequence[int] = 1
    padding: Padding2D = 0
    dilation: int | Sequence[int] = 1
    use_bias: bool = True
    activation: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.glorot_uniform()
    bias_init: Callable = nn.initializers.zeros_init()

    def __post_init__(self):
        if isinstance(self.features, bool) or not isinstance(self.features, (int, np.integer)) \
                or self.features < 1:
            raise ValueError(f"Conv: features must be a positive integer, got {self.features!r}.")
        to_pair(self.kernel_size, "Conv: kernel_size")
        get_activation(self.activation)
        super().__post_init__()

    @nn.compact
    def __call__(self, x):
        x = _cast(x, self.dtype)
        fh, fw = to_pair(self.kernel_size, "Conv: kernel_size")
        kernel = self.param(
            "kernel", self.kernel_init, (fh, fw, x.shape[-1], self.features), self.param_dtype
        )
        dtype = x.dtype
        bias = None
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            bias = bias.astype(dtype)
        y = ops.conv2d(
            x,
            kernel.astype(dtype),
            bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
        )
        return get_activation(self.activation)(y)

    def output_shape(self, input_shape: Shape) -> Shape:
        _check_rank(input_shape, self.name or "Conv")
        h, w = conv_output_hw(
            input_shape[:2],
            to_pair(self.kernel_size, "Conv: kernel_size"),
            self.stride,
            self.padding,
            self.dilation,
            exact=True,
            name=self.name or "Conv",
        )
        if h < 1 or w < 1:
            raise ShapeError(f"{self.name or 'Conv'}: output {h}x{w} is empty; use a larger input.")
        return (h, w, self.features)


class Dense(nn.Module):
    """Fully connected layer ``y = x @ kernel + bias`` over the last axis; kernel ``(in, out)``."""

    features: int
    use_bias: bool = True
    activation: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.glorot_uniform()
    bias_init: Callable = nn.initializers.zeros_init()

    def __post_init__(self):
        if isinstance(self.features, bool) or not isinstance(self.features, (int, np.integer)) \
                or self.features < 1:
            raise ValueError(f"Dense: features must be a positive integer, got {self.features!r}.")
        get_activation(self.activation)
        super().__post_init__()

    @nn.compact
    def __call__(self, x):
        x = _cast(x, self.dtype)
        kernel = self.param(
            "kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype
        )
        y = ops.dense(x, kernel.astype(x.dtype))
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(x.dtype)
        return get_activation(self.activation)(y)

    def output_shape(self, input_shape: Shape) -> Shape:
        return (*tuple(input_shape)[:-1], self.features)


class LRN(nn.Module):
    """Local response normalization across channels, the AlexNet paper's form and constants."""

    size: int = 5
    k: float = 2.0
    alpha: float = 1e-4
    beta: float = 0.75

    def __call__(self, x):
        return ops.local_response_norm(x, size=self.size, k=self.k, alpha=self.alpha,
                                       beta=self.beta)

    def output_shape(self, input_shape: Shape) -> Shape:
        return tuple(input_shape)


class _Pool(nn.Module):
    window: int | Sequence[int] = 2
    stride: int | Sequence[int] | None = None
    padding: Padding2D = 0

    def output_shape(self, input_shape: Shape) -> Shape:
        _check_rank(input_shape, self.name or type(self).__name__)
        f = to_pair(self.window, f"{type(self).__name__}: window")
        s = f if self.stride is None else to_pair(self.stride, f"{type(self).__name__}: stride")
        name = self.name or type(self).__name__
        pads = normalize_padding(self.padding, input_shape[:2], f, s)
        h, w = conv_output_hw(input_shape[:2], f, s, pads, 1, exact=False, name=name)
        return (h, w, input_shape[2])


class MaxPool(_Pool):
    """Max pooling (:func:`cnnjax.ops.max_pool`); stride defaults to the window."""

    def __call__(self, x):
        return ops.max_pool(x, self.window, self.stride, self.padding)


class AvgPool(_Pool):
    """Average pooling (:func:`cnnjax.ops.avg_pool`); stride defaults to the window."""

    count_include_pad: bool = True

    def __call__(self, x):
        return ops.avg_pool(x, self.window, self.stride, self.padding,
                            count_include_pad=self.count_include_pad)


class L2Pool(_Pool):
    """L2-norm pooling, sqrt of the sum of squares (:func:`cnnjax.ops.l2_pool`)."""

    def __call__(self, x):
        return ops.l2_pool(x, self.window, self.stride, self.padding)


class GlobalAvgPool(nn.Module):
    """Mean over height and width: ``(N, H, W, C) -> (N, C)``."""

    def __call__(self, x):
        return ops.global_avg_pool(x)

    def output_shape(self, input_shape: Shape) -> Shape:
        _check_rank(input_shape, self.name or "GlobalAvgPool")
        return (input_shape[2],)


class GlobalMaxPool(nn.Module):
    """Maximum over height and width: ``(N, H, W, C) -> (N, C)``."""

    def __call__(self, x):
        return ops.global_max_pool(x)

    def output_shape(self, input_shape: Shape) -> Shape:
        _check_rank(input_shape, self.name or "GlobalMaxPool")
        return (input_shape[2],)


class Flatten(nn.Module):
    """``(N, H, W, C) -> (N, H*W*C)`` in H, W, C order (Keras/NHWC, not torchvision's C, H, W)."""

    def __call__(self, x):
        return jnp.reshape(x, (x.shape[0], -1))

    def output_shape(self, input_shape: Shape) -> Shape:
        return (int(np.prod(input_shape)),)


class Dropout(nn.Module):
    """Inverted dropout: zero each unit with probability ``rate``, scale the rest by 1/(1-rate).

    Active only when ``deterministic=False``; it then draws from the ``"dropout"``
    RNG stream (``model.apply(..., rngs={"dropout": key})``).
    """

    rate: float = 0.5

    def __post_init__(self):
        if isinstance(self.rate, bool) or not 0.0 <= float(self.rate) < 1.0:
            raise ValueError(f"Dropout: rate must be in [0, 1), got {self.rate!r}.")
        super().__post_init__()

    def __call__(self, x, deterministic: bool = True):
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, x.shape)
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))

    def output_shape(self, input_shape: Shape) -> Shape:
        return tuple(input_shape)
