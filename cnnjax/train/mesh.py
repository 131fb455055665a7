"""The one place that knows the device mesh and how arrays are laid out on it.

Data parallelism the current-JAX way: a 1-D ``Mesh`` over every device of
every process, axis ``"data"``; parameters and optimizer state replicated
(``P()``), batches split along their first axis (``P("data")``). Plain
``jax.jit`` with these shardings inserts the gradient all-reduce itself.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices (all hosts), axis ``"data"``.

    The axis is ``AxisType.Auto`` (the compiler propagates shardings, GSPMD):
    ``jax.make_mesh`` now defaults to ``Explicit`` axes, under which model and
    augmentation code would have to annotate the sharding of every
    intermediate (a ``vmap`` over per-example keys fails there).
    """
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of parameters, optimizer state and scalar metrics: a full copy per device."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: split along the first (example) axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, field: str = "batch_size") -> None:
    """Raises ValueError unless the global batch splits evenly over devices and hosts."""
    devices, processes = jax.device_count(), jax.process_count()
    if batch_size <= 0:
        raise ValueError(f"{field}={batch_size} must be a positive multiple of the device "
                         f"count ({devices}), e.g. --config.{field}={max(devices, 32)}.")
    if batch_size % devices or batch_size % processes:
        fix = max(devices, (batch_size // devices) * devices)
        raise ValueError(f"{field}={batch_size} does not split evenly over {devices} devices; "
                         f"use a multiple of {devices}, e.g. --config.{field}={fix}.")


def global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles the global batch from this process's slice of it (numpy, on host)."""
    sharding = batch_sharding(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for name, value in local_batch.items()}
