"""Keras-style model summaries: layer, output shape, parameter count, totals.

``summary(model, input_shape)`` traces the model with :func:`jax.eval_shape`
(no parameters are materialized, so VGG-16 takes well under a second and no
memory) and lists the model's top-level layers in call order. A nested model
(e.g. a VGG-16 base inside a transfer-learning head) is one row, as Keras shows
``vgg16 (Functional)``. Printing gives Keras' table::

    >>> print(cnnjax.summary(cnnjax.models.get("lenet5"), (32, 32, 1)))
    Model: "LeNet5"
    ...
     conv1 (Conv)                (None, 28, 28, 6)         156
    ...
    Total params: 61706 (241.04 KB)
    Trainable params: 61706 (241.04 KB)
    Non-trainable params: 0 (0.00 Byte)

Which parameters count as trainable: all by default; ``frozen={"vgg16"}``
marks those top-level layers non-trainable (Keras' ``layer.trainable = False``),
``trainable=`` gives the complement (a set of top-level names, or a predicate
on the parameter path tuple, e.g. ``lambda path: path[0] != "vgg16"``). With
neither, a model's own ``is_trainable(path)`` method decides (a
``cnnjax.models.TransferModel`` and its ``freeze``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnjax._tree import path_names

__all__ = ["Summary", "SummaryRow", "summary", "format_bytes"]


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    name: str
    type: str
    output_shape: tuple
    params: int

    @property
    def output_shape_text(self) -> str:
        return _shape_text(self.output_shape)


def _shape_text(shape) -> str:
    if isinstance(shape, (list, tuple)) and shape and isinstance(shape[0], (list, tuple)):
        return ", ".join(_shape_text(s) for s in shape)
    dims = ["None", *(str(d) for d in tuple(shape)[1:])]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def format_bytes(n: float) -> str:
    """Keras' readable size: 246824 -> "241.04 KB", 0 -> "0.00 Byte"."""
    units = ["Byte", "KB", "MB", "GB", "TB", "PB"]
    size, i = float(n), 0
    while size >= 1024 and i < len(units) - 1:
        size /= 1024
        i += 1
    return f"{size:.2f} {units[i]}"


@dataclasses.dataclass(frozen=True)
class Summary:
    """A model's table. ``rows`` in call order; totals count every parameter."""

    model_name: str
    rows: tuple[SummaryRow, ...]
    total_params: int
    trainable_params: int
    non_trainable_params: int
    total_bytes: int
    trainable_bytes: int
    non_trainable_bytes: int

    def __str__(self) -> str:
        first = max([29, *(len(f"{r.name} ({r.type})") + 2 for r in self.rows)])
        second = max([26, *(len(r.output_shape_text) + 2 for r in self.rows)])
        widths = (first, second, 10)
        line = sum(widths)
        out = [f'Model: "{self.model_name}"', "_" * line,
               _row(("Layer (type)", "Output Shape", "Param #"), widths), "=" * line]
        for i, r in enumerate(self.rows):
            out.append(_row((f"{r.name} ({r.type})", r.output_shape_text, str(r.params)), widths))
            out.append(("_" if i < len(self.rows) - 1 else "=") * line)
        if not self.rows:
            out.append("=" * line)
        out += [
            f"Total params: {self.total_params} ({format_bytes(self.total_bytes)})",
            f"Trainable params: {self.trainable_params} ({format_bytes(self.trainable_bytes)})",
            f"Non-trainable params: {self.non_trainable_params} "
            f"({format_bytes(self.non_trainable_bytes)})",
            "_" * line,
        ]
        return "\n".join(out)

    def __repr__(self) -> str:
        return (f"Summary(model_name={self.model_name!r}, rows={len(self.rows)}, "
                f"total_params={self.total_params}, trainable_params={self.trainable_params}, "
                f"non_trainable_params={self.non_trainable_params})")

    def print(self) -> None:
        print(str(self))


def _row(cells, widths) -> str:
    text = " "
    for cell, width in zip(cells, widths, strict=True):
        text += cell.ljust(width - 1) + " "
    return text.rstrip()


def _trainable_predicate(trainable, frozen) -> Callable[[tuple[str, ...]], bool]:
    if trainable is not None and frozen is not None:
        raise ValueError("pass trainable or frozen, not both.")
    if frozen is not None:
        if isinstance(frozen, str) or not isinstance(frozen, Collection):
            raise ValueError(
                f"frozen must be a collection of top-level layer names, got {frozen!r}.")
        names = set(frozen)
        return lambda path: path[0] not in names
    if trainable is None:
        return lambda path: True
    if callable(trainable):
        return lambda path: bool(trainable(path))
    if isinstance(trainable, str) or not isinstance(trainable, Collection):
        raise ValueError(
            "trainable must be None, a collection of top-level layer names or a predicate "
            f"on the parameter path, got {trainable!r}."
        )
    names = set(trainable)
    return lambda path: path[0] in names


def summary(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    trainable: Collection[str] | Callable[[tuple[str, ...]], bool] | None = None,
    frozen: Collection[str] | None = None,
    dtype=jnp.float32,
    **call_kwargs,
) -> Summary:
    """The Keras-style summary of ``model`` for one input of ``input_shape`` (H, W, C).

    Args:
      model: any flax.linen module called as ``model(x, **call_kwargs)``.
      input_shape: one example's shape, no batch axis; default ``model.input_shape``.
        For a cnnjax model whose ``input_shape`` differs, the model is rebuilt for it
        (so its dense layers fit), which raises ShapeError when it is too small.
      trainable / frozen: which parameters are trainable (see the module docstring).
      dtype: dtype of the dummy input.

    Returns:
      A :class:`Summary`; ``print`` it for the table.
    """
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
        if input_shape is None:
            raise ValueError("input_shape is required for a model without an input_shape "
                             "attribute; pass e.g. input_shape=(32, 32, 3).")
    try:
        input_shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise ValueError(
            f"input_shape must be a sequence of positive integers such as (32, 32, 3), "
            f"got {input_shape!r}.") from None
    if not input_shape or min(input_shape) < 1:
        raise ValueError(f"input_shape must hold positive integers, got {input_shape!r}.")
    if "input_shape" in getattr(model, "__dataclass_fields__", {}) and \
            tuple(model.input_shape) != input_shape:
        model = model.clone(parent=None, input_shape=input_shape)
    if trainable is None and frozen is None and callable(getattr(model, "is_trainable", None)):
        # The model's own freeze spec (e.g. TransferModel), the one the optimizer uses.
        trainable = model.is_trainable
    is_trainable = _trainable_predicate(trainable, frozen)

    calls: list[tuple[str, str, object]] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        path = mod.scope.path if mod.scope is not None else ()
        if context.method_name == "__call__" and len(path) == 1:
            calls.append((path[0], type(mod).__name__, jax.tree.map(lambda a: a.shape, out)))
        return out

    x = jax.ShapeDtypeStruct((1, *input_shape), dtype)

    def init_and_run(x):
        variables = model.init(jax.random.key(0), x, **call_kwargs)
        with nn.intercept_methods(record):
            model.apply(variables, x, **call_kwargs)
        return variables

    variables = jax.eval_shape(init_and_run, x)
    params = variables.get("params", {})
    per_layer: dict[str, int] = {}
    total = trainable_count = 0
    total_b = trainable_b = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = path_names(path)
        size = int(np.prod(leaf.shape))
        nbytes = size * jnp.dtype(leaf.dtype).itemsize
        per_layer[names[0]] = per_layer.get(names[0], 0) + size
        total += size
        total_b += nbytes
        if is_trainable(names):
            trainable_count += size
            trainable_b += nbytes
    # Non-parameter collections (e.g. batch statistics) are never trainable.
    for col, tree in variables.items():
        if col == "params":
            continue
        for leaf in jax.tree.leaves(tree):
            size = int(np.prod(leaf.shape))
            total += size
            total_b += size * jnp.dtype(leaf.dtype).itemsize

    rows, seen = [], set()
    for name, type_name, shape in calls:
        if name in seen:  # a layer called twice appears once, with its first output
            continue
        seen.add(name)
        rows.append(SummaryRow(name, type_name, shape, per_layer.get(name, 0)))
    return Summary(
        model_name=model.name or type(model).__name__,
        rows=tuple(rows),
        total_params=total,
        trainable_params=trainable_count,
        non_trainable_params=total - trainable_count,
        total_bytes=total_b,
        trainable_bytes=trainable_b,
        non_trainable_bytes=total_b - trainable_b,
    )
