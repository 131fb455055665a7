"""LeNet-5, AlexNet, VGG-16/19 and All-CNN-C as :class:`SequentialModel` s.

Common constructor arguments (Keras names where Keras has them):

* ``num_classes`` — size of the last layer (``classes`` in Keras; the
  registry accepts both).
* ``include_top`` — keep the classifier layers; with ``False`` the model ends
  at its last feature map and ``pooling`` may add ``"avg"`` / ``"max"`` global
  pooling (``None`` returns the map).
* ``classifier_activation`` — ``None`` (default) returns logits, which training
  needs; ``"softmax"`` returns probabilities as Keras does.
* ``dropout_rate`` — dropout in the classifier (active only with ``train=True``).
* ``input_shape`` — ``(H, W, C)``; a too-small input raises ShapeError naming
  the first layer whose output would be empty.
* ``dtype`` — compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.

Initialization is Keras' default (Glorot-uniform kernels, zero biases) for
every model; ``AlexNet(paper_init=True)`` uses the paper's N(0, 0.01) weights and
unit biases in conv2, conv4, conv5 and the hidden FC layers.
"""

from __future__ import annotations

import operator

import flax.linen as nn

from cnnjax import layers as L
from cnnjax.models.base import LayerSpec, SequentialModel, layer

__all__ = ["ClassifierModel", "LeNet5", "AlexNet", "VGG", "AllConvNet", "VGG_CONFIGS"]


class ClassifierModel(SequentialModel):
    """Common classifier arguments and the feature/top split; subclasses give both halves."""

    num_classes: int = 1000
    include_top: bool = True
    pooling: str | None = None
    dropout_rate: float = 0.0
    classifier_activation: str | None = None

    def validate(self) -> None:
        try:
            n = operator.index(self.num_classes)
        except TypeError:
            n = 0
        if isinstance(self.num_classes, bool) or n < 1:
            raise ValueError(
                f"num_classes must be a positive integer, got {self.num_classes!r}."
            )
        if self.pooling not in (None, "avg", "max"):
            raise ValueError(
                f"pooling must be None, 'avg' or 'max' (used when include_top=False), "
                f"got {self.pooling!r}."
            )
        if isinstance(self.dropout_rate, bool) or not 0.0 <= float(self.dropout_rate) < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate!r}.")
        L.get_activation(self.classifier_activation)

    def features(self) -> list[LayerSpec]:
        raise NotImplementedError

    def top(self) -> list[LayerSpec]:
        raise NotImplementedError

    def layers(self) -> tuple[LayerSpec, ...]:
        specs = list(self.features())
        if self.include_top:
            specs += self.top()
        elif self.pooling == "avg":
            specs.append(layer("global_avg_pool", L.GlobalAvgPool))
        elif self.pooling == "max":
            specs.append(layer("global_max_pool", L.GlobalMaxPool))
        return tuple(specs)

    def _dropout(self, name: str) -> list[LayerSpec]:
        return [layer(name, L.Dropout, rate=float(self.dropout_rate))] if self.dropout_rate else []


class LeNet5(ClassifierModel):
    """LeNet-5 exactly as the lecture's Keras model (61,706 parameters at 32x32x1).

    Layers (output shapes at 32x32x1): conv1 6@5x5 tanh (28, 28, 6), pool1 avg 2
    (14, 14, 6), conv2 16@5x5 tanh (10, 10, 16), pool2 (5, 5, 16), conv3 120@5x5
    tanh (1, 1, 120), flatten (120,), fc1 84 tanh, fc2 num_classes. Parameters
    156, 2,416, 48,120, 10,164, 850.
    """

    input_shape: tuple[int, int, int] = (32, 32, 1)
    num_classes: int = 10

    def features(self):
        return [
            layer("conv1", L.Conv, features=6, kernel_size=5, activation="tanh"),
            layer("pool1", L.AvgPool, window=2),
            layer("conv2", L.Conv, features=16, kernel_size=5, activation="tanh"),
            layer("pool2", L.AvgPool, window=2),
            layer("conv3", L.Conv, features=120, kernel_size=5, activation="tanh"),
        ]

    def top(self):
        return [
            layer("flatten", L.Flatten),
            layer("fc1", L.Dense, features=84, activation="tanh"),
            *self._dropout("dropout1"),
            layer("fc2", L.Dense, features=self.num_classes,
                  activation=self.classifier_activation),
        ]


def _paper_init(std: float = 0.01):
    return nn.initializers.normal(stddev=std)


class AlexNet(ClassifierModel):
    """The original, ungrouped AlexNet (Krizhevsky et al. 2012): 62,378,344 parameters.

    Layer names (Caffe's) and output shapes at 227x227x3: conv1 96@11x11/4 relu
    (55, 55, 96), lrn1, pool1 max 3/2 (27, 27, 96), conv2 256@5x5 p2 relu, lrn2,
    pool2 (13, 13, 256), conv3 384@3x3 p1, conv4 384@3x3 p1, conv5 256@3x3 p1
    (all relu), pool5 (6, 6, 256), flatten (9216,), fc6 4096 relu, dropout6, fc7
    4096 relu, dropout7, fc8 num_classes. LRN: k=2, n=5, alpha=1e-4, beta=0.75,
    after the ReLU and before the pool, as in the paper.
    """

    input_shape: tuple[int, int, int] = (227, 227, 3)
    dropout_rate: float = 0.5
    paper_init: bool = False

    def _conv(self, name, features, size, stride=1, padding=0, bias_one=False):
        opts = {}
        if self.paper_init:
            opts = {"kernel_init": _paper_init(),
                    "bias_init": nn.initializers.ones_init() if bias_one
                    else nn.initializers.zeros_init()}
        return layer(name, L.Conv, features=features, kernel_size=size, stride=stride,
                     padding=padding, activation="relu", **opts)

    def _fc(self, name, features, activation, bias_one):
        opts = {}
        if self.paper_init:
            opts = {"kernel_init": _paper_init(),
                    "bias_init": nn.initializers.ones_init() if bias_one
                    else nn.initializers.zeros_init()}
        return layer(name, L.Dense, features=features, activation=activation, **opts)

    def features(self):
        lrn = {"size": 5, "k": 2.0, "alpha": 1e-4, "beta": 0.75}
        return [
            self._conv("conv1", 96, 11, stride=4),
            layer("lrn1", L.LRN, **lrn),
            layer("pool1", L.MaxPool, window=3, stride=2),
            self._conv("conv2", 256, 5, padding=2, bias_one=True),
            layer("lrn2", L.LRN, **lrn),
            layer("pool2", L.MaxPool, window=3, stride=2),
            self._conv("conv3", 384, 3, padding=1),
            self._conv("conv4", 384, 3, padding=1, bias_one=True),
            self._conv("conv5", 256, 3, padding=1, bias_one=True),
            layer("pool5", L.MaxPool, window=3, stride=2),
        ]

    def top(self):
        return [
            layer("flatten", L.Flatten),
            self._fc("fc6", 4096, "relu", True),
            *self._dropout("dropout6"),
            self._fc("fc7", 4096, "relu", True),
            *self._dropout("dropout7"),
            self._fc("fc8", self.num_classes, self.classifier_activation, False),
        ]


# Convolutions per block (configurations D and E of Simonyan & Zisserman 2014).
VGG_CONFIGS = {16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
_VGG_FILTERS = (64, 128, 256, 512, 512)


class VGG(ClassifierModel):
    """VGG-16 / VGG-19 with Keras' layer names, so Keras weight files map by name.

    block{b}_conv{i}: 3x3, padding 1, relu; block{b}_pool: 2x2/2 max; then flatten,
    fc1 4096 relu, fc2 4096 relu, predictions num_classes. Spatial chain at 224:
    224 -> 112 -> 56 -> 28 -> 14 -> 7. Keras' head has no dropout (dropout_rate
    0); a positive dropout_rate inserts fc1_dropout / fc2_dropout as torchvision.
    138,357,544 (16) and 143,667,240 (19) parameters; 14,714,688 and 20,024,384
    without the top.
    """

    input_shape: tuple[int, int, int] = (224, 224, 3)
    depth: int = 16

    def validate(self) -> None:
        super().validate()
        if self.depth not in VGG_CONFIGS:
            raise ValueError(f"depth must be 16 or 19, got {self.depth!r}.")

    def features(self):
        specs = []
        for b, (n, k) in enumerate(zip(VGG_CONFIGS[self.depth], _VGG_FILTERS, strict=True),
                                   start=1):
            for i in range(1, n + 1):
                specs.append(layer(f"block{b}_conv{i}", L.Conv, features=k, kernel_size=3,
                                   padding=1, activation="relu"))
            specs.append(layer(f"block{b}_pool", L.MaxPool, window=2, stride=2))
        return specs

    def top(self):
        return [
            layer("flatten", L.Flatten),
            layer("fc1", L.Dense, features=4096, activation="relu"),
            *self._dropout("fc1_dropout"),
            layer("fc2", L.Dense, features=4096, activation="relu"),
            *self._dropout("fc2_dropout"),
            layer("predictions", L.Dense, features=self.num_classes,
                  activation=self.classifier_activation),
        ]


class AllConvNet(ClassifierModel):
    """All-CNN-C (Springenberg et al. 2014, "Striving for Simplicity"): 1,369,738 parameters.

    dropout0 (input, 0.2), conv1..conv2 96@3x3, conv3 96@3x3/2, dropout3 (0.5),
    conv4..conv5 192@3x3, conv6 192@3x3/2, dropout6 (0.5), conv7 192@3x3 valid,
    conv8 192@1x1, conv9 num_classes@1x1, global_avg_pool. Every conv has a ReLU,
    conv9 included, as in the paper's table 1. Stride-1 3x3 convs use padding 1;
    the strided ones pad "SAME" (32 -> 16 -> 8) so the division is exact. Shapes at
    32x32x3: 32, 32, 16, 16, 16, 8, 6, 6, 6, then (num_classes,). include_top=False
    ends after conv8. ``input_dropout_rate`` is the paper's 0.2.
    """

    input_shape: tuple[int, int, int] = (32, 32, 3)
    num_classes: int = 10
    dropout_rate: float = 0.5
    input_dropout_rate: float = 0.2

    def _drop(self, name, rate):
        return [layer(name, L.Dropout, rate=float(rate))] if rate else []

    def features(self):
        def conv(name, k, size=3, stride=1, padding=1):
            return layer(name, L.Conv, features=k, kernel_size=size, stride=stride,
                         padding=padding, activation="relu")

        return [
            *self._drop("dropout0", self.input_dropout_rate),
            conv("conv1", 96),
            conv("conv2", 96),
            conv("conv3", 96, stride=2, padding="SAME"),
            *self._drop("dropout3", self.dropout_rate),
            conv("conv4", 192),
            conv("conv5", 192),
            conv("conv6", 192, stride=2, padding="SAME"),
            *self._drop("dropout6", self.dropout_rate),
            conv("conv7", 192, padding=0),
            conv("conv8", 192, size=1, padding=0),
        ]

    def top(self):
        # The paper's ReLU sits on conv9, before the global average; a softmax goes after it.
        specs = [
            layer("conv9", L.Conv, features=self.num_classes, kernel_size=1, activation="relu"),
            layer("global_avg_pool", L.GlobalAvgPool),
        ]
        if self.classifier_activation is not None:
            specs.append(layer("predictions", L.Activation,
                               activation=self.classifier_activation))
        return specs
