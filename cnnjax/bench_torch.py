"""PyTorch peers of the cnnjax models for ``cnnjax bench --peer torch`` (torch is optional).

Imported only when a peer is asked for. The definitions follow the same papers
as ``cnnjax.models`` in PyTorch's own layout (NCHW, OIHW, oneDNN on CPU):

* LeNet-5: conv 6@5x5 tanh, avg pool 2, conv 16@5x5 tanh, avg pool 2, conv
  120@5x5 tanh, fc 84 tanh, fc classes (32x32x1, 61,706 params).
* AlexNet, the paper's ungrouped net with LRN: conv 96@11x11/4 relu, LRN,
  max pool 3/2, conv 256@5x5 p2 relu, LRN, max pool, conv 384, 384, 256 @3x3 p1
  relu, max pool, fc 4096, dropout, fc 4096, dropout, fc classes (227x227x3,
  62,378,344 params). LRN k=2, n=5, alpha=1e-4, beta=0.75 as in the paper:
  ``torch.nn.LocalResponseNorm`` divides alpha by n, so it gets alpha * n.
* VGG-16/19 (configurations D/E), 3x3 p1 relu convs, 2x2 max pools, fc 4096,
  4096, classes; no dropout unless ``dropout_rate`` (as cnnjax's Keras-style head).

A train step is zero_grad, forward, cross-entropy, backward and an SGD step
with momentum 0.9 (the trainer's optimizer in ``cnnjax.bench``); an inference
step is a forward pass under ``torch.inference_mode()``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

try:
    import torch
    from torch import nn
except ImportError as err:  # pragma: no cover - depends on the machine
    raise ImportError("the PyTorch peer needs torch: pip install torch==2.13.0") from err

_VGG_BLOCKS = {16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
_VGG_WIDTHS = (64, 128, 256, 512, 512)


def lenet5(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(16, 120, 5), nn.Tanh(), nn.Flatten(),
        nn.Linear(120, 84), nn.Tanh(), nn.Linear(84, num_classes),
    )


def alexnet(num_classes: int = 1000, in_channels: int = 3, dropout_rate: float = 0.5,
            ) -> nn.Module:
    def lrn() -> nn.Module:
        return nn.LocalResponseNorm(5, alpha=5 * 1e-4, beta=0.75, k=2.0)

    return nn.Sequential(
        nn.Conv2d(in_channels, 96, 11, stride=4), nn.ReLU(inplace=True), lrn(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(96, 256, 5, padding=2), nn.ReLU(inplace=True), lrn(), nn.MaxPool2d(3, 2),
        nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Flatten(),
        nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout_rate),
        nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout_rate),
        nn.Linear(4096, num_classes),
    )


def vgg(depth: int = 16, num_classes: int = 1000, in_channels: int = 3,
        dropout_rate: float = 0.0, image_size: int = 224) -> nn.Module:
    layers: list[nn.Module] = []
    channels = in_channels
    for convs, width in zip(_VGG_BLOCKS[depth], _VGG_WIDTHS, strict=True):
        for _ in range(convs):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
            channels = width
        layers.append(nn.MaxPool2d(2, 2))
    side = image_size // 32
    head: list[nn.Module] = [nn.Flatten(), nn.Linear(512 * side * side, 4096), nn.ReLU(True)]
    if dropout_rate:
        head.append(nn.Dropout(dropout_rate))
    head += [nn.Linear(4096, 4096), nn.ReLU(True)]
    if dropout_rate:
        head.append(nn.Dropout(dropout_rate))
    head.append(nn.Linear(4096, num_classes))
    return nn.Sequential(*layers, *head)


def build_model(name: str, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """The PyTorch model for a cnnjax model name; ``input_shape`` is cnnjax's (H, W, C)."""
    height, _, channels = input_shape
    if name == "lenet5":
        return lenet5(num_classes, channels)
    if name == "alexnet":
        return alexnet(num_classes, channels)
    if name in ("vgg16", "vgg19"):
        return vgg(int(name[3:]), num_classes, channels, image_size=height)
    raise ValueError(f"no PyTorch peer for model {name!r}; peers: lenet5, alexnet, vgg16, "
                     "vgg19.")


def make_step(name: str, *, batch: int, mode: str, dtype: str, num_classes: int,
              input_shape: tuple[int, int, int], seed: int = 0,
              ) -> tuple[Callable[[], None], dict[str, Any]]:
    """A no-argument callable running one PyTorch step on a fixed random batch, and info."""
    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(name, num_classes, input_shape).to(device)
    height, width, channels = input_shape
    x = torch.randn(batch, channels, height, width, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def autocast():
        return torch.autocast(device.type, dtype=autocast_dtype,
                              enabled=autocast_dtype is not None)

    if mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(model(x).float(), y)
            loss.backward()
            opt.step()
            sync()
    else:
        model.eval()

        def step() -> None:
            with torch.inference_mode(), autocast():
                model(x)
            sync()

    info = {"version": f"torch {torch.__version__}", "threads": torch.get_num_threads(),
            "device": str(device)}
    return step, info
