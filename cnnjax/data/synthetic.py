"""Deterministic random data of any shape, for benchmarks and smoke tests.

Labels: uniform over ``num_classes`` from PCG64 seeded with (seed, split).
Image ``i`` of a split: uniform uint8 noise from PCG64 seeded with
(seed, split, i), generated when read, so large shapes cost no memory.
There is nothing to learn in it. Mean 0.5 and std sqrt((256^2 - 1) / 12) / 255
are the exact statistics of uniform bytes.
"""

from __future__ import annotations

import math

import numpy as np

from cnnjax.data.base import DataConfigError, DatasetInfo, Source, check_image_shape
from cnnjax.data.digits import _check_workers

_SPLIT_ID = {"train": 0, "test": 1}
UNIFORM_STD = math.sqrt((256**2 - 1) / 12) / 255


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


class SyntheticSource(Source):
    def __init__(self, *, image_shape=None, num_classes: int = 10, num_train: int = 1024,
                 num_test: int = 256, seed: int = 0, num_workers: int = 0,
                 use_grain: bool = False):
        shape = check_image_shape(image_shape) or (32, 32, 3)
        for arg, value, low in (("num_classes", num_classes, 1), ("num_train", num_train, 1),
                                ("num_test", num_test, 1)):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise DataConfigError(f"{arg}={value!r} must be an integer >= {low}.")
        self.seed = int(seed)
        self.num_workers = _check_workers(num_workers)
        self.use_grain = bool(use_grain)
        self._labels = {
            split: _rng(self.seed, sid).integers(0, num_classes, size=n).astype(np.int32)
            for (split, sid), n in zip(_SPLIT_ID.items(), (num_train, num_test), strict=True)
        }
        self.info = DatasetInfo(
            name="synthetic",
            num_classes=int(num_classes),
            image_shape=shape,
            num_train=int(num_train),
            num_test=int(num_test),
            mean=(0.5,) * shape[2],
            std=(UNIFORM_STD,) * shape[2],
            class_names=None,
        )

    def fetch(self, split, indices):
        sid = _SPLIT_ID[split]
        images = np.stack([
            _rng(self.seed, sid, i).integers(0, 256, size=self.info.image_shape, dtype=np.uint8)
            for i in indices
        ])
        return images, self._labels[split][indices]
