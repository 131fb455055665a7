"""The classic architectures as pure Flax linen modules, and a registry.

>>> model = cnnjax.models.get("vgg16", num_classes=10)
>>> variables = model.init(jax.random.key(0), jnp.zeros((1, *model.input_shape)))
>>> logits = model.apply(variables, x, train=False)
>>> feats = cnnjax.models.activations(model, variables, x)   # {"block1_conv1": ..., ...}

Models return logits unless ``classifier_activation`` is given; ``train=True``
enables dropout and needs ``rngs={"dropout": key}``. No model keeps batch
statistics: ``variables == {"params": ...}``.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn

from cnnjax.models.base import LayerSpec, Sequential, SequentialModel, activations, layer
from cnnjax.models.classic import VGG, AlexNet, AllConvNet, ClassifierModel, LeNet5
from cnnjax.models.fully_conv import dense_to_conv, to_fully_convolutional
from cnnjax.models.pattern import ConvNet, PatternError, from_pattern, pattern_layers
from cnnjax.models.torchvision_alexnet import TorchvisionAlexNet
from cnnjax.models.transfer import TransferModel, trainable_mask, transfer, vgg16_transfer

__all__ = [
    "get",
    "available",
    "register",
    "lenet5",
    "alexnet",
    "vgg16",
    "vgg19",
    "allconv",
    "from_pattern",
    "pattern_layers",
    "PatternError",
    "ConvNet",
    "activations",
    "to_fully_convolutional",
    "dense_to_conv",
    "LeNet5",
    "AlexNet",
    "VGG",
    "AllConvNet",
    "ClassifierModel",
    "SequentialModel",
    "Sequential",
    "LayerSpec",
    "layer",
    "alexnet_torchvision",
    "TorchvisionAlexNet",
    "TransferModel",
    "trainable_mask",
    "pretrained",
]


def _kwargs(kwargs: dict) -> dict:
    """Keras' ``classes`` is accepted as an alias of ``num_classes``."""
    kwargs = dict(kwargs)
    if "classes" in kwargs:
        if "num_classes" in kwargs:
            raise ValueError("pass num_classes or its Keras alias classes, not both.")
        kwargs["num_classes"] = kwargs.pop("classes")
    if "input_shape" in kwargs and kwargs["input_shape"] is not None:
        kwargs["input_shape"] = tuple(kwargs["input_shape"])
    elif "input_shape" in kwargs:
        del kwargs["input_shape"]
    return kwargs


def _construct(cls, kwargs, **fixed):
    kwargs = _kwargs(kwargs)
    fields = set(cls.__dataclass_fields__) - {"parent"}
    unknown = sorted(set(kwargs) - fields - {"parent"})
    if unknown:
        allowed = sorted(f for f in fields if not f.startswith("_") and f not in fixed)
        raise ValueError(
            f"{cls.__name__} got unknown argument(s) {unknown}; valid: {', '.join(allowed)}."
        )
    return cls(**fixed, **kwargs)


def lenet5(**kwargs) -> LeNet5:
    """LeNet-5 (lecture/Keras form, 32x32x1, 61,706 params)."""
    return _construct(LeNet5, kwargs)


def alexnet(**kwargs) -> AlexNet:
    """The original ungrouped AlexNet (227x227x3, 62,378,344 params)."""
    return _construct(AlexNet, kwargs)


def vgg16(**kwargs) -> VGG:
    """VGG-16, configuration D (224x224x3, 138,357,544 params), Keras layer names."""
    return _construct(VGG, kwargs, depth=16)


def vgg19(**kwargs) -> VGG:
    """VGG-19, configuration E (224x224x3, 143,667,240 params), Keras layer names."""
    return _construct(VGG, kwargs, depth=19)


def allconv(**kwargs) -> AllConvNet:
    """All-CNN-C for 32x32x3 (1,369,738 params with 10 classes)."""
    return _construct(AllConvNet, kwargs)


def alexnet_torchvision(**kwargs) -> TorchvisionAlexNet:
    """torchvision's AlexNet, 64-192-384-256-256 without LRN (224x224x3, 61,100,840 params)."""
    return _construct(TorchvisionAlexNet, kwargs)


def pretrained(name: str, path, **kwargs):
    """``(model, variables)`` with weights from ``path``; see :func:`cnnjax.weights.pretrained`."""
    from cnnjax import weights

    return weights.pretrained(name, path, **kwargs)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lenet5,
    "alexnet": alexnet,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "allconv": allconv,
    "alexnet_torchvision": alexnet_torchvision,
    "transfer": transfer,
    "vgg16_transfer": vgg16_transfer,
}


def register(name: str, factory: Callable[..., nn.Module]) -> None:
    """Add a model factory under ``name`` (e.g. a transfer-learning head)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}.")
    _REGISTRY[name.lower()] = factory


def available() -> list[str]:
    """The registered model names, e.g. ["alexnet", "allconv", "lenet5", "vgg16", "vgg19"]."""
    return sorted(_REGISTRY)


def get(name: str, **kwargs) -> nn.Module:
    """The model called ``name`` built with ``kwargs`` (see :mod:`cnnjax.models.classic`)."""
    key = name.lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}.")
    return _REGISTRY[key](**kwargs)
