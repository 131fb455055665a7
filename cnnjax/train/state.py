"""The train state: everything a step reads and writes, as one pytree."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    """Parameters, optimizer state, step counter and base RNG key.

    ``step`` is an int32 scalar array (the number of updates done so far) and
    ``rng`` a raw ``uint32[2]`` key: every random draw of step ``s`` derives
    from ``fold_in(rng, s)``, so a run resumed at step ``s`` draws the same
    numbers as one that never stopped. The optimizer (an optax
    ``GradientTransformation``) is not part of the state; the steps close
    over it, so the state is a plain pytree of arrays that orbax saves as is.
    """

    step: jax.Array
    params: Any
    opt_state: optax.OptState
    rng: jax.Array


def step_keys(rng: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The (augmentation, dropout) keys of ``step``: a pure function of (seed, step)."""
    augment_key, dropout_key = jax.random.split(jax.random.fold_in(rng, step))
    return augment_key, dropout_key


def create_state(model, tx: optax.GradientTransformation, rng: jax.Array,
                 image_shape: tuple[int, int, int]) -> TrainState:
    """Initializes a TrainState; meant to run under ``jax.jit`` (see loop.py)."""
    params_key, state_key = jax.random.split(rng)
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    variables = model.init({"params": params_key, "dropout": params_key}, dummy, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=state_key)


def count_params(params: Any) -> int:
    """Total number of parameters (works on arrays and ShapeDtypeStructs)."""
    total = 0
    for leaf in jax.tree.leaves(params):
        size = 1
        for dim in leaf.shape:
            size *= dim
        total += size
    return total
