"""Data for cnnjax: sources behind one interface, and on-device augmentation.

    source = get_source("digits", image_shape=(32, 32, 1))
    source.info                      # DatasetInfo
    source.train_batches(128, seed=0, start_step=0, process_index=0, process_count=1)
    source.eval_batches(128, split="test")
    x = augment.preprocess(batch["image"], key, train=True, config=cfg, mean=..., std=...)

Names: ``"digits"`` (scikit-learn's bundled 8x8 digits), ``"synthetic"``,
``"tfds:<name>[:<version>]"`` (e.g. ``"tfds:mnist"``, ``"tfds:cifar10:3.0.2"``).
"""

from __future__ import annotations

from cnnjax.data import augment
from cnnjax.data.base import DataConfigError, DatasetInfo, Source, epoch_permutation
from cnnjax.data.tfds_source import DatasetNotPreparedError

__all__ = [
    "DataConfigError",
    "DatasetInfo",
    "DatasetNotPreparedError",
    "Source",
    "augment",
    "epoch_permutation",
    "get_source",
]

NAMES = ("digits", "synthetic", "tfds:<name>[:<version>]")


def get_source(name: str, *, image_shape=None, data_dir=None, **options) -> Source:
    """The data source called ``name``, yielding images of ``image_shape`` (H, W, C).

    ``image_shape=None`` keeps the native shape (digits 8x8x1, synthetic
    32x32x3). Options: ``fit`` ("resize" or "pad"; digits and tfds),
    ``num_workers`` (0 = assemble batches in this process; N > 0 = grain with N
    worker processes), ``use_grain`` (grain pipeline even with 0 workers);
    synthetic also takes ``num_classes``, ``num_train``, ``num_test``, ``seed``.
    ``data_dir`` is where tfds looks for prepared data; digits and synthetic
    need no files and ignore it, so one config field can serve every dataset.
    """
    if not isinstance(name, str):
        raise DataConfigError(f"name={name!r} must be a string, one of {NAMES}.")
    try:
        if name == "digits":
            from cnnjax.data.digits import DigitsSource

            return DigitsSource(image_shape=image_shape, **options)
        if name == "synthetic":
            from cnnjax.data.synthetic import SyntheticSource

            return SyntheticSource(image_shape=image_shape, **options)
    except TypeError as e:
        raise DataConfigError(f"get_source({name!r}): unknown option ({e}).") from None
    if name.startswith("tfds:") and len(name) > 5:
        from cnnjax.data.tfds_source import TfdsSource

        known = {"fit", "num_workers", "use_grain"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise DataConfigError(
                f"get_source({name!r}): unknown options {unknown}; use {sorted(known)}."
            )
        return TfdsSource(name[5:], image_shape=image_shape, data_dir=data_dir, **options)
    raise DataConfigError(f"name={name!r} is not a known dataset; use one of {NAMES}.")

