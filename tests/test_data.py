"""Sources, batch ordering, process splits, tfds (mock_data) and the grain loader."""

import itertools
from unittest import mock

import numpy as np
import pytest

from cnnjax.data import DatasetInfo, DatasetNotPreparedError, get_source
from cnnjax.data.digits import split_indices


@pytest.fixture(scope="module")
def digits():
    return get_source("digits", image_shape=(32, 32, 1))


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# --- digits ---

def test_digits_info_and_split(digits):
    info = digits.info
    assert isinstance(info, DatasetInfo)
    assert info.num_train + info.num_test == 1797
    assert (info.num_train, info.num_test) == (1438, 359)
    assert info.image_shape == (32, 32, 1) and info.num_classes == 10
    assert len(info.mean) == len(info.std) == 1 and 0 < info.mean[0] < 1 and info.std[0] > 0
    from sklearn.datasets import load_digits

    train, test = split_indices(load_digits().target)
    assert len(np.intersect1d(train, test)) == 0
    assert len(np.union1d(train, test)) == 1797


def test_digits_batch_dtypes_and_labels(digits):
    batch = next(digits.train_batches(64, seed=0))
    assert batch["image"].shape == (64, 32, 32, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["mask"].dtype == np.bool_
    assert batch["mask"].all()
    assert batch["image"].max() > 200  # scaled from 0..16 to 0..255
    labels = np.concatenate([b["label"] for b in digits.eval_batches(500)])
    assert labels.min() == 0 and labels.max() == 9


def test_digits_native_and_rgb_shapes():
    native = get_source("digits")
    assert native.info.image_shape == (8, 8, 1)
    img = next(native.eval_batches(4))["image"]
    assert img.max() == 255 and img.shape == (4, 8, 8, 1)
    rgb = get_source("digits", image_shape=(16, 16, 3))
    img = next(rgb.eval_batches(4))["image"]
    assert img.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(img[..., 0], img[..., 2])
    assert len(rgb.info.mean) == 3
    padded = get_source("digits", image_shape=(12, 12, 1), fit="pad")
    img = next(padded.eval_batches(4))["image"]
    np.testing.assert_array_equal(img[:, 2:10, 2:10], next(native.eval_batches(4))["image"])
    assert not img[:, :2].any()


# --- ordering ---

def test_train_batches_pure_in_seed_and_step(digits):
    a = take(digits.train_batches(100, seed=3), 20)
    b = take(digits.train_batches(100, seed=3), 20)
    same_batches(a, b)
    c = take(digits.train_batches(100, seed=4), 1)
    assert not np.array_equal(a[0]["label"], c[0]["label"]) or not np.array_equal(
        a[0]["image"], c[0]["image"])


def test_resume_equals_tail(digits):
    fresh = take(digits.train_batches(100, seed=1), 20)  # 14 steps per epoch: spans 2 epochs
    resumed = take(digits.train_batches(100, seed=1, start_step=11), 9)
    same_batches(fresh[11:], resumed)


def test_process_slices_concatenate_to_global_batch(digits):
    whole = take(digits.train_batches(96, seed=2, start_step=5), 3)
    parts = [take(digits.train_batches(96, seed=2, start_step=5, process_index=i,
                                       process_count=4), 3) for i in range(4)]
    for step in range(3):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(
                np.concatenate([p[step][key] for p in parts]), whole[step][key])


def test_epochs_cover_train_once_and_reshuffle(digits):
    spe = digits.steps_per_epoch(100)
    assert spe == 14
    plans = [np.concatenate([digits.train_indices(100, s, seed=0)
                             for s in range(e * spe, (e + 1) * spe)]) for e in (0, 1)]
    for plan in plans:
        assert len(np.unique(plan)) == len(plan) == 1400
    assert not np.array_equal(plans[0], plans[1])


def test_eval_covers_split_once_with_mask(digits):
    for count in (1, 2):
        seen = []
        for index in range(count):
            for batch in digits.eval_batches(64, process_index=index, process_count=count):
                assert batch["image"].shape[0] == 64 // count
                seen.append((index, batch))
        masks = np.concatenate([b["mask"] for _, b in seen])
        assert masks.sum() == 359
    batches = list(digits.eval_batches(64))
    assert len(batches) == 6 and batches[-1]["mask"].sum() == 359 - 5 * 64
    assert not batches[-1]["image"][~batches[-1]["mask"]].any()
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, digits.fetch("test", np.arange(359))[1])


def test_bad_arguments_are_one_sentence(digits):
    with pytest.raises(ValueError, match="divisible by process_count=3"):
        digits.train_batches(64, seed=0, process_count=3)
    with pytest.raises(ValueError, match="global_batch_size=5000"):
        digits.steps_per_epoch(5000)
    with pytest.raises(ValueError, match="name='nope'"):
        get_source("nope")
    with pytest.raises(ValueError, match="image_shape"):
        get_source("digits", image_shape=(32, 32))
    with pytest.raises(ValueError, match="unknown option"):
        get_source("digits", colour=True)


# --- synthetic ---

def test_synthetic_is_deterministic_and_shaped():
    src = get_source("synthetic", image_shape=(20, 24, 3), num_classes=7, num_train=50,
                     num_test=13, seed=5)
    assert src.info.num_train == 50 and src.info.image_shape == (20, 24, 3)
    a = take(src.train_batches(10, seed=0), 6)
    b = take(get_source("synthetic", image_shape=(20, 24, 3), num_classes=7, num_train=50,
                        num_test=13, seed=5).train_batches(10, seed=0), 6)
    same_batches(a, b)
    assert a[0]["image"].shape == (10, 20, 24, 3) and a[0]["image"].dtype == np.uint8
    labels = np.concatenate([x["label"] for x in a])
    assert labels.min() >= 0 and labels.max() < 7
    assert sum(int(x["mask"].sum()) for x in src.eval_batches(4)) == 13


# --- tfds through tfds.data_source, with mock data ---

@pytest.mark.parametrize("name,shape,mean", [
    ("mnist", (28, 28, 1), (0.1307,)),
    ("cifar10", (32, 32, 3), (0.4914, 0.4822, 0.4465)),
])
def test_tfds_mock(name, shape, mean):
    import tensorflow_datasets as tfds

    real = tfds.data_source
    with tfds.testing.mock_data(num_examples=24), \
            mock.patch.object(tfds, "data_source", wraps=real) as spy:
        src = get_source(f"tfds:{name}")
        assert spy.call_count >= 2
        assert {c.kwargs["split"] for c in spy.call_args_list} == {"train", "test"}
        assert src.info.image_shape == shape and src.info.mean == mean
        assert src.info.num_train == 24 and src.info.num_classes == 10
        a = take(src.train_batches(8, seed=0), 4)
        same_batches(a[3:], take(src.train_batches(8, seed=0, start_step=3), 1))
        assert a[0]["image"].shape == (8, *shape) and a[0]["image"].dtype == np.uint8
        assert a[0]["label"].dtype == np.int32
        evals = list(src.eval_batches(10))
        assert len(evals) == 3 and sum(int(b["mask"].sum()) for b in evals) == 24
        rgb = get_source(f"tfds:{name}", image_shape=(16, 16, 3))
        batch = next(rgb.train_batches(8, seed=0))
        assert batch["image"].shape == (8, 16, 16, 3) and len(rgb.info.mean) == 3


def test_tfds_varying_size_dataset_is_resized_and_carves_test():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=20):
        with pytest.raises(ValueError, match="image_shape"):
            get_source("tfds:cats_vs_dogs")
        src = get_source("tfds:cats_vs_dogs", image_shape=(24, 24, 3))
        assert src.split_names == {"train": "train[:90%]", "test": "train[90%:]"}
        assert src.info.num_classes == 2 and src.info.mean == (0.485, 0.456, 0.406)
        batch = next(src.train_batches(4, seed=0))
        assert batch["image"].shape == (4, 24, 24, 3)


def test_tfds_missing_data_is_one_sentence(tmp_path):
    with pytest.raises(DatasetNotPreparedError) as err:
        get_source("tfds:mnist", data_dir=str(tmp_path))
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert "tfds build mnist --data_dir" in message and str(tmp_path) in message
    assert message.count(". ") == 0 and message.endswith(".") and "\n" not in message
    with pytest.raises(ValueError, match="gs://"):
        get_source("tfds:mnist", data_dir="gs://bucket/tfds")


# --- grain ---

def test_grain_in_process_matches_plain(digits):
    via_grain = get_source("digits", image_shape=(32, 32, 1), use_grain=True)
    same_batches(take(digits.train_batches(64, seed=7, start_step=20, process_index=1,
                                           process_count=2), 5),
                 take(via_grain.train_batches(64, seed=7, start_step=20, process_index=1,
                                              process_count=2), 5))
    same_batches(list(digits.eval_batches(100)), list(via_grain.eval_batches(100)))


def test_grain_tfds_with_one_worker_matches_plain():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=16):
        plain = get_source("tfds:mnist")
        expected = take(plain.train_batches(4, seed=1, start_step=2), 3)
        workers = get_source("tfds:mnist", num_workers=1)
        same_batches(expected, take(workers.train_batches(4, seed=1, start_step=2), 3))
