"""The shared skeleton of every model: an ordered list of named layers.

A model is a :class:`SequentialModel`: its ``layers()`` method returns
:class:`LayerSpec` s (a name, a layer class from :mod:`cnnjax.layers` and its
options), and one ``__call__`` runs them in order. Each layer becomes a child
module called by its name, so parameters live at ``params[name]["kernel"]`` /
``["bias"]``, and each layer's output is sown into the ``"intermediates"``
collection, in the layer's own scope::

    logits, state = model.apply(variables, x, mutable=["intermediates"])
    state["intermediates"]["conv1"]["output"]    # an array, the conv1 output
    activations(model, variables, x)["conv1"]    # the same, {name: array} in layer order

(Flax reserves one name per scope, so a variable ``"conv1"`` beside the child
module ``conv1`` is impossible; ``"output"`` also keeps clear of the
``"__call__"`` entries that ``capture_intermediates=True`` writes.)

Because the layer list is plain data, the same description gives the shape
check at construction (:meth:`SequentialModel.output_shapes`, raising
:class:`~cnnjax.shapes.ShapeError` naming the first layer whose output would be
empty), the FC -> conv conversion and the summary table.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax import layers as L
from cnnjax.shapes import ShapeError

__all__ = ["LayerSpec", "layer", "SequentialModel", "Sequential", "activations"]


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One named layer: ``cls(name=name, **options)`` from :mod:`cnnjax.layers`."""

    name: str
    cls: type
    options: tuple[tuple[str, Any], ...] = ()

    def build(self, **extra) -> nn.Module:
        return self.cls(name=self.name, **dict(self.options), **extra)

    def unbound(self) -> nn.Module:
        """A detached instance for shape arithmetic (never attached to a parent module)."""
        return self.cls(name=self.name, parent=None, **dict(self.options))

    def option(self, key: str, default=None):
        return dict(self.options).get(key, default)

    def replace(self, **changes) -> LayerSpec:
        opts = dict(self.options)
        cls = changes.pop("cls", self.cls)
        name = changes.pop("name", self.name)
        opts.update(changes)
        return LayerSpec(name, cls, tuple(opts.items()))


def layer(name: str, cls: type, **options) -> LayerSpec:
    """Shorthand for ``LayerSpec(name, cls, tuple(options.items()))``."""
    return LayerSpec(name, cls, tuple(options.items()))


def _store(_previous, value):
    return value


def _check_input_shape(input_shape) -> tuple[int, int, int]:
    try:
        shape = tuple(operator.index(v) for v in input_shape)
    except TypeError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(
            f"input_shape must be three positive integers (H, W, C), got {input_shape!r}; "
            "e.g. input_shape=(224, 224, 3)."
        )
    return shape  # type: ignore[return-value]


class SequentialModel(nn.Module):
    """Base of the models: runs ``layers()`` in order; sows each output by layer name.

    Subclasses define dataclass fields (all with defaults, including
    ``input_shape``) and ``layers()``. ``dtype`` is the compute dtype (params stay
    float32); the model's output is returned in float32 so a loss is computed
    at full precision.
    """

    input_shape: tuple[int, int, int] = (32, 32, 3)
    dtype: Any = None

    def layers(self) -> tuple[LayerSpec, ...]:
        raise NotImplementedError

    def __post_init__(self):
        object.__setattr__(self, "input_shape", _check_input_shape(self.input_shape))
        self.validate()
        # Fail at construction (not at trace time) when the input is too small.
        self.output_shapes()
        super().__post_init__()

    def validate(self) -> None:
        """Check the constructor arguments (subclasses extend this)."""

    # -- description -------------------------------------------------------
    def layer_names(self) -> list[str]:
        return [spec.name for spec in self.layers()]

    def output_shapes(self, input_shape: Sequence[int] | None = None) -> dict[str, tuple]:
        """Per-layer output shapes (no batch axis) for ``input_shape`` (default: the model's).

        Raises:
          ShapeError: naming the first layer whose output would be empty or,
            for a convolution, whose size division is not exact.
        """
        shape = tuple(self.input_shape if input_shape is None else input_shape)
        out = {}
        for spec in self.layers():
            shape = spec.unbound().output_shape(shape)
            if any(d < 1 for d in shape):
                raise ShapeError(
                    f"{spec.name}: output shape {shape} is empty for input {self.input_shape}; "
                    "use a larger input_shape."
                )
            out[spec.name] = shape
        return out

    def _has_flatten(self) -> bool:
        return any(spec.cls is L.Flatten for spec in self.layers())

    # -- forward -----------------------------------------------------------
    @nn.compact
    def __call__(self, x, train: bool = False):
        """Logits (or probabilities with classifier_activation) for an NHWC batch ``x``.

        ``train=True`` makes dropout active; it then needs ``rngs={"dropout": key}``.
        """
        x = jnp.asarray(x)
        name = type(self).__name__
        if x.ndim != 4:
            raise ValueError(
                f"{name}: x must be a 4-D NHWC batch (N, H, W, C), got shape {x.shape}; "
                "add a batch axis with x[None]."
            )
        h, w, c = self.input_shape
        if x.shape[3] != c:
            raise ValueError(
                f"{name}: x has {x.shape[3]} channels but input_shape is {self.input_shape}; "
                f"pass input_shape=({x.shape[1]}, {x.shape[2]}, {x.shape[3]}) or feed {c} channels."
            )
        if tuple(x.shape[1:3]) != (h, w):
            if self._has_flatten():
                raise ValueError(
                    f"{name}: x is {x.shape[1]}x{x.shape[2]} but this model's dense layers were "
                    f"built for input_shape {self.input_shape}; pass input_shape="
                    f"({x.shape[1]}, {x.shape[2]}, {c}) or use to_fully_convolutional."
                )
            self.output_shapes(x.shape[1:])
        if self.dtype is not None:
            x = x.astype(self.dtype)
        elif not jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(jnp.float32)
        for spec in self.layers():
            extra = {"dtype": self.dtype} if "dtype" in spec.cls.__dataclass_fields__ else {}
            module = spec.build(**extra)
            if spec.cls is L.Dropout:
                x = module(x, deterministic=not train)
            else:
                x = module(x)
            # Sown in the layer's own scope: a variable named like the layer in this scope
            # would collide with the layer's parameters (flax reserves one name per scope).
            module.sow("intermediates", "output", x, reduce_fn=_store, init_fn=lambda: None)
        if jnp.dtype(x.dtype).itemsize < 4:
            x = x.astype(jnp.float32)
        return x


class Sequential(SequentialModel):
    """A model given directly by its layer list (used by FC -> conv conversion)."""

    layer_specs: tuple[LayerSpec, ...] = ()

    def layers(self) -> tuple[LayerSpec, ...]:
        return tuple(self.layer_specs)


def activations(model: nn.Module, variables, x, **apply_kwargs) -> dict[str, jax.Array]:
    """Every layer's output for ``x``, as ``{layer name: array}`` in layer order.

    (Returned through ``jax.jit`` the dict comes back with sorted keys, as every
    pytree dict does; ``model.layer_names()`` gives the order.)
    """
    _, state = model.apply(variables, x, mutable=["intermediates"], **apply_kwargs)
    inter = {name: value["output"] for name, value in state.get("intermediates", {}).items()
             if isinstance(value, Mapping) and "output" in value}
    order = model.layer_names() if hasattr(model, "layer_names") else list(inter)
    result = {name: inter[name] for name in order if name in inter}
    for name, value in inter.items():
        result.setdefault(name, value)
    return result
