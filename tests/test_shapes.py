"""Output-size arithmetic: the lecture's worked numbers, ShapeError, padding forms, the CLI."""

from __future__ import annotations

import math
import re

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnjax.cli import main
from cnnjax.ops import avg_pool, conv2d
from cnnjax.shapes import (
    ShapeError,
    conv_output_hw,
    conv_output_size,
    effective_kernel_size,
    normalize_padding,
    pool_output_size,
    same_padding,
    to_pair,
)

# --------------------------------------------------------------------------- lecture numbers


def test_alexnet_conv1_227_gives_55():
    # (227 - 11 + 2*0) / 4 + 1 = 55
    assert conv_output_size(227, 11, stride=4, padding=0) == 55


def test_vgg_conv_224_3_1_1_keeps_224():
    # (224 - 3 + 2*1) / 1 + 1 = 224
    assert conv_output_size(224, 3, stride=1, padding=1) == 224
    assert conv_output_size(224, 3, stride=1, padding="SAME") == 224


def test_fc_as_conv_36_11_1_0_gives_26():
    # (36 - 11 + 2*0) / 1 + 1 = 26
    assert conv_output_size(36, 11, 1, 0) == 26


def test_lenet_chain():
    # 32 -conv5-> 28 -pool2-> 14 -conv5-> 10 -pool2-> 5 -conv5-> 1
    sizes = [32]
    for op, f in [("conv", 5), ("pool", 2), ("conv", 5), ("pool", 2), ("conv", 5)]:
        if op == "conv":
            sizes.append(conv_output_size(sizes[-1], f))
        else:
            sizes.append(pool_output_size(sizes[-1], f))
    assert sizes == [32, 28, 14, 10, 5, 1]


def test_lenet_chain_through_the_kernels():
    # The same chain computed by the kernels themselves (shapes only, tiny channels).
    x = jnp.zeros((1, 32, 32, 1), jnp.float32)
    k = jnp.zeros((5, 5, 1, 1), jnp.float32)
    seen = []
    for step in range(5):
        x = conv2d(x, k) if step % 2 == 0 else avg_pool(x, 2)
        seen.append(x.shape[1:3])
    assert seen == [(28, 28), (14, 14), (10, 10), (5, 5), (1, 1)]


def test_alexnet_conv1_through_conv2d():
    y = conv2d(jnp.zeros((1, 227, 227, 1), jnp.float32), jnp.zeros((11, 11, 1, 2), jnp.float32),
               stride=4)
    assert y.shape == (1, 55, 55, 2)


def test_alexnet_overlapping_pool():
    # AlexNet's overlapping max pool: window 3, stride 2 on 55 gives 27.
    assert pool_output_size(55, 3, 2) == 27


def test_lecture_elementwise_example_is_minus_two():
    # 1*0+0*0+(-1)*1+(-2)*1+1*2+1*0+0*1+1*(-1)+(-1)*0 = -2: the first factors are the
    # filter, the second the input patch, both read row by row.
    filt = np.array([[1, 0, -1], [-2, 1, 1], [0, 1, -1]], np.float32)
    patch = np.array([[0, 0, 1], [1, 2, 0], [1, -1, 0]], np.float32)
    assert float(np.sum(filt * patch)) == -2.0  # the lecture's sum, by hand
    y = conv2d(jnp.asarray(patch)[None, :, :, None], jnp.asarray(filt)[:, :, None, None])
    assert y.shape == (1, 1, 1, 1)
    assert float(y[0, 0, 0, 0]) == -2.0
    # A "true" convolution (flipped filter) would give 2: conv2d is a cross-correlation.
    assert float(np.sum(filt[::-1, ::-1] * patch)) == 2.0


# --------------------------------------------------------------------------- ShapeError


def test_shape_error_is_a_value_error():
    assert issubclass(ShapeError, ValueError)


def test_inexact_division_shows_arithmetic_and_fix():
    # The lecture's AlexNet 224-vs-227 confusion.
    with pytest.raises(ShapeError) as info:
        conv_output_size(224, 11, stride=4, padding=0, name="conv1")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("conv1:")
    assert "(224 - 11 + 2*0) / 4 + 1 = 54.25" in msg
    assert "not an integer" in msg
    assert "227" in msg  # the fix the lecture gives
    assert "exact=False" in msg


def _formula(size, f_eff, stride, pad_total):
    return (size - f_eff + pad_total) / stride + 1


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 80),
    kernel=st.integers(1, 9),
    stride=st.integers(2, 6),
    padding=st.integers(0, 4),
    dilation=st.integers(1, 3),
)
def test_suggested_fixes_are_exact(size, kernel, stride, padding, dilation):
    """Every input size / padding the message proposes really divides exactly."""
    f_eff = dilation * (kernel - 1) + 1
    value = _formula(size, f_eff, stride, 2 * padding)
    if size + 2 * padding < f_eff or value == int(value):
        return
    with pytest.raises(ShapeError) as info:
        conv_output_size(size, kernel, stride, padding, dilation)
    msg = str(info.value)
    assert f"/ {stride} + 1 =" in msg
    inputs = [int(v) for v in re.findall(r"input (\d+)", msg)]
    pads = [int(v) for v in re.findall(r"padding (\d+)", msg)]
    assert inputs, msg
    for n in inputs:
        assert _formula(n, f_eff, stride, 2 * padding).is_integer(), msg
        assert _formula(n, f_eff, stride, 2 * padding) >= 1, msg
    for p in pads:
        assert _formula(size, f_eff, stride, 2 * p).is_integer(), msg


def test_filter_larger_than_padded_input():
    with pytest.raises(ShapeError) as info:
        conv_output_size(5, 7, name="conv3")
    msg = str(info.value)
    assert msg.startswith("conv3:")
    assert "(5 - 7 + 2*0) = -2 < 0" in msg
    assert "larger than the padded input of 5" in msg


def test_filter_larger_even_when_flooring():
    with pytest.raises(ShapeError):
        conv_output_size(5, 7, exact=False)


def test_dilated_filter_too_large_names_effective_size():
    # F_eff = 2 * (3 - 1) + 1 = 5 > 4
    with pytest.raises(ShapeError, match="5-cell filter"):
        conv_output_size(4, 3, dilation=2)


def test_exact_false_floors():
    assert conv_output_size(224, 11, 4, 0, exact=False) == 54  # floor(54.25)
    assert conv_output_size(10, 3, 2, 0, exact=False) == 4  # floor(4.5)
    assert pool_output_size(7, 2, exact=False) == 3
    for size in range(5, 30):
        for stride in (1, 2, 3):
            expected = math.floor((size - 5 + 2) / stride) + 1
            assert conv_output_size(size, 5, stride, 1, exact=False) == expected


# --------------------------------------------------------------------------- padding forms


@pytest.mark.parametrize("size", [1, 2, 5, 7, 8, 10, 224])
@pytest.mark.parametrize("kernel", [1, 2, 3, 5])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_same_padding_gives_ceil(size, kernel, stride):
    # TensorFlow's SAME: output ceil(W / S), padding total split with the extra cell at the end.
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    assert same_padding(size, kernel, stride) == (total // 2, total - total // 2)
    assert conv_output_size(size, kernel, stride, "SAME", exact=False) == out


@pytest.mark.parametrize("size,kernel,stride", [(8, 1, 2), (224, 1, 2), (8, 1, 3), (10, 2, 4)])
def test_same_padding_never_raises_for_inexact_division(size, kernel, stride):
    # SAME is defined by its output ceil(W / S) (e.g. a 1x1 stride-2 projection);
    # the clipped padding can leave W - F + P_total indivisible, which is not a user error.
    assert conv_output_size(size, kernel, stride, "SAME") == -(-size // stride)
    out = -(-size // stride)
    assert conv_output_hw((size, size), (kernel, kernel), stride, "SAME") == (out, out)


def test_valid_padding_is_zero():
    assert conv_output_size(10, 3, 1, "VALID") == 8
    assert conv_output_size(11, 3, 2, "valid") == 5
    assert normalize_padding("VALID", (9, 7), (3, 2)) == ((0, 0), (0, 0))


def test_dilation_effective_kernel():
    assert effective_kernel_size(3, 1) == 3
    assert effective_kernel_size(3, 2) == 5
    assert effective_kernel_size(3, 4) == 9
    assert effective_kernel_size(1, 7) == 1
    # (10 - 5 + 0) / 1 + 1 = 6
    assert conv_output_size(10, 3, dilation=2) == 6
    # SAME with dilation keeps the size at stride 1.
    assert conv_output_size(10, 3, padding="SAME", dilation=3) == 10
    # total SAME padding = F_eff - 1 = 6 at stride 1
    assert same_padding(10, 3, 1, 3) == (3, 3)


def test_asymmetric_padding_pair():
    # (7 - 3 + 1 + 2) / 1 + 1 = 8
    assert conv_output_size(7, 3, 1, (1, 2)) == 8


def test_normalize_padding_forms():
    assert normalize_padding(2, (9, 9), (3, 3)) == ((2, 2), (2, 2))
    assert normalize_padding((1, 3), (9, 9), (3, 3)) == ((1, 1), (3, 3))
    assert normalize_padding([1, 3], (9, 9), (3, 3)) == ((1, 1), (3, 3))
    assert normalize_padding(((0, 2), (1, 0)), (9, 9), (3, 3)) == ((0, 2), (1, 0))
    # SAME per dimension: H: out 4, total (4-1)*2+3-7 = 2; W: out 8, total 7*1+5-8 = 4 (D=2)
    assert normalize_padding("SAME", (7, 8), (3, 3), (2, 1), (1, 2)) == ((1, 1), (2, 2))


def test_conv_output_hw():
    assert conv_output_hw((227, 227), (11, 11), 4, 0) == (55, 55)
    # H: (9 - 3 + 0) / 2 + 1 = 4; W: F_eff = 2*(2-1)+1 = 3, (8 - 3 + 1) / 3 + 1 = 3
    assert conv_output_hw((9, 8), (3, 2), (2, 3), ((0, 0), (1, 0)), (1, 2)) == (4, 3)
    assert conv_output_hw((7, 8), (3, 3), 2, "SAME") == (4, 4)


def test_to_pair():
    assert to_pair(3, "stride") == (3, 3)
    assert to_pair((2, 5), "stride") == (2, 5)
    assert to_pair(np.int64(2), "stride") == (2, 2)
    assert to_pair(0, "padding", minimum=0) == (0, 0)


# --------------------------------------------------------------------------- bad hyperparameters


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"stride": 0}, r"stride must be >= 1, got 0"),
        ({"stride": -2}, r"stride must be >= 1, got -2"),
        ({"padding": -1}, r"padding must be >= 0, got -1"),
        ({"padding": (0, -1)}, r"padding must be >= 0, got -1"),
        ({"dilation": 0}, r"dilation must be >= 1, got 0"),
        ({"size": 2.5}, r"size must be an integer, got 2.5"),
        ({"kernel": "3"}, r"kernel must be an integer, got '3'"),
        ({"stride": 1.0}, r"stride must be an integer, got 1.0"),
        ({"stride": True}, r"stride must be an integer, got True"),
        ({"size": 0}, r"size must be >= 1, got 0"),
        ({"kernel": 0}, r"kernel must be >= 1, got 0"),
        ({"padding": "FULL"}, r"padding must be an int, a pair, 'SAME' or 'VALID', got 'FULL'"),
        ({"padding": (1, 2, 3)}, r"padding for one dimension must be \(low, high\)"),
    ],
)
def test_bad_hyperparameters_name_the_argument(kwargs, pattern):
    args = {"size": 10, "kernel": 3}
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern) as info:
        conv_output_size(**args)
    assert not isinstance(info.value, ShapeError)


def test_pool_bad_stride():
    with pytest.raises(ValueError, match="stride must be >= 1"):
        pool_output_size(10, 2, stride=0)


@pytest.mark.parametrize(
    "padding, pattern",
    [
        (-1, "padding must be >= 0"),
        ((1, -2), "padding must be >= 0"),
        (((0, 1), (-1, 0)), "padding must be >= 0"),
        (((1, 2), 3), "padding mixes ints and pairs"),
        ((1, 2, 3), "padding must be an int, a pair"),
        ("FULL", "padding must be an int, a pair, 'SAME' or 'VALID'"),
        (1.5, "padding must be an integer"),
    ],
)
def test_normalize_padding_rejects(padding, pattern):
    with pytest.raises(ValueError, match=pattern):
        normalize_padding(padding, (9, 9), (3, 3))


def test_to_pair_rejects():
    with pytest.raises(ValueError, match=r"stride must be an int or a pair of ints"):
        to_pair((1, 2, 3), "stride")
    with pytest.raises(ValueError, match=r"dilation must be >= 1, got 0"):
        to_pair((1, 0), "dilation")
    with pytest.raises(ValueError, match=r"stride must be an integer"):
        to_pair(None, "stride")


# --------------------------------------------------------------------------- CLI


def test_cli_shape_alexnet(capsys):
    rc = main(["shape", "--size", "227", "--kernel", "11", "--stride", "4"])
    out = capsys.readouterr()
    assert rc == 0
    line = out.out.strip()
    assert line.endswith("= 55")
    assert "(W - F + 2P) / S + 1" in line
    assert "(227 - 11 + 2*0) / 4 + 1" in line
    assert out.err == ""


def test_cli_shape_padding_and_alias(capsys):
    assert main(["shapes", "--size", "224", "--kernel", "3", "--padding", "1"]) == 0
    assert capsys.readouterr().out.strip().endswith("(224 - 3 + 2*1) / 1 + 1 = 224")


def test_cli_shape_inexact_fails(capsys):
    rc = main(["shape", "--size", "224", "--kernel", "11", "--stride", "4"])
    out = capsys.readouterr()
    assert rc == 2
    assert out.out == ""
    assert "54.25" in out.err
    assert "227" in out.err


def test_cli_shape_floor(capsys):
    rc = main(["shape", "--size", "224", "--kernel", "11", "--stride", "4", "--floor"])
    assert rc == 0
    assert capsys.readouterr().out.strip().endswith("// 4 + 1 = 54")


def test_cli_shape_same_and_dilation(capsys):
    rc = main(["shape", "--size", "10", "--kernel", "3", "--dilation", "2", "--padding", "same"])
    line = capsys.readouterr().out.strip()
    assert rc == 0
    assert line.endswith("= 10")
    assert "2*(3-1)+1" in line  # F_eff spelled out
    assert "2+2" in line  # SAME padding of F_eff - 1 = 4 cells


def test_cli_shape_too_large_filter(capsys):
    assert main(["shape", "--size", "5", "--kernel", "7"]) == 2
    assert "larger than the padded input" in capsys.readouterr().err


def test_cli_shape_bad_padding(capsys):
    assert main(["shape", "--size", "5", "--kernel", "3", "--padding", "x"]) == 2
    assert "--padding must be an integer, SAME or VALID" in capsys.readouterr().err


def test_cli_shape_stride_zero(capsys):
    assert main(["shape", "--size", "5", "--kernel", "3", "--stride", "0"]) == 2
    assert "stride must be >= 1" in capsys.readouterr().err


def test_cli_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "shape" in capsys.readouterr().out
