"""The pattern grammar: the lecture's examples build working models; bad text is pinpointed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import layers as L
from cnnjax import models
from cnnjax.models import PatternError, from_pattern
from cnnjax.shapes import ShapeError


def _count(model) -> int:
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, *model.input_shape))))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


LECTURE_EXAMPLES = [
    "INPUT → FC",
    "INPUT → [CONV → RELU → POOL] ↗ 2 → FC → RELU → FC",
    "INPUT → [CONV → RELU → CONV → RELU → POOL] ↕ 3 → [FC → RELU] ↕ 2 → FC",
]


@pytest.mark.parametrize("text", LECTURE_EXAMPLES + [
    t.replace("→", "->").replace("↗", "*").replace("↕", "*") for t in LECTURE_EXAMPLES])
def test_lecture_examples_build_working_models(text):
    model = from_pattern(text, num_classes=10, input_shape=(16, 16, 3))
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    y = jax.jit(model.apply)(variables, x)
    assert y.shape == (2, 10) and np.all(np.isfinite(y))


def test_linear_classifier():
    model = from_pattern("INPUT -> FC", num_classes=10, input_shape=(32, 32, 3))
    assert model.layer_names() == ["flatten", "fc1"]
    assert _count(model) == 32 * 32 * 3 * 10 + 10


def test_two_stage_example_layers_and_shapes():
    model = from_pattern("INPUT -> [CONV -> RELU -> POOL]*2 -> FC -> RELU -> FC",
                         input_shape=(32, 32, 3))
    assert model.output_shapes() == {
        "conv1": (32, 32, 32), "relu1": (32, 32, 32), "pool1": (16, 16, 32),
        "conv2": (16, 16, 32), "relu2": (16, 16, 32), "pool2": (8, 8, 32),
        "flatten": (2048,), "fc1": (128,), "relu3": (128,), "fc2": (10,),
    }
    # Defaults: CONV(32, 3x3, same), FC 128, last FC num_classes.
    assert _count(model) == (27 * 32 + 32) + (288 * 32 + 32) + (2048 * 128 + 128) + 1290


def test_issue_example_with_arguments():
    model = from_pattern(
        "INPUT -> [CONV(32,3x3) -> RELU]*2 -> POOL(2) -> [FC(128) -> RELU]*1 -> FC(10)",
        input_shape=(28, 28, 1))
    assert model.layer_names() == ["conv1", "relu1", "conv2", "relu2", "pool1", "flatten",
                                   "fc1", "relu3", "fc2"]
    assert model.output_shapes()["pool1"] == (14, 14, 32)


def test_lenet5_written_as_a_pattern_has_61706_parameters():
    model = from_pattern(
        "INPUT -> CONV(6, 5x5, tanh, p=valid) -> AVG_POOL(2x2) -> CONV(16, 5x5, tanh, p=0) "
        "-> AVGPOOL(2) -> CONV(120, 5x5, tanh, p=valid) -> FC(84, tanh) -> FC(10)",
        input_shape=(32, 32, 1))
    assert _count(model) == 61706
    assert model.output_shapes()["conv3"] == (1, 1, 120)


def test_options_strides_dilation_dropout_lrn():
    specs = {s.name: s for s in models.pattern_layers(
        "INPUT -> CONV(8, 3, s=2, p=1, d=1) -> LRN -> MAXPOOL(3, 2) -> DROPOUT(0.25) -> GAP "
        "-> FC -> SOFTMAX", num_classes=4)}
    assert specs["conv1"].option("stride") == 2 and specs["conv1"].option("padding") == 1
    assert specs["lrn1"].cls is L.LRN and specs["lrn1"].option("k") == 2.0
    assert specs["pool1"].option("window") == 3 and specs["pool1"].option("stride") == 2
    assert specs["dropout1"].option("rate") == 0.25
    assert specs["fc1"].option("features") == 4
    assert "flatten" not in specs  # GAP already gives a vector


def test_named_loop_counts_and_optional_pool():
    text = "INPUT -> [[CONV -> RELU]*N -> POOL?]*M -> [FC -> RELU]*K -> FC"
    model = from_pattern(text, repeats={"N": 2, "M": 3, "K": 2}, input_shape=(32, 32, 3))
    names = model.layer_names()
    assert sum(n.startswith("conv") for n in names) == 6
    assert sum(n.startswith("pool") for n in names) == 3
    assert sum(n.startswith("fc") for n in names) == 3
    no_pool = from_pattern(text, repeats={"N": 1, "M": 2, "K": 0}, optional=False,
                           input_shape=(8, 8, 3))
    assert no_pool.layer_names() == ["conv1", "relu1", "conv2", "relu2", "flatten", "fc1"]
    linear = from_pattern(text, repeats={"N": 0, "M": 0, "K": 0})
    assert linear.layer_names() == ["flatten", "fc1"]


def test_dropout_in_pattern_only_in_train_mode():
    model = from_pattern("INPUT -> FC(64) -> RELU -> DROPOUT(0.5) -> FC", input_shape=(4, 4, 1))
    x = jnp.ones((2, 4, 4, 1))
    variables = model.init(jax.random.key(0), x)
    a = model.apply(variables, x)
    np.testing.assert_array_equal(a, model.apply(variables, x))
    b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(a, b)


@pytest.mark.parametrize(
    "text, position, fragment",
    [
        ("INPUT -> FOO", 9, "unknown layer 'FOO'"),
        ("INPUT -> -> FC", 9, "expected a layer"),
        ("INPUT -> CONV(32, 3x3", 21, "expected ',' or ')'"),
        ("INPUT -> [CONV -> RELU*2", 22, "expected ']'"),
        ("INPUT -> [CONV]*N -> FC", 16, "loop count 'N' is not given"),
        ("INPUT -> CONV(32, 3x3, q=1)", 23, "CONV has no option 'q'"),
        ("INPUT -> FC -> CONV", 15, "CONV after FC"),
        ("INPUT -> DROPOUT(1.5)", 17, "DROPOUT takes one rate"),
        ("INPUT -> FC $", 12, "unexpected character '$'"),
        ("INPUT", 5, "at least one layer"),
        ("", 0, "empty pattern"),
        ("INPUT -> FC -> INPUT", 15, "INPUT may only start"),
        ("INPUT -> FC FC", 12, "expected '->'"),
        ("INPUT -> [FC]*", 14, "expected a loop count"),
    ],
)
def test_malformed_text_points_at_the_token(text, position, fragment):
    with pytest.raises(PatternError) as info:
        from_pattern(text)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert fragment in message
    assert f"at position {position}" in message
    text_line, caret_line = message.splitlines()[-2:]
    assert text_line == "  " + text
    assert caret_line.index("^") - 2 == position


def test_too_deep_for_the_input_is_a_shape_error():
    with pytest.raises(ShapeError, match="pool6"):
        from_pattern("INPUT -> [CONV -> POOL]*6 -> FC", input_shape=(32, 32, 3))


def test_model_from_pattern_registers_like_the_others():
    model = from_pattern("INPUT -> [CONV -> RELU -> POOL]*2 -> FC", input_shape=(8, 8, 1))
    assert isinstance(model, models.SequentialModel)
    assert model.input_shape == (8, 8, 1)
