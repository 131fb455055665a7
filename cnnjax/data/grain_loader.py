"""grain pipelines over a source, with the same pure (seed, step) order as the plain path.

The pipeline is a ``grain.MapDataset`` over global step numbers; a ``Map``
turns step ``s`` into this process's batch of step ``s`` (the indices come
from ``Source.train_indices``, so ordering, resuming and per-host sharding are
exactly those of the plain loader). With ``num_workers > 0`` the batches are
assembled (read + decode + resize) in that many worker processes by
``mp_prefetch``, which keeps the order. The iterator's state is just the step:
resume by passing ``start_step``.

Worker processes import this module to unpickle the transforms, so they live
here (not in ``__main__``); a script that starts workers needs an
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import numpy as np

# Far more steps than any run takes; MapDataset.range is lazy.
_MANY_STEPS = 2**40


class TrainBatchAtStep(grain.transforms.Map):
    """Global step -> this process's train batch dict."""

    def __init__(self, source, global_batch_size, seed, process_index, process_count):
        self.source = source
        self.args = (global_batch_size, seed, process_index, process_count)

    def map(self, step):
        global_batch_size, seed, process_index, process_count = self.args
        indices = self.source.train_indices(
            global_batch_size, step, seed=seed, process_index=process_index,
            process_count=process_count,
        )
        return self.source.make_batch("train", indices)


class EvalBatchAt(grain.transforms.Map):
    """Eval batch number -> this process's (padded) eval batch dict."""

    def __init__(self, source, global_batch_size, split, process_index, process_count):
        self.source = source
        self.args = (global_batch_size, split, process_index, process_count)

    def map(self, batch):
        global_batch_size, split, process_index, process_count = self.args
        indices = self.source.eval_indices(
            global_batch_size, batch, split=split, process_index=process_index,
            process_count=process_count,
        )
        return self.source.make_batch(split, indices)


def _ensure_absl_flags():
    # grain's worker processes read absl flags; a program that never ran
    # absl.app (pytest, a notebook, our argparse CLI) has not parsed them, so
    # take the defaults rather than fail with UnparsedFlagAccessError.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _run(dataset: grain.MapDataset, num_workers: int) -> Iterator[dict[str, np.ndarray]]:
    iter_ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    if num_workers > 0:
        _ensure_absl_flags()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(iter_ds)


def train_batches(source, global_batch_size, *, seed, start_step=0, process_index=0,
                  process_count=1, num_workers=0):
    steps = grain.MapDataset.range(start_step, start_step + _MANY_STEPS)
    return _run(steps.map(TrainBatchAtStep(
        source, global_batch_size, seed, process_index, process_count)), num_workers)


def eval_batches(source, global_batch_size, *, split="test", process_index=0, process_count=1,
                 num_workers=0):
    batches = grain.MapDataset.range(source.num_eval_batches(global_batch_size, split))
    return _run(batches.map(EvalBatchAt(
        source, global_batch_size, split, process_index, process_count)), num_workers)
