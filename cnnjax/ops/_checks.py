"""Argument checks shared by the kernels: one clear ValueError instead of an XLA error."""

from __future__ import annotations

import jax.numpy as jnp


def check_nhwc(x, name: str = "x", op: str = "op") -> None:
    if getattr(x, "ndim", None) != 4:
        shape = getattr(x, "shape", None)
        raise ValueError(
            f"{op}: {name} must be a 4-D NHWC array (batch, height, width, channels), "
            f"got shape {shape}; add a batch axis with x[None] or use jax.vmap."
        )


def compute_dtype(*arrays):
    """The common floating dtype of the inputs (integers promote to float32)."""
    dtype = jnp.result_type(*arrays)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    return dtype
