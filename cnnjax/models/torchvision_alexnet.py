"""torchvision's AlexNet: the 64-192-384-256-256 "one weird trick" network, so its weights load.

torchvision's published AlexNet is not the paper's network (which stays
:class:`cnnjax.models.AlexNet`): it follows Krizhevsky's 2014 "One weird trick
for parallelizing convolutional neural networks", with 64-192-384-256-256
filters, no LRN and dropout *before* fc6 and fc7. 61,100,840 parameters.

Layers and output shapes at 224x224x3 (torchvision module in brackets):

======== ============================== ================ ===================
name     layer                          output           torchvision
======== ============================== ================ ===================
conv1    64@11x11/4, pad (2, 1), relu   (55, 55, 64)     features.0
pool1    max 3/2                        (27, 27, 64)     features.2
conv2    192@5x5, pad 2, relu           (27, 27, 192)    features.3
pool2    max 3/2                        (13, 13, 192)    features.5
conv3    384@3x3, pad 1, relu           (13, 13, 384)    features.6
conv4    256@3x3, pad 1, relu           (13, 13, 256)    features.8
conv5    256@3x3, pad 1, relu           (13, 13, 256)    features.10
pool5    max 3/2                        (6, 6, 256)      features.12
avgpool  adaptive average to 6x6        (6, 6, 256)      avgpool
flatten  H, W, C order                  (9216,)          torch.flatten (C, H, W)
dropout6 dropout 0.5                                     classifier.0
fc6      4096, relu                     (4096,)          classifier.1
dropout7 dropout 0.5                                     classifier.3
fc7      4096, relu                     (4096,)          classifier.4
fc8      num_classes                    (1000,)          classifier.6
======== ============================== ================ ===================

Two decisions, both invisible at 224x224:

* conv1: torchvision pads 2 on every side and floors (224 + 4 - 11) / 4 + 1 =
  55.25 to 55, so its last padded row and column are never read. cnnjax
  convolutions insist on an exact division, so conv1 pads 2 before and 1 after:
  the same 55x55 output, bit for bit. Inputs whose (H - 8) is a multiple of 4
  (224, 256, ...) work; others raise ShapeError at construction.
* avgpool: torchvision's ``AdaptiveAvgPool2d((6, 6))`` is kept (as
  :class:`AdaptiveAvgPool`), so other input sizes still give fc6 its 9216
  inputs as in torchvision. At 224 the max pools already give 6x6 and it is the
  identity (it returns its input unchanged).

The weights from torchvision (``alexnet-owt-7be5be79.pth``) load with
:func:`cnnjax.weights.load_torchvision`, which converts OIHW kernels to HWIO and
fc6's (C, H, W) input order to cnnjax's (H, W, C).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cnnjax import layers as L
from cnnjax.models.base import layer
from cnnjax.models.classic import ClassifierModel

__all__ = ["AdaptiveAvgPool", "TorchvisionAlexNet", "adaptive_bins"]


def adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive-pooling bins: bin i covers [floor(i*size/out), ceil((i+1)*size/out))."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


class AdaptiveAvgPool(nn.Module):
    """``torch.nn.AdaptiveAvgPool2d(output_size)`` for NHWC: mean over PyTorch's bins."""

    output_size: tuple[int, int] = (6, 6)

    def __call__(self, x):
        (oh, ow), (_, h, w, _) = self.output_size, x.shape
        if (h, w) == (oh, ow):
            return x
        rows = [jnp.mean(x[:, a:b], axis=1, keepdims=True) for a, b in adaptive_bins(h, oh)]
        x = jnp.concatenate(rows, axis=1)
        cols = [jnp.mean(x[:, :, a:b], axis=2, keepdims=True) for a, b in adaptive_bins(w, ow)]
        return jnp.concatenate(cols, axis=2)

    def output_shape(self, input_shape):
        return (*self.output_size, input_shape[2])


class TorchvisionAlexNet(ClassifierModel):
    """torchvision's AlexNet (see the module docstring): 61,100,840 params at 224x224x3."""

    input_shape: tuple[int, int, int] = (224, 224, 3)
    dropout_rate: float = 0.5

    def features(self):
        def conv(name, k, size, stride=1, padding=1):
            return layer(name, L.Conv, features=k, kernel_size=size, stride=stride,
                         padding=padding, activation="relu")

        return [
            conv("conv1", 64, 11, stride=4, padding=((2, 1), (2, 1))),
            layer("pool1", L.MaxPool, window=3, stride=2),
            conv("conv2", 192, 5, padding=2),
            layer("pool2", L.MaxPool, window=3, stride=2),
            conv("conv3", 384, 3),
            conv("conv4", 256, 3),
            conv("conv5", 256, 3),
            layer("pool5", L.MaxPool, window=3, stride=2),
        ]

    def top(self):
        return [
            layer("avgpool", AdaptiveAvgPool, output_size=(6, 6)),
            layer("flatten", L.Flatten),
            *self._dropout("dropout6"),
            layer("fc6", L.Dense, features=4096, activation="relu"),
            *self._dropout("dropout7"),
            layer("fc7", L.Dense, features=4096, activation="relu"),
            layer("fc8", L.Dense, features=self.num_classes,
                  activation=self.classifier_activation),
        ]
