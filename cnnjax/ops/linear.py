"""The fully connected layer's product ``x @ kernel``, in the form each backend runs fastest.

XLA:CPU hands its matrix products to YNNPACK, which runs a product with few
rows and a large kernel well below the memory bandwidth the product needs: a
classifier's first layer at a small batch (VGG-16's fc1 at batch 4: 4 x 25088
times 25088 x 4096, 411 MB of kernel for 0.8 GFLOP) took 36-38 ms, where one
pass over the kernel takes 15. Given the rows already transposed, as an
``(in, rows)`` array, the same product contracts the leading axis of both
operands; YNNPACK does not take that form and XLA's own product runs it in
26 ms. ``dense`` writes it so: the transposed rows pass an optimization
barrier, or XLA would fold the transpose back into the product. Differentiated
as it stands, its backward pass is a product XLA:CPU also runs faster than
plain ``x @ kernel``'s (VGG-16's train step at batch 4: x0.95; fc6 of AlexNet
at batch 16 forward x0.65, forward and backward x0.86; experiments/benchmarks/
NOTES.md, attempt 77).

The rule (``DENSE_TRANSPOSED_ROWS_BY_BACKEND``): float32, at most 64 rows, a
kernel of at least 2^24 entries. With more rows or a smaller kernel the plain
product was as fast or faster (128 rows: x1.08-1.18 slower transposed).
``conv2d``'s forward pass over a full window (a fully connected layer written
as a convolution, e.g. a fully convolutional VGG-16's fc1) is this product too.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["dense", "DENSE_TRANSPOSED_ROWS_BY_BACKEND"]

# Backend -> (most rows, fewest kernel entries) for which "auto" contracts the
# transposed rows; absent = never.
DENSE_TRANSPOSED_ROWS_BY_BACKEND = {"cpu": (64, 2**24)}

_IMPLS = ("auto", "xla", "transposed_rows")


def _pick(x, kernel, impl: str) -> str:
    if impl not in _IMPLS:
        raise ValueError(f"dense: impl must be one of {', '.join(_IMPLS)}, got {impl!r}.")
    if impl != "auto":
        return impl
    rule = DENSE_TRANSPOSED_ROWS_BY_BACKEND.get(jax.default_backend())
    if rule is None or x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
        return "xla"
    max_rows, min_entries = rule
    rows = math.prod(x.shape[:-1])
    return "transposed_rows" if rows <= max_rows and kernel.size >= min_entries else "xla"


def dense(x: jax.Array, kernel: jax.Array, impl: str = "auto") -> jax.Array:
    """``x @ kernel`` over the last axis of ``x``; ``kernel`` is ``(in, out)``.

    ``impl``: "xla" (``jnp.matmul``), "transposed_rows" (the product contracting
    the leading axis of the transposed rows and of the kernel) or "auto" (the
    backend's rule above). Both give the same values up to float rounding.
    """
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    if kernel.ndim != 2 or x.ndim < 1 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"dense: x's last axis ({x.shape[-1] if x.ndim else 'none'}) must match the "
            f"kernel's first ({kernel.shape}); the kernel is (in_features, out_features)."
        )
    if _pick(x, kernel, impl) == "xla":
        return jnp.matmul(x, kernel)
    dtype = jnp.result_type(x, kernel)
    rows, kernel = x.reshape(-1, x.shape[-1]).astype(dtype), kernel.astype(dtype)
    y = lax.dot_general(lax.optimization_barrier(rows.T), kernel, (((0,), (0,)), ((), ())))
    return y.reshape(*x.shape[:-1], kernel.shape[-1])
