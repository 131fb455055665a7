"""Output-size arithmetic of convolution and pooling layers.

The lecture's formula for one spatial dimension is::

    W2 = (W1 - F + 2P) / S + 1

with W1 the input size, F the filter size, S the stride and P the zero padding
on each side. With dilation D the filter covers ``F_eff = D * (F - 1) + 1``
input cells, and with unequal padding ``2P`` becomes ``P_lo + P_hi``.

A layer is only well formed when the division is exact (the lecture's AlexNet
example: 227, not 224). ``exact=True`` (the default here) raises
:class:`ShapeError` otherwise, with the arithmetic and a fix in one sentence;
``exact=False`` floors the division as TensorFlow and PyTorch do.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

Padding1D = int | tuple[int, int] | str
Padding2D = int | Sequence[int] | Sequence[Sequence[int]] | str

__all__ = [
    "ShapeError",
    "effective_kernel_size",
    "conv_output_size",
    "pool_output_size",
    "conv_output_hw",
    "same_padding",
    "to_pair",
    "normalize_padding",
]


class ShapeError(ValueError):
    """A layer's hyperparameters do not fit its input (one sentence, with a fix)."""


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}.") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return value


def to_pair(value, name: str, minimum: int = 1) -> tuple[int, int]:
    """An int or a pair of ints as ``(height, width)``, each checked to be >= ``minimum``."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}.")
        return (_check_int(name, value[0], minimum), _check_int(name, value[1], minimum))
    v = _check_int(name, value, minimum)
    return (v, v)


def effective_kernel_size(kernel: int, dilation: int = 1) -> int:
    """Input cells a dilated filter spans: ``D * (F - 1) + 1``."""
    return dilation * (kernel - 1) + 1


def same_padding(size: int, kernel: int, stride: int = 1, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's "SAME" padding: output ``ceil(size / stride)``, extra cell at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + effective_kernel_size(kernel, dilation) - size, 0)
    return (total // 2, total - total // 2)


def _padding_1d(padding: Padding1D, size: int, kernel: int, stride: int, dilation: int):
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return (0, 0)
        if mode == "SAME":
            return same_padding(size, kernel, stride, dilation)
        raise ValueError(f"padding must be an int, a pair, 'SAME' or 'VALID', got {padding!r}.")
    if isinstance(padding, (list, tuple)):
        if len(padding) != 2:
            raise ValueError(f"padding for one dimension must be (low, high), got {padding!r}.")
        return (_check_int("padding", padding[0], 0), _check_int("padding", padding[1], 0))
    p = _check_int("padding", padding, 0)
    return (p, p)


def normalize_padding(
    padding: Padding2D,
    input_hw: Sequence[int],
    kernel_hw: Sequence[int],
    stride_hw: Sequence[int] = (1, 1),
    dilation_hw: Sequence[int] = (1, 1),
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Any accepted padding form as explicit ``((top, bottom), (left, right))``.

    Accepted: an int P (all sides), a pair ``(P_h, P_w)``, explicit
    ``((top, bottom), (left, right))``, or "SAME" / "VALID".
    """
    if isinstance(padding, str):
        return tuple(  # type: ignore[return-value]
            _padding_1d(padding, n, f, s, d)
            for n, f, s, d in zip(input_hw, kernel_hw, stride_hw, dilation_hw, strict=False)
        )
    if isinstance(padding, (list, tuple)):
        if len(padding) != 2:
            raise ValueError(
                "padding must be an int, a pair (P_h, P_w), ((top, bottom), (left, right)), "
                f"'SAME' or 'VALID', got {padding!r}."
            )
        if all(isinstance(p, (list, tuple)) for p in padding):
            return (_padding_1d(tuple(padding[0]), 0, 1, 1, 1),
                    _padding_1d(tuple(padding[1]), 0, 1, 1, 1))
        if any(isinstance(p, (list, tuple)) for p in padding):
            raise ValueError(
                f"padding mixes ints and pairs: {padding!r}; use (P_h, P_w) or "
                "((top, bottom), (left, right))."
            )
        ph, pw = (_check_int("padding", p, 0) for p in padding)
        return ((ph, ph), (pw, pw))
    p = _check_int("padding", padding, 0)
    return ((p, p), (p, p))


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.4g}"


def _suggest(size: int, f_eff: int, stride: int, pad_total: int) -> str:
    """Nearest input sizes (and a symmetric padding) that make the division exact."""
    lower = size - ((size - f_eff + pad_total) % stride)
    upper = lower + stride
    hints = []
    if lower >= f_eff - pad_total and lower > 0:
        hints.append(f"input {lower}")
    hints.append(f"input {upper}")
    text = "use " + " or ".join(hints)
    for p in range(0, f_eff + 1):
        if (size - f_eff + 2 * p) % stride == 0 and 2 * p != pad_total:
            text += f", or padding {p}"
            break
    return text + ", or exact=False to floor as TensorFlow and PyTorch do"


def conv_output_size(
    size: int,
    kernel: int,
    stride: int = 1,
    padding: Padding1D = 0,
    dilation: int = 1,
    *,
    exact: bool = True,
    name: str = "conv",
) -> int:
    """Output length of a convolution along one dimension.

    ``(W - F_eff + P_lo + P_hi) / S + 1`` with ``F_eff = D (F - 1) + 1``.
    ``padding`` is an int (both sides), a ``(low, high)`` pair, "SAME" or "VALID".

    Raises:
      ShapeError: the division is not exact (with ``exact=True``) or the output
        would be empty (filter larger than the padded input).
    """
    size = _check_int("size", size, 1)
    kernel = _check_int("kernel", kernel, 1)
    stride = _check_int("stride", stride, 1)
    dilation = _check_int("dilation", dilation, 1)
    lo, hi = _padding_1d(padding, size, kernel, stride, dilation)
    f_eff = effective_kernel_size(kernel, dilation)
    pad_total = lo + hi
    pad_text = f"2*{lo}" if lo == hi else f"{lo}+{hi}"
    f_text = str(kernel) if dilation == 1 else f"{f_eff}"
    numerator = size - f_eff + pad_total
    if numerator < 0:
        raise ShapeError(
            f"{name}: (W - F + 2P) = ({size} - {f_text} + {pad_text}) = {numerator} < 0: "
            f"the {f_eff}-cell filter is larger than the padded input of {size + pad_total}; "
            f"use a larger input, more padding or a smaller filter."
        )
    out = numerator / stride + 1
    # "SAME" is defined by its output, ceil(W / S), which the floor below always gives;
    # its clipped padding may leave the division inexact (e.g. a 1x1 stride-2 conv).
    same = isinstance(padding, str) and padding.upper() == "SAME"
    if numerator % stride and not same:
        if exact:
            raise ShapeError(
                f"{name}: ({size} - {f_text} + {pad_text}) / {stride} + 1 = {_fmt_num(out)} "
                f"is not an integer; {_suggest(size, f_eff, stride, pad_total)}."
            )
        return numerator // stride + 1
    return numerator // stride + 1


def pool_output_size(
    size: int,
    window: int,
    stride: int | None = None,
    padding: Padding1D = 0,
    *,
    exact: bool = True,
    name: str = "pool",
) -> int:
    """Output length of a pooling layer: ``(W - F + 2P) / S + 1``, stride defaults to F."""
    return conv_output_size(
        size, window, window if stride is None else stride, padding, 1, exact=exact, name=name
    )


def conv_output_hw(
    input_hw: Sequence[int],
    kernel_hw: Sequence[int],
    stride=1,
    padding: Padding2D = 0,
    dilation=1,
    *,
    exact: bool = True,
    name: str = "conv",
) -> tuple[int, int]:
    """``(H_out, W_out)`` of a 2-D convolution or pooling window (see conv_output_size)."""
    s = to_pair(stride, "stride")
    d = to_pair(dilation, "dilation")
    k = to_pair(tuple(kernel_hw), "kernel size")
    pads = normalize_padding(padding, input_hw, k, s, d)
    if isinstance(padding, str):
        pads = (padding, padding)  # keep "SAME" visible: its division need not be exact
    return tuple(  # type: ignore[return-value]
        conv_output_size(n, f, st, p, dl, exact=exact, name=name)
        for n, f, st, p, dl in zip(input_hw, k, s, pads, d, strict=False)
    )
