"""FC <-> conv: a dense layer after a conv stage is a convolution with a full-size filter.

A dense layer reading a flattened ``(h, w, c)`` map (flattened in H, W, C order)
with kernel ``(h*w*c, K)`` computes exactly what a ``h x w`` VALID convolution
with the kernel reshaped to HWIO ``(h, w, c, K)`` computes at one position.
Later dense layers become 1x1 convolutions. On a larger image the converted
network slides over it and returns a map of class scores (VGG-16 at 384x384:
(384/32 - 7) + 1 = 6, a 6x6 map) for the price of one pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from cnnjax import layers as L
from cnnjax.models.base import LayerSpec, Sequential, SequentialModel

__all__ = ["dense_to_conv", "to_fully_convolutional"]


def dense_to_conv(kernel: jax.Array, bias: jax.Array | None, input_hw: Sequence[int]):
    """A dense layer's ``(h*w*c, K)`` kernel as an HWIO ``(h, w, c, K)`` conv kernel.

    Args:
      kernel: dense kernel ``(in, out)`` reading an input flattened in H, W, C order.
      bias: ``(out,)`` or None; returned unchanged (a conv bias has the same shape).
      input_hw: ``(h, w)`` of the map the dense layer read (``(1, 1)`` for a dense
        layer after another dense layer).

    Returns:
      ``(conv_kernel, bias)``.
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"kernel must be a 2-D dense kernel (in, out), got shape {kernel.shape}.")
    try:
        h, w = (int(v) for v in input_hw)
    except (TypeError, ValueError):
        raise ValueError(f"input_hw must be a pair (h, w), got {input_hw!r}.") from None
    if h < 1 or w < 1 or kernel.shape[0] % (h * w):
        raise ValueError(
            f"input_hw {tuple(input_hw)} does not divide the kernel's {kernel.shape[0]} inputs; "
            "pass the (h, w) of the feature map the dense layer reads."
        )
    c = kernel.shape[0] // (h * w)
    return kernel.reshape(h, w, c, kernel.shape[1]), bias


def to_fully_convolutional(model: SequentialModel, variables):
    """An equivalent model where every dense layer after the last conv stage is a conv.

    The Flatten disappears; the first dense layer becomes an ``h x w`` VALID conv
    over the last ``(h, w, c)`` feature map, later ones 1x1 convs, each keeping its
    name, activation and parameters (same parameter count). The new model returns a
    map ``(N, H', W', num_classes)``: ``(N, 1, 1, K)`` with the same values as the
    original logits at the training size, a spatial map of scores on larger inputs.
    A model with no dense layers is returned unchanged.

    Returns:
      ``(fc_model, fc_variables)``.
    """
    if not isinstance(model, SequentialModel):
        raise ValueError(
            f"model must be a cnnjax model (a SequentialModel), got {type(model).__name__}."
        )
    specs = list(model.layers())
    if not any(s.cls is L.Dense for s in specs):
        return model, variables
    model.output_shapes()  # the model's own input must be valid
    params = dict(variables["params"]) if "params" in variables else {}
    new_specs: list[LayerSpec] = []
    new_params = {}
    shape = tuple(model.input_shape)  # per-example shape entering the current layer
    for spec in specs:
        if spec.cls is L.Flatten:
            continue  # the conv that replaces the next dense layer reads the map itself
        if spec.cls is L.Dense:
            if len(shape) != 3:
                raise ValueError(
                    f"{spec.name}: a dense layer reading a {shape} vector (not a flattened map) "
                    "cannot become a convolution; only dense layers after Flatten convert."
                )
            hw = shape[:2]
            opts = {**dict(spec.options), "kernel_size": hw, "padding": 0}
            new_specs.append(LayerSpec(spec.name, L.Conv, tuple(opts.items())))
            p = params[spec.name]
            kernel, bias = dense_to_conv(p["kernel"], p.get("bias"), hw)
            new_params[spec.name] = {"kernel": kernel} if bias is None else {
                "kernel": kernel, "bias": bias}
            shape = (1, 1, opts["features"])
            continue
        new_specs.append(spec)
        if spec.name in params:
            new_params[spec.name] = params[spec.name]
        shape = spec.unbound().output_shape(shape)
    fc_model = Sequential(layer_specs=tuple(new_specs), input_shape=model.input_shape,
                          dtype=model.dtype, parent=None,
                          name=f"{type(model).__name__}_fully_convolutional")
    fc_variables = {**variables, "params": new_params}
    return fc_model, fc_variables

