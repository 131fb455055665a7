"""scikit-learn's bundled UCI handwritten digits: 1,797 real 8x8 images, no download.

Split: stratified 80/20, fixed. For each class c (in label order) the examples
of that class, in the file's order, are permuted by numpy PCG64 seeded with
SeedSequence([0, c]); the first round(20%) go to test. That gives 1,438 train
and 359 test examples, independent of the scikit-learn version.

Pixels 0..16 are scaled to uint8 0..255 (round(v * 255 / 16)). The images are
brought to ``image_shape`` once, up front, and kept in memory: by default
bilinear resizing (8x8 -> 32x32 for LeNet-5; a padded 8x8 digit would be too
small to see through LeNet's 5x5 receptive fields), or ``fit="pad"``. Mean and
std are measured on the (resized) train split.
"""

from __future__ import annotations

import numpy as np

from cnnjax.data.base import (
    DataConfigError,
    DatasetInfo,
    Source,
    check_image_shape,
    convert_channels,
    fit_image,
)

TEST_FRACTION = 0.2
SPLIT_SEED = 0


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified (train, test) index arrays into ``load_digits()``."""
    train, test = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([SPLIT_SEED, int(c)])))
        members = members[rng.permutation(len(members))]
        n_test = int(round(TEST_FRACTION * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


class DigitsSource(Source):
    """In-memory digits source (see the module docstring)."""

    def __init__(self, *, image_shape=None, fit: str = "resize", num_workers: int = 0,
                 use_grain: bool = False):
        from sklearn.datasets import load_digits

        digits = load_digits()
        raw = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
        labels = digits.target.astype(np.int32)
        shape = check_image_shape(image_shape) or (8, 8, 1)
        images = np.stack([
            convert_channels(fit_image(im, shape[:2], fit), shape[2]) for im in raw
        ]) if shape != (8, 8, 1) else raw
        train, test = split_indices(labels)
        self._images = {"train": images[train], "test": images[test]}
        self._labels = {"train": labels[train], "test": labels[test]}
        scaled = self._images["train"].astype(np.float64) / 255.0
        self.num_workers = _check_workers(num_workers)
        self.use_grain = bool(use_grain)
        self.info = DatasetInfo(
            name="digits",
            num_classes=10,
            image_shape=shape,
            num_train=len(train),
            num_test=len(test),
            mean=tuple(float(m) for m in scaled.mean(axis=(0, 1, 2))),
            std=tuple(float(s) for s in scaled.std(axis=(0, 1, 2))),
            class_names=tuple(str(i) for i in range(10)),
        )

    def fetch(self, split, indices):
        return self._images[split][indices], self._labels[split][indices]


def _check_workers(num_workers) -> int:
    if not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
        raise DataConfigError(
            f"num_workers={num_workers!r} must be an integer >= 0 (0 = read in this process)."
        )
    return int(num_workers)
