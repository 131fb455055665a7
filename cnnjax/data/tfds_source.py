"""Any TensorFlow Datasets image-classification dataset, read with ``tfds.data_source``.

``tfds.data_source`` gives random access to prepared array_record files with
no TensorFlow (Pillow decodes the images). The dataset must have ``image`` and
``label`` features and already be prepared under ``data_dir`` (nothing is
downloaded here: ``download=False``).

Splits: train is ``"train"``; the evaluation split is ``"test"`` when the
dataset has one, else ``"validation"`` (imagenet2012), else the last 10% of
train (``train[90%:]``, with ``train[:90%]`` for training; cats_vs_dogs).

Images are read one by one when a batch is assembled, converted to
``image_shape`` on the host (``fit="resize"``: shorter side to size, bilinear,
then center crop; ``fit="pad"``: center pad/crop), and never cached.

Mean/std (on the [0, 1] scale): published constants for mnist, fashion_mnist,
cifar10 and cifar100; the ImageNet constants for imagenet2012 and for any
other 3-channel dataset (the usual choice for ImageNet-pretrained transfer,
e.g. cats_vs_dogs); 0.5/0.5 otherwise.
"""

from __future__ import annotations

import numpy as np

from cnnjax.data.base import (
    DataConfigError,
    DatasetInfo,
    Source,
    check_image_shape,
    convert_channels,
    convert_stats,
    fit_image,
)
from cnnjax.data.digits import _check_workers

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KNOWN_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": (IMAGENET_MEAN, IMAGENET_STD),
}
# Used only when the dataset's metadata lists no splits (as under mock_data).
KNOWN_EVAL_SPLIT = {"imagenet2012": "validation", "cats_vs_dogs": None, "imagenette": "validation"}
CARVE_TRAIN, CARVE_TEST = "train[:90%]", "train[90%:]"


class DatasetNotPreparedError(FileNotFoundError):
    """The tfds dataset is not prepared where we looked; the message says how to prepare it."""


def not_prepared_message(name: str, data_dir) -> str:
    where = data_dir if data_dir is not None else "the default tfds data_dir"
    return (
        f"tfds dataset '{name}' is not prepared in {where}: prepare it with "
        f"`tfds build {name.split(':')[0]} --data_dir DIR` (needs TensorFlow and network access) "
        "or pass data_dir (--config.data_dir=DIR) pointing at the prepared array_record data "
        "(on a TPU VM copy it from GCS to local disk first, since array_record cannot read gs://)."
    )


def _open(tfds, name: str, split: str, data_dir):
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError as e:
        import difflib

        base = name.split(":")[0]
        try:
            # (tfds.list_builders() imports TensorFlow; the registry does not.)
            names = tfds.core.registered.list_imported_builders()
            close = difflib.get_close_matches(base, names, n=1, cutoff=0.6)
        except Exception:  # the suggestion is a courtesy
            close = []
        hint = f"did you mean --config.dataset=tfds:{close[0]}? or " if close else ""
        raise DataConfigError(
            f"name='tfds:{name}': tfds has no dataset called '{base}'; {hint}"
            "see https://www.tensorflow.org/datasets/catalog for the names."
        ) from e
    except (NotImplementedError, FileNotFoundError, OSError, AssertionError) as e:
        raise DatasetNotPreparedError(not_prepared_message(name, data_dir)) from e


class TfdsSource(Source):
    def __init__(self, name: str, *, image_shape=None, data_dir=None, fit: str = "resize",
                 num_workers: int = 0, use_grain: bool = False):
        import tensorflow_datasets as tfds

        if data_dir is not None and str(data_dir).startswith("gs://"):
            raise DataConfigError(
                f"data_dir={data_dir!r}: array_record cannot read gs://; copy the prepared "
                "dataset to local disk on every host and pass that directory."
            )
        self.name = name
        self.fit = fit
        self.num_workers = _check_workers(num_workers)
        self.use_grain = bool(use_grain)
        base = name.split(":")[0].split("/")[0]

        train = _open(tfds, name, "train", data_dir)
        ds_info = train.dataset_info
        features = ds_info.features
        if "image" not in features or "label" not in features:
            raise DataConfigError(
                f"name='tfds:{name}' has features {sorted(features.keys())}; only datasets with "
                "'image' and 'label' features are supported."
            )
        splits = set(ds_info.splits.keys())
        if splits:
            eval_split = next((s for s in ("test", "validation") if s in splits), None)
        else:
            eval_split = KNOWN_EVAL_SPLIT.get(base, "test")
        if eval_split is None:
            train = _open(tfds, name, CARVE_TRAIN, data_dir)
            eval_split = CARVE_TEST
        self._splits = {"train": train, "test": _open(tfds, name, eval_split, data_dir)}
        self.split_names = {"train": train.split if eval_split == CARVE_TEST else "train",
                            "test": eval_split}

        native = tuple(features["image"].shape)
        if image_shape is None:
            if None in native:
                raise DataConfigError(
                    f"image_shape=None but tfds:{name} has images of varying size {native}; "
                    "pass image_shape=(height, width, channels), e.g. (224, 224, 3)."
                )
            shape = check_image_shape(native)
        else:
            shape = check_image_shape(image_shape)
        self._native_channels = native[2] if native[2] is not None else 3

        if base in KNOWN_STATS:
            mean, std = KNOWN_STATS[base]
        elif self._native_channels == 3:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:
            mean, std = (0.5,), (0.5,)
        label = features["label"]
        names = getattr(label, "names", None)
        self.info = DatasetInfo(
            name=f"tfds:{name}",
            num_classes=int(label.num_classes),
            image_shape=shape,
            num_train=len(self._splits["train"]),
            num_test=len(self._splits["test"]),
            mean=convert_stats(mean, shape[2]),
            std=convert_stats(std, shape[2]),
            class_names=tuple(names) if names else None,
        )

    def fetch(self, split, indices):
        source = self._splits[split]
        h, w, c = self.info.image_shape
        images = np.empty((len(indices), h, w, c), np.uint8)
        labels = np.empty((len(indices),), np.int32)
        for row, index in enumerate(indices):
            example = source[int(index)]
            image = np.asarray(example["image"], np.uint8)
            if image.ndim == 2:
                image = image[..., None]
            images[row] = convert_channels(fit_image(image, (h, w), self.fit), c)
            labels[row] = int(example["label"])
        return images, labels
