"""Transfer learning: a registered network without its top, frozen, under a new dense head.

The lecture's model is ``get("vgg16_transfer")``::

    VGG-16 without top (224x224x3 -> 7x7x512, frozen) -> Flatten
    -> Dense(4096, relu) -> Dense(4096, relu) -> Dense(1)        # a logit

    >>> print(cnnjax.summary(cnnjax.models.get("vgg16_transfer"), (224, 224, 3)))
     vgg16 (VGG)                  (None, 7, 7, 512)         14714688
     flatten (Flatten)            (None, 25088)             0
     dense_1 (Dense)              (None, 4096)              102764544
     dense_2 (Dense)              (None, 4096)              16781312
     predictions (Dense)          (None, 1)                 4097
    Total params: 134264641 (512.18 MB)
    Trainable params: 119549953 (456.05 MB)
    Non-trainable params: 14714688 (56.13 MB)

The base's parameters live under one top-level name, the registry name
(``params["vgg16"]["block1_conv1"]["kernel"]``), with the base's own layer
names beneath, so Keras ``_notop`` files and torchvision ``features.*`` load
into it (:func:`cnnjax.weights.load_into`).

Freezing. ``freeze`` is ``"base"`` (the whole base), ``"none"``, or a sequence
of the base's layer names or name prefixes, e.g. ``("block1", "block2",
"block3", "block4")`` to fine-tune block5 and the head. The single source of
truth is :meth:`TransferModel.is_trainable` (a predicate on a parameter's path);
:func:`trainable_mask` turns it into a pytree of bools, and it is used

* by :func:`cnnjax.summary` for the trainable / non-trainable split,
* by the optimizer (``cnnjax.train.optim``): frozen leaves get
  ``optax.set_to_zero()`` under ``optax.multi_transform``, so they carry no
  optimizer state, and the train step keeps them bit-for-bit,
* by the model itself: frozen parameters pass through ``jax.lax.stop_gradient``
  when read. A frozen prefix of the base (all of it with ``freeze="base"``)
  then depends on nothing that is differentiated, so JAX builds no backward
  pass for it at all (no weight gradients, no input gradients); a frozen layer
  above a trainable one only propagates the input gradient it must.

Outputs are logits (training computes the loss from logits: binary
cross-entropy for ``num_outputs=1``, softmax cross-entropy above);
``classifier_activation="sigmoid"`` / ``"softmax"`` returns probabilities as
Keras' ``Dense(1, activation="sigmoid")`` does.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax import layers as L
from cnnjax._tree import path_names
from cnnjax.models.base import _check_input_shape

__all__ = ["TransferModel", "trainable_mask", "path_names", "transfer", "vgg16_transfer"]


def trainable_mask(model: nn.Module, params: Mapping) -> Any:
    """A pytree like ``params`` of Python bools: True where the parameter is trained.

    ``params`` is the ``"params"`` collection (not the whole variables dict).
    Models without an ``is_trainable`` method train every parameter.
    """
    is_trainable = getattr(model, "is_trainable", None)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: True if is_trainable is None else bool(is_trainable(path_names(path))),
        params)


def _base_model(name: str, input_shape, dtype, base_kwargs: Mapping):
    from cnnjax import models

    kwargs = dict(base_kwargs)
    kwargs.update(include_top=False, input_shape=input_shape, parent=None)
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        return models.get(name, **kwargs)
    except ValueError as err:
        if "unknown argument" in str(err) and "include_top" in str(err):
            raise ValueError(f"base {name!r} has no include_top option, so it cannot be a "
                             "transfer-learning base; use vgg16, vgg19, alexnet, "
                             "alexnet_torchvision, lenet5 or allconv.") from None
        raise


class TransferModel(nn.Module):
    """A registered network without top (the base) plus Flatten and a new dense head.

    Attributes:
      base: registry name of the base, built with ``include_top=False`` at
        ``input_shape``; its parameters live under ``params[base]``.
      head: widths of the hidden dense layers (``dense_1``, ``dense_2``, ...).
      num_outputs: units of the last layer (``predictions``): 1 for a binary
        problem (one logit, binary cross-entropy), else the number of classes.
      freeze: ``"base"``, ``"none"``, or a sequence of base layer names or name
        prefixes (``"block1"`` freezes ``block1_conv1``, ``block1_conv2``).
      head_activation: activation of the hidden dense layers.
      dropout_rate: dropout after each hidden dense layer (0: none, as the lecture).
      classifier_activation: None (logits) or "sigmoid" / "softmax".
      base_kwargs: further constructor arguments of the base (a mapping).
      input_shape: (H, W, C) of the input.
      dtype: compute dtype (parameters stay float32).
    """

    base: str = "vgg16"
    head: Sequence[int] = (4096, 4096)
    num_outputs: int = 1
    freeze: str | Sequence[str] = "base"
    head_activation: str = "relu"
    dropout_rate: float = 0.0
    classifier_activation: str | None = None
    base_kwargs: Mapping[str, Any] | None = None
    input_shape: tuple[int, int, int] = (224, 224, 3)
    dtype: Any = None

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "input_shape", _check_input_shape(self.input_shape))
        if not isinstance(self.base, str) or not self.base:
            raise ValueError(f"base must be a registered model name such as 'vgg16', "
                             f"got {self.base!r}.")
        try:
            head = tuple(operator.index(w) for w in self.head)
        except TypeError:
            head = (0,)
        if any(w < 1 for w in head):
            raise ValueError(f"head must be a sequence of positive layer widths such as "
                             f"(4096, 4096), got {self.head!r}.")
        set_(self, "head", head)
        try:
            n = operator.index(self.num_outputs)
        except TypeError:
            n = 0
        if isinstance(self.num_outputs, bool) or n < 1:
            raise ValueError(f"num_outputs must be a positive integer (1 for a binary problem), "
                             f"got {self.num_outputs!r}.")
        if isinstance(self.dropout_rate, bool) or not 0.0 <= float(self.dropout_rate) < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate!r}.")
        L.get_activation(self.head_activation)
        L.get_activation(self.classifier_activation)
        base = self.base_model()
        if isinstance(self.freeze, str):
            if self.freeze not in ("base", "none"):
                raise ValueError(f"freeze must be 'base', 'none' or a list of {self.base} layer "
                                 f"names or prefixes, got {self.freeze!r}.")
        else:
            try:
                names = tuple(str(n) for n in self.freeze)
            except TypeError:
                raise ValueError(f"freeze must be 'base', 'none' or a list of layer names, got "
                                 f"{self.freeze!r}.") from None
            layer_names = base.layer_names()
            unknown = [n for n in names if not any(_matches(layer, n) for layer in layer_names)]
            if unknown:
                prefixes = sorted({layer.split("_")[0] for layer in layer_names})
                raise ValueError(
                    f"freeze names {unknown} match no layer of {self.base} without top; use "
                    f"prefixes {prefixes} or layer names {layer_names}.")
            set_(self, "freeze", names)
        super().__post_init__()

    # -- description -------------------------------------------------------
    def base_model(self) -> nn.Module:
        """The base network alone (detached): ``get(base, include_top=False, ...)``."""
        return _base_model(self.base, self.input_shape, self.dtype, self.base_kwargs or {})

    def layer_names(self) -> list[str]:
        return [self.base, "flatten", *self._dense_names()]

    def _dense_names(self) -> list[str]:
        return [f"dense_{i}" for i in range(1, len(self.head) + 1)] + ["predictions"]

    def is_trainable(self, path: Sequence[str]) -> bool:
        """Whether the parameter at ``path`` (``("vgg16", "block1_conv1", "kernel")``) trains."""
        if not path or path[0] != self.base or self.freeze == "none":
            return True
        if self.freeze == "base":
            return False
        return not (len(path) > 1 and any(_matches(path[1], n) for n in self.freeze))

    # -- forward -----------------------------------------------------------
    @nn.compact
    def __call__(self, x, train: bool = False):
        """Logits (B, num_outputs) for an NHWC batch (probabilities with classifier_activation)."""
        proto = self.base_model()
        fields = {f: getattr(proto, f) for f in proto.__dataclass_fields__
                  if f not in ("parent", "name")}
        base_name = self.base

        def stop_frozen(variables):
            # Frozen parameters are constants to autodiff: no gradient, no backward pass.
            variables = dict(variables)
            variables["params"] = jax.tree_util.tree_map_with_path(
                lambda p, v: v if self.is_trainable((base_name, *path_names(p)))
                else jax.lax.stop_gradient(v), variables.get("params", {}))
            return variables

        cls = type(proto)
        if self.freeze != "none":
            # init=True only while initializing: otherwise an apply with a mutable collection
            # (e.g. mutable=["intermediates"]) would hand the base no parameters.
            cls = nn.map_variables(cls, "params", trans_in_fn=stop_frozen,
                                   init=self.is_initializing())
        base = cls(name=base_name, **fields)
        x = base(x, train=train)
        base.sow("intermediates", "output", x, reduce_fn=lambda _, v: v, init_fn=lambda: None)
        specs = [L.Flatten(name="flatten")]
        for i, width in enumerate(self.head, start=1):
            specs.append(L.Dense(width, activation=self.head_activation, dtype=self.dtype,
                                 name=f"dense_{i}"))
            if self.dropout_rate:
                specs.append(L.Dropout(float(self.dropout_rate), name=f"dropout_{i}"))
        specs.append(L.Dense(self.num_outputs, activation=self.classifier_activation,
                             dtype=self.dtype, name="predictions"))
        for module in specs:
            x = module(x, deterministic=not train) if isinstance(module, L.Dropout) else module(x)
            module.sow("intermediates", "output", x, reduce_fn=lambda _, v: v,
                       init_fn=lambda: None)
        if jnp.dtype(x.dtype).itemsize < 4:
            x = x.astype(jnp.float32)
        return x


def _matches(layer: str, name: str) -> bool:
    return layer == name or layer.startswith(name + "_")


def transfer(**kwargs) -> TransferModel:
    """A :class:`TransferModel`; ``num_classes`` (as the trainer passes it) sets ``num_outputs``.

    ``num_classes=2`` gives the lecture's single sigmoid logit (``num_outputs=1``);
    any other count gives that many softmax logits. An explicit ``num_outputs`` wins.
    """
    kwargs = dict(kwargs)
    classes = kwargs.pop("num_classes", kwargs.pop("classes", None))
    if classes is not None and "num_outputs" not in kwargs:
        kwargs["num_outputs"] = 1 if classes == 2 else classes
    if "input_shape" in kwargs:
        if kwargs["input_shape"] is None:
            del kwargs["input_shape"]
        else:
            kwargs["input_shape"] = tuple(kwargs["input_shape"])
    fields = set(TransferModel.__dataclass_fields__) - {"parent"}
    unknown = sorted(set(kwargs) - fields - {"parent"})
    if unknown:
        allowed = sorted(f for f in fields if not f.startswith("_") and f != "name")
        raise ValueError(f"TransferModel got unknown argument(s) {unknown}; valid: "
                         f"{', '.join(allowed)}.")
    return TransferModel(**kwargs)


def vgg16_transfer(**kwargs) -> TransferModel:
    """The lecture's model: frozen VGG-16 without top, Dense 4096-4096, one logit (134,264,641)."""
    kwargs.setdefault("base", "vgg16")
    return transfer(**kwargs)
