"""Pure jax.lax kernels: convolution, dense product, local response normalization, pooling, tanh.

No Flax, no state: every function maps arrays (and static hyperparameters) to
arrays and works under ``jit``, ``grad`` and ``vmap``.
"""

from cnnjax.ops.activations import tanh
from cnnjax.ops.conv import conv2d
from cnnjax.ops.linear import dense
from cnnjax.ops.normalization import local_response_norm
from cnnjax.ops.pooling import avg_pool, global_avg_pool, global_max_pool, l2_pool, max_pool

__all__ = [
    "conv2d",
    "dense",
    "local_response_norm",
    "max_pool",
    "avg_pool",
    "l2_pool",
    "global_avg_pool",
    "global_max_pool",
    "tanh",
]
