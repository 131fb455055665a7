"""FC -> conv: same parameters, same logits at the training size, score maps beyond it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import layers as L
from cnnjax import models
from cnnjax.models import dense_to_conv, to_fully_convolutional


def _random_variables(model, seed=0):
    """float32 parameters drawn with numpy from the traced shapes (no init to compile)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, *model.input_shape))))

    def draw(s):
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 10
        return jnp.asarray(rng.standard_normal(s.shape) * np.sqrt(2.0 / fan_in), jnp.float32)

    return jax.tree.map(draw, shapes)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_dense_to_conv_against_numpy(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    kernel = rng.standard_normal((3 * 4 * 5, 6))
    bias = rng.standard_normal(6)
    conv_kernel, conv_bias = dense_to_conv(kernel, bias, (3, 4))
    assert conv_kernel.shape == (3, 4, 5, 6)
    dense = x.reshape(2, -1) @ kernel + bias  # flatten in H, W, C order
    conv = np.einsum("nhwc,hwck->nk", x, np.asarray(conv_kernel)) + np.asarray(conv_bias)
    np.testing.assert_allclose(conv, dense, rtol=1e-5)  # kernel is float32 now


def test_dense_to_conv_errors():
    with pytest.raises(ValueError, match="input_hw"):
        dense_to_conv(np.zeros((50, 3)), None, (7, 7))
    with pytest.raises(ValueError, match="kernel"):
        dense_to_conv(np.zeros((3,)), None, (1, 1))


@pytest.fixture(scope="module")
def lenet():
    model = models.get("lenet5")
    return model, _random_variables(model)


def test_lenet5_same_logits_and_sliding_window(lenet):
    model, variables = lenet
    fc_model, fc_vars = to_fully_convolutional(model, variables)
    assert _count(fc_vars) == _count(variables) == 61706
    assert "flatten" not in fc_model.layer_names()
    assert fc_vars["params"]["fc1"]["kernel"].shape == (1, 1, 120, 84)
    x = jax.random.normal(jax.random.key(0), (2, 36, 36, 1))
    logits = model.apply(variables, x[:, :32, :32])
    small = fc_model.apply(fc_vars, x[:, :32, :32])
    assert small.shape == (2, 1, 1, 10)
    np.testing.assert_allclose(small[:, 0, 0], logits, rtol=1e-5, atol=1e-5)
    # 36x36: a 2x2 map; the network's total stride is 4 (two 2x2 pools).
    scores = fc_model.apply(fc_vars, x)
    assert scores.shape == (2, 2, 2, 10)
    np.testing.assert_allclose(scores[:, 1, 1], model.apply(variables, x[:, 4:, 4:]),
                               rtol=1e-5, atol=1e-5)


def test_vgg16_small_input_same_logits_and_score_map():
    model = models.get("vgg16", num_classes=3, input_shape=(64, 64, 3))
    variables = _random_variables(model)
    fc_model, fc_vars = to_fully_convolutional(model, variables)
    assert _count(fc_vars) == _count(variables)
    # block5_pool is 2x2 at 64x64: fc1 becomes a 2x2 convolution.
    assert fc_vars["params"]["fc1"]["kernel"].shape == (2, 2, 512, 4096)
    assert fc_vars["params"]["predictions"]["kernel"].shape == (1, 1, 4096, 3)
    x = jax.random.normal(jax.random.key(1), (1, 96, 96, 3))
    apply = jax.jit(model.apply)
    fc_apply = jax.jit(fc_model.apply)
    logits = apply(variables, x[:, :64, :64])
    np.testing.assert_allclose(fc_apply(fc_vars, x[:, :64, :64])[:, 0, 0], logits,
                               rtol=2e-4, atol=2e-4)
    # 96x96: a 2x2 map. (Not equal to crops: VGG's padded convs see zeros at a crop's
    # border but real pixels inside the larger image; LeNet, all VALID, checks that.)
    assert fc_apply(fc_vars, x).shape == (1, 2, 2, 3)


def _converted_shapes(model):
    """(fc_model, fc_variable shapes) without materializing any parameter."""
    var_shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, *model.input_shape))))
    box = {}

    def convert(v):
        box["model"], fc_vars = to_fully_convolutional(model, v)
        return fc_vars

    fc_shapes = jax.eval_shape(convert, var_shapes)
    return box["model"], var_shapes, fc_shapes


def test_vgg16_at_384_gives_a_6x6_score_map():
    fc_model, var_shapes, fc_shapes = _converted_shapes(models.get("vgg16"))
    assert _count(fc_shapes) == _count(var_shapes) == 138_357_544
    assert fc_shapes["params"]["fc1"]["kernel"].shape == (7, 7, 512, 4096)
    assert fc_shapes["params"]["fc2"]["kernel"].shape == (1, 1, 4096, 4096)
    assert fc_shapes["params"]["predictions"]["kernel"].shape == (1, 1, 4096, 1000)
    out = jax.eval_shape(fc_model.apply, fc_shapes, jnp.zeros((1, 384, 384, 3)))
    assert out.shape == (1, 6, 6, 1000)
    out = jax.eval_shape(fc_model.apply, fc_shapes, jnp.zeros((1, 224, 224, 3)))
    assert out.shape == (1, 1, 1, 1000)


def test_alexnet_fc6_becomes_a_6x6_conv():
    fc_model, var_shapes, fc_shapes = _converted_shapes(models.get("alexnet"))
    assert _count(fc_shapes) == _count(var_shapes) == 62_378_344
    assert fc_shapes["params"]["fc6"]["kernel"].shape == (6, 6, 256, 4096)
    assert [n for n in fc_model.layer_names() if n.startswith("dropout")] == [
        "dropout6", "dropout7"]
    # 227 + 32*4 = 355 pixels: pool5 is 10x10, so a 5x5 map of scores.
    out = jax.eval_shape(fc_model.apply, fc_shapes, jnp.zeros((1, 355, 355, 3)))
    assert out.shape == (1, 5, 5, 1000)


def test_alexnet_small_input_same_logits():
    model = models.get("alexnet", num_classes=4, input_shape=(99, 99, 3))
    variables = _random_variables(model)
    fc_model, fc_vars = to_fully_convolutional(model, variables)
    x = jax.random.normal(jax.random.key(2), (1, 99, 99, 3))
    np.testing.assert_allclose(jax.jit(fc_model.apply)(fc_vars, x)[:, 0, 0],
                               jax.jit(model.apply)(variables, x), rtol=2e-4, atol=2e-4)


def test_models_without_dense_layers_are_returned_unchanged():
    for model in (models.get("allconv"), models.get("vgg16", include_top=False)):
        variables = {"params": {}}
        assert to_fully_convolutional(model, variables) == (model, variables)


def test_only_cnnjax_models_convert():
    with pytest.raises(ValueError, match="model must be a cnnjax model"):
        to_fully_convolutional(L.Dense(3), {"params": {}})


@pytest.mark.slow
def test_vgg16_full_size_same_logits_and_6x6_map():
    model = models.get("vgg16", num_classes=10)
    variables = _random_variables(model)
    fc_model, fc_vars = to_fully_convolutional(model, variables)
    x = jax.random.normal(jax.random.key(3), (1, 224, 224, 3))
    fc_apply = jax.jit(fc_model.apply)
    np.testing.assert_allclose(fc_apply(fc_vars, x)[:, 0, 0], jax.jit(model.apply)(variables, x),
                               rtol=1e-3, atol=1e-3)
    scores = fc_apply(fc_vars, jax.random.normal(jax.random.key(4), (1, 384, 384, 3)))
    assert scores.shape == (1, 6, 6, 10) and np.all(np.isfinite(scores))
