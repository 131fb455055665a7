"""On-device data augmentation: pure, jittable, one key per example.

The lecture's transformations (rotation, shifting, flipping, shearing,
zooming) plus random crop and mean/std normalization. Each random function
takes ONE image (H, W, C float) and its own key, so ``jax.vmap`` applies it to
a batch with per-example keys; each has a magnitude whose zero is the exact
identity. Labels are never touched.

Geometry (rows grow downwards, the center is ((H-1)/2, (W-1)/2)):

- ``rotate_by(image, degrees)``: counter-clockwise as displayed, so 90 degrees
  of a square image is ``np.rot90(image, 1)``.
- ``translate(image, dy, dx)``: content moves down by dy and right by dx
  pixels, so integer shifts equal ``np.roll`` with the vacated border filled.
- ``shear_by(image, degrees)``: horizontal shear; the row at offset y from the
  center moves right by tan(degrees) * y.
- ``scale_by(image, factor)``: isotropic zoom about the center; factor > 1
  enlarges (zooms in).

Resampling is bilinear (``jax.scipy.ndimage.map_coordinates``, order 1).
Sample coordinates within 1e-4 of a grid point are snapped to it, so
grid-aligned transforms (identity, integer shifts, multiples of 90 degrees on
square images) copy pixels exactly. Points that fall outside the image are
filled by ``fill_mode``: "nearest" (default, like Keras' ImageDataGenerator:
repeat the edge pixel), "constant" (0 on the [0, 1] scale, i.e. black),
"reflect", "mirror" or "wrap".

``preprocess`` composes rotation, shear and zoom (about the center) and the
shift into ONE affine resampling per example, then flips, then the crop, then
normalization.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

FILL_MODES = ("nearest", "constant", "reflect", "mirror", "wrap")
_SNAP = 1e-4


class AugmentConfigError(ValueError):
    """A bad augmentation setting: one sentence naming the field and the fix."""


def default_config() -> ml_collections.ConfigDict:
    """All augmentation fields at the identity (normalization on)."""
    return ml_collections.ConfigDict({
        "rotation": 0.0,      # max degrees, angle ~ U(-rotation, rotation)
        "shift": 0.0,         # max fraction of height/width
        "hflip": False,       # flip left-right with probability 1/2
        "vflip": False,       # flip up-down with probability 1/2
        "shear": 0.0,         # max degrees
        "zoom": 0.0,          # scale ~ U(1 - zoom, 1 + zoom)
        "crop": 0,            # random crop of this size (0 = none); eval takes the center
        "crop_padding": 0,    # zero padding on each side before cropping
        "fill_mode": "nearest",
        "normalize": True,    # (x - mean) / std
    })


# --- the affine resampler ---

def affine_transform(image: jax.Array, matrix, offset=(0.0, 0.0), *,
                     fill_mode: str = "nearest") -> jax.Array:
    """Resamples ``image`` (H, W, C): output pixel p reads input at c + matrix @ (p - c) + offset.

    ``matrix`` (2, 2) and ``offset`` (2,) are in (row, col) order; c is the
    image center. Bilinear, with grid snapping and ``fill_mode`` (module doc).
    """
    _check_fill(fill_mode)
    image = jnp.asarray(image)
    h, w = image.shape[:2]
    center = jnp.array([(h - 1) / 2.0, (w - 1) / 2.0], jnp.float32)
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                              jnp.arange(w, dtype=jnp.float32), indexing="ij")
    rel = jnp.stack([rows, cols]) - center[:, None, None]
    matrix = jnp.asarray(matrix, jnp.float32)
    coords = jnp.einsum("ij,jhw->ihw", matrix, rel)
    coords = coords + center[:, None, None] + jnp.asarray(offset, jnp.float32)[:, None, None]
    nearest = jnp.round(coords)
    coords = jnp.where(jnp.abs(coords - nearest) < _SNAP, nearest, coords)

    def one_channel(plane):
        return jax.scipy.ndimage.map_coordinates(
            plane, [coords[0], coords[1]], order=1, mode=fill_mode, cval=0.0)

    out = jax.vmap(one_channel, in_axes=-1, out_axes=-1)(image.astype(jnp.float32))
    return out.astype(image.dtype) if jnp.issubdtype(image.dtype, jnp.floating) else out


def rotation_matrix(degrees):
    """Output->input map of a counter-clockwise rotation by ``degrees`` (row, col order)."""
    t = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
    c, s = jnp.cos(t), jnp.sin(t)
    return jnp.array([[c, s], [-s, c]])


def shear_matrix(degrees):
    """Output->input map of a horizontal shear by ``degrees``."""
    k = jnp.tan(jnp.deg2rad(jnp.asarray(degrees, jnp.float32)))
    return jnp.array([[1.0, 0.0], [-k, 1.0]])


def zoom_matrix(factor):
    """Output->input map of an isotropic zoom by ``factor`` (> 1 enlarges)."""
    inv = 1.0 / jnp.asarray(factor, jnp.float32)
    return jnp.array([[inv, 0.0], [0.0, inv]])


# --- deterministic transforms of one image ---

def rotate_by(image, degrees, *, fill_mode: str = "nearest"):
    return affine_transform(image, rotation_matrix(degrees), fill_mode=fill_mode)


def translate(image, dy, dx, *, fill_mode: str = "nearest"):
    offset = -jnp.stack([jnp.asarray(dy, jnp.float32), jnp.asarray(dx, jnp.float32)])
    return affine_transform(image, jnp.eye(2), offset, fill_mode=fill_mode)


def shear_by(image, degrees, *, fill_mode: str = "nearest"):
    return affine_transform(image, shear_matrix(degrees), fill_mode=fill_mode)


def scale_by(image, factor, *, fill_mode: str = "nearest"):
    return affine_transform(image, zoom_matrix(factor), fill_mode=fill_mode)


# --- random transforms of one image (magnitude 0 = identity) ---

def _is_zero(value) -> bool:
    return isinstance(value, (int, float, np.number, bool)) and float(value) == 0.0


def _symmetric(key, magnitude):
    return jax.random.uniform(key, (), jnp.float32, -1.0, 1.0) * magnitude


def rotate(image, key, max_degrees, *, fill_mode: str = "nearest"):
    """Rotation by an angle ~ U(-max_degrees, max_degrees)."""
    if _is_zero(max_degrees):
        return image
    return rotate_by(image, _symmetric(key, max_degrees), fill_mode=fill_mode)


def shift(image, key, max_fraction, *, fill_mode: str = "nearest"):
    """Translation by dy ~ U(-f, f) * H and dx ~ U(-f, f) * W pixels (continuous)."""
    if _is_zero(max_fraction):
        return image
    h, w = image.shape[:2]
    ky, kx = jax.random.split(key)
    return translate(image, _symmetric(ky, max_fraction) * h, _symmetric(kx, max_fraction) * w,
                     fill_mode=fill_mode)


def flip(image, key, *, horizontal: bool = True, vertical: bool = False):
    """Left-right (``horizontal``) and/or up-down (``vertical``) flip, each with probability 1/2."""
    kh, kv = jax.random.split(key)
    if horizontal:
        image = jnp.where(jax.random.bernoulli(kh), jnp.flip(image, axis=1), image)
    if vertical:
        image = jnp.where(jax.random.bernoulli(kv), jnp.flip(image, axis=0), image)
    return image


def shear(image, key, max_degrees, *, fill_mode: str = "nearest"):
    """Horizontal shear by an angle ~ U(-max_degrees, max_degrees)."""
    if _is_zero(max_degrees):
        return image
    return shear_by(image, _symmetric(key, max_degrees), fill_mode=fill_mode)


def zoom(image, key, max_fraction, *, fill_mode: str = "nearest"):
    """Isotropic zoom by a factor ~ U(1 - max_fraction, 1 + max_fraction)."""
    if _is_zero(max_fraction):
        return image
    return scale_by(image, 1.0 + _symmetric(key, max_fraction), fill_mode=fill_mode)


def _pad(image, padding: int):
    if padding == 0:
        return image
    return jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))


def random_crop(image, key, size: int, *, padding: int = 0):
    """Zero-pads ``padding`` pixels per side, then crops a random ``size`` x ``size`` window.

    ``size=0`` keeps the image's own height and width (then ``padding=0`` is the
    identity). ``size`` and ``padding`` are static Python ints.
    """
    h, w = image.shape[:2]
    size_h, size_w = _crop_size(size, padding, h, w)
    image = _pad(image, padding)
    if size_h == image.shape[0] and size_w == image.shape[1]:
        return image
    ky, kx = jax.random.split(key)
    top = jax.random.randint(ky, (), 0, image.shape[0] - size_h + 1)
    left = jax.random.randint(kx, (), 0, image.shape[1] - size_w + 1)
    return jax.lax.dynamic_slice(image, (top, left, 0), (size_h, size_w, image.shape[2]))


def center_crop(image, size: int, *, padding: int = 0):
    """The deterministic (evaluation) counterpart of ``random_crop``: the central window."""
    h, w = image.shape[:2]
    size_h, size_w = _crop_size(size, padding, h, w)
    image = _pad(image, padding)
    top, left = (image.shape[0] - size_h) // 2, (image.shape[1] - size_w) // 2
    return image[top:top + size_h, left:left + size_w]


def _crop_size(size, padding, h, w):
    if int(size) != size or int(padding) != padding or size < 0 or padding < 0:
        raise AugmentConfigError(
            f"crop={size!r}, crop_padding={padding!r} must be integers >= 0.")
    size_h, size_w = (size, size) if size else (h, w)
    if size_h > h + 2 * padding or size_w > w + 2 * padding:
        raise AugmentConfigError(
            f"crop={size} is larger than the padded image ({h + 2 * padding}x"
            f"{w + 2 * padding}); use crop <= {min(h, w) + 2 * padding} or more crop_padding.")
    return int(size_h), int(size_w)


def normalize(image, mean, std):
    """(image - mean) / std with per-channel ``mean`` and ``std`` (broadcast over the last axis)."""
    return (image - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# --- the batch entry point ---

def _read_config(config) -> dict:
    defaults = default_config().to_dict()
    if config is None:
        return defaults
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise AugmentConfigError(
            f"config={config!r} must be a dict or ml_collections.ConfigDict of augmentation "
            "fields (see augment.default_config()).")
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise AugmentConfigError(
            f"config has unknown augmentation fields {unknown}; use {sorted(defaults)}.")
    merged = {**defaults, **{k: v for k, v in config.items() if v is not None}}
    for field in ("rotation", "shift", "shear", "zoom", "crop", "crop_padding"):
        value = merged[field]
        if not isinstance(value, (int, float, np.number)) or value < 0:
            raise AugmentConfigError(
                f"config.{field}={value!r} must be a number >= 0 (0 = off).")
    if merged["zoom"] >= 1:
        raise AugmentConfigError(
            f"config.zoom={merged['zoom']} must be below 1 (scale in [1 - zoom, 1 + zoom]).")
    _check_fill(merged["fill_mode"])
    return merged


def _check_fill(fill_mode):
    if fill_mode not in FILL_MODES:
        raise AugmentConfigError(f"fill_mode={fill_mode!r} is not known; use one of {FILL_MODES}.")


def _augment_one(image, key, cfg):
    """All configured random transforms of one image with its own key."""
    h, w = image.shape[:2]
    k_rot, k_shift, k_shear, k_zoom, k_flip, k_crop = (
        jax.random.fold_in(key, i) for i in range(6))
    if any(cfg[f] for f in ("rotation", "shift", "shear", "zoom")):
        matrix = jnp.eye(2)
        if cfg["rotation"]:
            matrix = matrix @ rotation_matrix(_symmetric(k_rot, cfg["rotation"]))
        if cfg["shear"]:
            matrix = matrix @ shear_matrix(_symmetric(k_shear, cfg["shear"]))
        if cfg["zoom"]:
            matrix = matrix @ zoom_matrix(1.0 + _symmetric(k_zoom, cfg["zoom"]))
        offset = jnp.zeros(2)
        if cfg["shift"]:
            ky, kx = jax.random.split(k_shift)
            offset = -jnp.stack([_symmetric(ky, cfg["shift"]) * h,
                                 _symmetric(kx, cfg["shift"]) * w])
            # The shift happens after the other transforms: undo it first.
            offset = matrix @ offset
        image = affine_transform(image, matrix, offset, fill_mode=cfg["fill_mode"])
    if cfg["hflip"] or cfg["vflip"]:
        image = flip(image, k_flip, horizontal=bool(cfg["hflip"]), vertical=bool(cfg["vflip"]))
    if cfg["crop"] or cfg["crop_padding"]:
        image = random_crop(image, k_crop, int(cfg["crop"]), padding=int(cfg["crop_padding"]))
    return image


# uint8 pixels -> [0, 1] by a 256-entry table on the CPU ("table") instead of a
# conversion ("convert"). XLA:CPU fuses the conversion into every consumer
# (LeNet-5's 25 patch-row slices), and LLVM at XLA's default -O3 spends 0.1-0.2 s
# compiling each such loop over uint8 loads: 2.5 of the 4.5 s that LeNet-5's
# train step took to compile. A gather from the table compiles in milliseconds
# and runs as fast (NOTES.md, attempt 41). Accelerators gather slowly: they convert.
UNIT_SCALE_IMPL_BY_BACKEND = {"cpu": "table", "gpu": "convert", "tpu": "convert"}
_UNIT_TABLE = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)  # rounded once


def unit_scale(images, impl: str = "auto"):
    """Pixels on the [0, 1] scale in float32: ``images / 255``, jittable.

    ``impl`` is "auto" (the backend's rule), "table" (uint8 only: a lookup of
    i / 255 rounded to float32) or "convert" (a float32 conversion and a division).
    """
    if impl not in ("auto", "table", "convert"):
        raise ValueError(f"impl {impl!r} is unknown; use 'auto', 'table' or 'convert'.")
    images = jnp.asarray(images)
    if impl == "auto":
        impl = UNIT_SCALE_IMPL_BY_BACKEND.get(jax.default_backend(), "convert")
    if impl == "table" and images.dtype == jnp.uint8:
        return jnp.take(_UNIT_TABLE, images.astype(jnp.int32), mode="clip")
    return images.astype(jnp.float32) / 255.0


def preprocess(images, key, *, train: bool, config=None,
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
    """uint8 images (B, H, W, C) -> float32 model input, on device and jittable.

    x = images / 255; then, when ``train``, the configured augmentations with
    per-example keys ``jax.random.split(key, B)``; when not training, only the
    deterministic part (a center crop of the same size if ``crop`` is set);
    then (x - mean) / std if ``config.normalize``. ``config`` holds Python
    values (close over it; do not pass it as a traced argument). ``key`` is
    unused when ``train`` is False.
    """
    cfg = _read_config(config)
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise AugmentConfigError(
            f"images of shape {images.shape} must be a batch (B, H, W, C).")
    x = unit_scale(images)
    if train:
        keys = jax.random.split(key, x.shape[0])
        x = jax.vmap(lambda im, k: _augment_one(im, k, cfg))(x, keys)
    elif cfg["crop"] or cfg["crop_padding"]:
        x = jax.vmap(lambda im: center_crop(im, int(cfg["crop"]),
                                            padding=int(cfg["crop_padding"])))(x)
    if cfg["normalize"]:
        if mean is None or std is None:
            raise AugmentConfigError(
                "mean and std are required when config.normalize is True; pass "
                "source.info.mean and source.info.std, or set normalize=False.")
        x = normalize(x, mean, std)
    return x


__all__ = [
    "AugmentConfigError", "FILL_MODES", "affine_transform", "center_crop", "default_config",
    "flip", "normalize", "preprocess", "random_crop", "rotate", "rotate_by", "rotation_matrix",
    "scale_by", "shear", "shear_by", "shear_matrix", "shift", "translate", "unit_scale",
    "zoom", "zoom_matrix",
]
