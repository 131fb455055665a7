"""The source interface shared by every dataset, and its pure batch ordering.

A source knows how to fetch examples by index from two splits, ``"train"`` and
``"test"``; this module turns that into batches whose content is a pure
function of ``(seed, step)``:

    steps_per_epoch = num_train // global_batch_size      (remainder dropped)
    epoch           = step // steps_per_epoch
    permutation     = numpy PCG64 seeded with SeedSequence([seed, epoch])
    global batch    = permutation[(step % steps_per_epoch) * B : ... + B]
    process slice   = global batch[process_index * b : (process_index + 1) * b]

so a run resumed at any step, or split over any number of processes, reads
exactly the same examples in the same order.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Iterator, Sequence

import numpy as np

SPLITS = ("train", "test")


class DataConfigError(ValueError):
    """A bad data argument: one sentence naming the argument and the fix."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a trainer need to know about a source.

    ``image_shape`` is the (H, W, C) of the images the source yields (after any
    resizing); ``mean`` and ``std`` are per-channel statistics on the [0, 1]
    scale (pixel / 255), one entry per channel of ``image_shape``.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    num_train: int
    num_test: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None = None


@functools.lru_cache(maxsize=4)
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of the train split in ``epoch``: a pure function of (seed, epoch).

    Cached (read-only), so the steps of one epoch share one permutation instead
    of recomputing it per batch.
    """
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)])))
    order = rng.permutation(int(num_examples))
    order.flags.writeable = False
    return order


def check_process(global_batch_size: int, process_index: int, process_count: int) -> int:
    """Validates the process split and returns the per-process batch size."""
    if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size < 1:
        raise DataConfigError(
            f"global_batch_size={global_batch_size!r} must be a positive integer."
        )
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataConfigError(
            f"process_index={process_index} with process_count={process_count} is invalid; "
            "use 0 <= process_index < process_count."
        )
    if global_batch_size % process_count:
        raise DataConfigError(
            f"global_batch_size={global_batch_size} is not divisible by "
            f"process_count={process_count}; use a multiple of {process_count}."
        )
    return global_batch_size // process_count


class Source(abc.ABC):
    """Base class: subclasses set ``info`` and implement ``fetch``."""

    info: DatasetInfo

    @abc.abstractmethod
    def fetch(self, split: str, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 (n, H, W, C) and labels int32 (n,) of ``indices`` in ``split``."""

    # Options that only matter to some sources; grain reads num_workers.
    num_workers: int = 0

    def split_size(self, split: str) -> int:
        if split == "train":
            return self.info.num_train
        if split == "test":
            return self.info.num_test
        raise DataConfigError(
            f"split={split!r} is not a split of this source; use one of {SPLITS}."
        )

    def steps_per_epoch(self, global_batch_size: int) -> int:
        """Number of full global batches in the train split (remainder dropped)."""
        check_process(global_batch_size, 0, 1)
        steps = self.info.num_train // global_batch_size
        if steps < 1:
            raise DataConfigError(
                f"global_batch_size={global_batch_size} is larger than the "
                f"{self.info.num_train} training examples of {self.info.name}; "
                f"use at most {self.info.num_train}."
            )
        return steps

    # --- index plans (pure functions; shared by the plain and the grain loaders) ---

    def train_indices(
        self, global_batch_size: int, step: int, *, seed: int, process_index: int = 0,
        process_count: int = 1,
    ) -> np.ndarray:
        """Train-split indices this process reads at global ``step``."""
        b = check_process(global_batch_size, process_index, process_count)
        spe = self.steps_per_epoch(global_batch_size)
        epoch, position = divmod(int(step), spe)
        order = epoch_permutation(self.info.num_train, seed, epoch)
        start = position * global_batch_size + process_index * b
        return order[start:start + b]

    def num_eval_batches(self, global_batch_size: int, split: str = "test") -> int:
        return -(-self.split_size(split) // global_batch_size)

    def eval_indices(
        self, global_batch_size: int, batch: int, *, split: str = "test", process_index: int = 0,
        process_count: int = 1,
    ) -> np.ndarray:
        """Indices (-1 = padding) this process reads for eval batch number ``batch``."""
        b = check_process(global_batch_size, process_index, process_count)
        start = batch * global_batch_size + process_index * b
        positions = np.arange(start, start + b)
        return np.where(positions < self.split_size(split), positions, -1)

    def make_batch(self, split: str, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The batch dict for ``indices``; entries < 0 become zero rows with mask False."""
        mask = indices >= 0
        h, w, c = self.info.image_shape
        images = np.zeros((len(indices), h, w, c), np.uint8)
        labels = np.zeros((len(indices),), np.int32)
        if mask.any():
            got_images, got_labels = self.fetch(split, indices[mask])
            images[mask] = got_images
            labels[mask] = got_labels
        return {"image": images, "label": labels, "mask": mask}

    # --- the interface the trainer uses ---

    def train_batches(
        self, global_batch_size: int, *, seed: int, start_step: int = 0, process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Infinite train batches; the k-th one is global step ``start_step + k``."""
        check_process(global_batch_size, process_index, process_count)
        self.steps_per_epoch(global_batch_size)
        if start_step < 0:
            raise DataConfigError(f"start_step={start_step} must be >= 0.")
        if self.num_workers > 0 or getattr(self, "use_grain", False):
            from cnnjax.data import grain_loader

            return grain_loader.train_batches(
                self, global_batch_size, seed=seed, start_step=start_step,
                process_index=process_index, process_count=process_count,
                num_workers=self.num_workers,
            )
        return self._plain_train(global_batch_size, seed, start_step, process_index, process_count)

    def _plain_train(self, global_batch_size, seed, start_step, process_index, process_count):
        step = start_step
        while True:
            idx = self.train_indices(
                global_batch_size, step, seed=seed, process_index=process_index,
                process_count=process_count,
            )
            yield self.make_batch("train", idx)
            step += 1

    def eval_batches(
        self, global_batch_size: int, *, split: str = "test", process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Finite batches covering ``split`` once in order; the last is padded (mask False)."""
        check_process(global_batch_size, process_index, process_count)
        self.split_size(split)
        if self.num_workers > 0 or getattr(self, "use_grain", False):
            from cnnjax.data import grain_loader

            return grain_loader.eval_batches(
                self, global_batch_size, split=split, process_index=process_index,
                process_count=process_count, num_workers=self.num_workers,
            )
        return self._plain_eval(global_batch_size, split, process_index, process_count)

    def _plain_eval(self, global_batch_size, split, process_index, process_count):
        for batch in range(self.num_eval_batches(global_batch_size, split)):
            idx = self.eval_indices(
                global_batch_size, batch, split=split, process_index=process_index,
                process_count=process_count,
            )
            yield self.make_batch(split, idx)


# --- host-side image conversion, used once per example by every source ---

FITS = ("resize", "pad")


def convert_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """HWC uint8 to ``channels``: gray -> RGB repeats, RGB -> gray uses ITU-R 601 luma."""
    have = image.shape[-1]
    if have == channels:
        return image
    if have == 1:
        return np.repeat(image, channels, axis=-1)
    if have == 3 and channels == 1:
        luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
    raise DataConfigError(
        f"image_shape: cannot convert {have} channels to {channels}; use 1 or 3 channels."
    )


def convert_stats(values: Sequence[float], channels: int) -> tuple[float, ...]:
    """Per-channel mean/std following ``convert_channels`` (repeat, or a luma average)."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if len(values) == 3 and channels == 1:
        return (0.299 * values[0] + 0.587 * values[1] + 0.114 * values[2],)
    raise DataConfigError(f"image_shape: cannot convert {len(values)} channels to {channels}.")


def fit_image(image: np.ndarray, size: tuple[int, int], fit: str = "resize") -> np.ndarray:
    """Brings one HWC uint8 image to spatial ``size`` on the host.

    ``fit="resize"``: scale so the shorter side matches, bilinear (Pillow, which
    antialiases when shrinking), then center-crop the longer side; a square
    image is simply resized. ``fit="pad"``: center zero-pad (or center-crop)
    without interpolation, as LeNet-5 put 28x28 MNIST into a 32x32 field.
    """
    h, w = image.shape[:2]
    th, tw = size
    if (h, w) == (th, tw):
        return image
    if fit == "pad":
        return _center_pad_crop(image, th, tw)
    if fit != "resize":
        raise DataConfigError(f"fit={fit!r} is not known; use one of {FITS}.")
    from PIL import Image

    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    channels = [
        np.asarray(Image.fromarray(image[..., c]).resize((nw, nh), Image.Resampling.BILINEAR))
        for c in range(image.shape[-1])
    ]
    resized = np.stack(channels, axis=-1)
    return _center_pad_crop(resized, th, tw)


def _center_pad_crop(image: np.ndarray, th: int, tw: int) -> np.ndarray:
    h, w = image.shape[:2]
    top, left = (h - th) // 2, (w - tw) // 2
    if top > 0:
        image = image[top:top + th]
    if left > 0:
        image = image[:, left:left + tw]
    h, w = image.shape[:2]
    pad_h, pad_w = th - h, tw - w
    if pad_h > 0 or pad_w > 0:
        image = np.pad(
            image,
            ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)),
        )
    return image


def check_image_shape(image_shape) -> tuple[int, int, int] | None:
    if image_shape is None:
        return None
    try:
        shape = tuple(int(d) for d in image_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1 or shape[2] not in (1, 3):
        raise DataConfigError(
            f"image_shape={image_shape!r} must be (height, width, channels) with positive "
            "sizes and 1 or 3 channels, e.g. (32, 32, 1)."
        )
    return shape
