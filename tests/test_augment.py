"""On-device augmentation: identities, exact geometry, per-example keys, preprocess."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.data import augment


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).random((7, 9, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def square():
    return np.random.default_rng(1).random((8, 8, 2)).astype(np.float32)


KEY = jax.random.key(0)
RANDOM_AFFINE = [augment.rotate, augment.shift, augment.shear, augment.zoom]


@pytest.mark.parametrize("fn", RANDOM_AFFINE)
def test_zero_magnitude_is_exact_identity(fn, image):
    np.testing.assert_array_equal(np.asarray(fn(image, KEY, 0.0)), image)
    # Traced magnitude: no shortcut, the resampling itself is exact.
    np.testing.assert_array_equal(np.asarray(jax.jit(fn)(image, KEY, 0.0)), image)


def test_other_identities(image):
    np.testing.assert_array_equal(augment.flip(image, KEY, horizontal=False), image)
    np.testing.assert_array_equal(augment.random_crop(image, KEY, 0), image)
    np.testing.assert_array_equal(augment.center_crop(image, 0, padding=0), image)
    np.testing.assert_array_equal(augment.normalize(image, [0.0] * 3, [1.0] * 3), image)
    for fn, value in ((augment.rotate_by, 0.0), (augment.shear_by, 0.0), (augment.scale_by, 1.0)):
        np.testing.assert_array_equal(fn(image, value), image)
    np.testing.assert_array_equal(augment.translate(image, 0, 0), image)


def test_flips_reverse_one_axis(image):
    keys = jax.random.split(KEY, 16)
    outs = [np.asarray(augment.flip(image, k, horizontal=True)) for k in keys]
    assert any(np.array_equal(o, image[:, ::-1]) for o in outs)
    assert any(np.array_equal(o, image) for o in outs)
    assert all(np.array_equal(o, image[:, ::-1]) or np.array_equal(o, image) for o in outs)
    outs = [np.asarray(augment.flip(image, k, horizontal=False, vertical=True)) for k in keys]
    assert all(np.array_equal(o, image[::-1]) or np.array_equal(o, image) for o in outs)
    assert any(np.array_equal(o, image[::-1]) for o in outs)


@pytest.mark.parametrize("degrees,k", [(90.0, 1), (-90.0, -1), (180.0, 2), (270.0, 3)])
def test_right_angle_rotation_is_rot90(square, degrees, k):
    np.testing.assert_array_equal(augment.rotate_by(square, degrees), np.rot90(square, k))


@pytest.mark.parametrize("dy,dx", [(2, -1), (-3, 4), (0, 1)])
def test_integer_shift_is_roll_with_fill(image, dy, dx):
    expected = np.roll(image, (dy, dx), axis=(0, 1))
    zeroed = expected.copy()
    rows = slice(0, dy) if dy > 0 else slice(image.shape[0] + dy, None)
    cols = slice(0, dx) if dx > 0 else slice(image.shape[1] + dx, None)
    if dy:
        zeroed[rows] = 0
    if dx:
        zeroed[:, cols] = 0
    got = np.asarray(augment.translate(image, dy, dx, fill_mode="constant"))
    np.testing.assert_array_equal(got, zeroed)
    # "nearest" fills the vacated border with the edge pixels instead.
    near = np.asarray(augment.translate(image, dy, dx, fill_mode="nearest"))
    ys = np.clip(np.arange(image.shape[0]) - dy, 0, image.shape[0] - 1)
    xs = np.clip(np.arange(image.shape[1]) - dx, 0, image.shape[1] - 1)
    np.testing.assert_array_equal(near, image[ys][:, xs])


def test_random_transforms_shape_dtype_jit_and_determinism(image):
    for fn, magnitude in zip(RANDOM_AFFINE, (30.0, 0.2, 20.0, 0.3), strict=True):
        out = jax.jit(fn)(image, KEY, magnitude)
        assert out.shape == image.shape and out.dtype == jnp.float32
        np.testing.assert_array_equal(out, jax.jit(fn)(image, KEY, magnitude))
        # Eager and jitted differ at most by float rounding (XLA fuses differently).
        np.testing.assert_allclose(out, fn(image, KEY, magnitude), atol=1e-6)
        assert not np.array_equal(np.asarray(out), image)
    crop = jax.jit(augment.random_crop, static_argnums=2, static_argnames="padding")
    out = crop(image, KEY, 5, padding=2)
    assert out.shape == (5, 5, 3)


def test_per_example_keys_differ(image):
    batch = jnp.stack([image] * 4)
    keys = jax.random.split(KEY, 4)
    out = np.asarray(jax.vmap(lambda x, k: augment.rotate(x, k, 40.0))(batch, keys))
    assert len({o.tobytes() for o in out}) == 4
    np.testing.assert_array_equal(out[2], augment.rotate(image, keys[2], 40.0))


def test_random_crop_of_padding_is_a_window(image):
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
    out = np.asarray(augment.random_crop(image, jax.random.key(3), 7, padding=2))
    windows = [padded[i:i + 7, j:j + 7] for i in range(5) for j in range(7)]
    assert any(np.array_equal(out, w) for w in windows)


# --- preprocess ---

FULL = {"rotation": 15.0, "shift": 0.1, "hflip": True, "vflip": False, "shear": 10.0,
        "zoom": 0.1, "crop": 0, "crop_padding": 0, "fill_mode": "nearest", "normalize": True}


def test_default_config_is_identity_and_normalizes():
    images = np.random.default_rng(2).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    cfg = augment.default_config()
    outs = [augment.preprocess(images, KEY, train=train, config=cfg, mean=mean, std=std)
            for train in (True, False)]
    np.testing.assert_array_equal(outs[0], outs[1])  # zero augmentation is exact
    expected = (images.astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std)
    assert outs[0].dtype == jnp.float32 and outs[0].shape == images.shape
    np.testing.assert_allclose(outs[0], expected, rtol=1e-6, atol=1e-6)
    cfg.normalize = False
    out = augment.preprocess(images, KEY, train=True, config=cfg)
    np.testing.assert_allclose(out, images.astype(np.float32) / 255.0, rtol=1e-6)


@pytest.mark.parametrize("impl", ["auto", "table", "convert"])
def test_unit_scale_is_pixels_over_255_for_every_uint8_value(impl):
    pixels = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
    exact = (pixels.astype(np.float64) / 255.0).astype(np.float32)  # rounded once
    out = np.asarray(jax.jit(lambda x: augment.unit_scale(x, impl))(pixels))
    assert out.dtype == np.float32 and out.shape == pixels.shape
    rule = augment.UNIT_SCALE_IMPL_BY_BACKEND[jax.default_backend()]
    if impl == "table" or (impl == "auto" and rule == "table"):
        np.testing.assert_array_equal(out, exact)
    else:  # a division XLA may turn into a product with 1/255: within one rounding
        np.testing.assert_array_max_ulp(out, exact, maxulp=1)
    assert out[0, 0, 0, 0] == 0.0 and out[-1, -1, -1, 0] == 1.0


def test_unit_scale_of_floats_and_a_bad_impl():
    floats = np.array([[0.0, 127.5, 255.0]], np.float32)
    np.testing.assert_allclose(augment.unit_scale(floats, "table"), [[0.0, 0.5, 1.0]], rtol=1e-7)
    with pytest.raises(ValueError, match="impl 'lut' is unknown"):
        augment.unit_scale(floats, "lut")


def test_preprocess_jit_per_example_and_labels_untouched():
    from cnnjax.data import get_source

    source = get_source("synthetic", image_shape=(12, 12, 3), num_train=16, num_test=4)
    batch = next(source.train_batches(8, seed=0))
    labels = batch["label"].copy()
    batch = {**batch, "image": np.repeat(batch["image"][:1], 8, axis=0)}

    @jax.jit
    def step(b, key):
        x = augment.preprocess(b["image"], key, train=True, config=FULL,
                               mean=source.info.mean, std=source.info.std)
        return x, b["label"]

    x, y = step(batch, KEY)
    assert x.shape == (8, 12, 12, 3) and x.dtype == jnp.float32
    np.testing.assert_array_equal(y, labels)
    assert len({np.asarray(r).tobytes() for r in x}) == 8  # same image, different transforms
    x2, _ = step(batch, KEY)
    np.testing.assert_array_equal(x, x2)
    x3, _ = step(batch, jax.random.key(1))
    assert not np.array_equal(x, x3)


def test_preprocess_crop_train_random_eval_center():
    images = np.random.default_rng(3).integers(0, 256, (4, 10, 10, 1), dtype=np.uint8)
    cfg = {"crop": 8, "crop_padding": 1, "normalize": False}
    train = augment.preprocess(images, KEY, train=True, config=cfg)
    evals = augment.preprocess(images, KEY, train=False, config=cfg)
    assert train.shape == evals.shape == (4, 8, 8, 1)
    np.testing.assert_allclose(evals, images[:, 1:9, 1:9].astype(np.float32) / 255.0,
                               rtol=1e-6)
    plain = augment.preprocess(images, KEY, train=False, config={"normalize": False})
    np.testing.assert_array_equal(evals, plain[:, 1:9, 1:9])
    windows = [np.pad(plain, ((0, 0), (1, 1), (1, 1), (0, 0)))[:, i:i + 8, j:j + 8]
               for i in range(5) for j in range(5)]
    for n in range(4):
        assert any(np.array_equal(train[n], w[n]) for w in windows)


def test_bad_config_is_one_sentence():
    images = np.zeros((2, 8, 8, 1), np.uint8)
    with pytest.raises(ValueError, match="unknown augmentation fields"):
        augment.preprocess(images, KEY, train=True, config={"rotate": 10}, mean=(0,), std=(1,))
    with pytest.raises(ValueError, match="config.rotation=-5"):
        augment.preprocess(images, KEY, train=True, config={"rotation": -5}, mean=(0,), std=(1,))
    with pytest.raises(ValueError, match="fill_mode"):
        augment.preprocess(images, KEY, train=True, config={"fill_mode": "edge"}, mean=(0,),
                           std=(1,))
    with pytest.raises(ValueError, match="crop=9"):
        augment.preprocess(images, KEY, train=True, config={"crop": 9}, mean=(0,), std=(1,))
    with pytest.raises(ValueError, match="mean and std"):
        augment.preprocess(images, KEY, train=True, config={})
