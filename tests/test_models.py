"""The architectures: published parameter counts, hand-computed shapes, forward, gradients.

Full-size AlexNet/VGG are only traced (jax.eval_shape); real forwards use small
batches or small inputs so the file runs in well under a minute on a 2-core CPU.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import models
from cnnjax.shapes import ShapeError


def _param_shapes(model, input_shape=None):
    shape = (1, *(input_shape or model.input_shape))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _per_layer(variables) -> dict[str, int]:
    return {name: _count(p) for name, p in variables["params"].items()}


# -- registry ---------------------------------------------------------------


def test_registry_lists_the_five_models():
    assert {"alexnet", "allconv", "lenet5", "vgg16", "vgg19"} <= set(models.available())
    assert models.available() == sorted(models.available())
    for name in models.available():
        assert isinstance(models.get(name), nn.Module)


def test_registry_errors_name_the_argument():
    with pytest.raises(ValueError, match="unknown model 'vgg11'"):
        models.get("vgg11")
    with pytest.raises(ValueError, match="unknown argument.*'weights'"):
        models.get("vgg16", weights="imagenet")
    with pytest.raises(ValueError, match="num_classes"):
        models.get("lenet5", num_classes=0)
    with pytest.raises(ValueError, match="pooling"):
        models.get("vgg16", include_top=False, pooling="mean")
    with pytest.raises(ValueError, match="dropout_rate"):
        models.get("alexnet", dropout_rate=1.5)
    with pytest.raises(ValueError, match="input_shape"):
        models.get("lenet5", input_shape=(32, 32))


def test_keras_alias_classes():
    assert models.get("vgg16", classes=7).num_classes == 7


@pytest.mark.parametrize(
    "name, shape",
    [("lenet5", (32, 32, 1)), ("alexnet", (227, 227, 3)), ("vgg16", (224, 224, 3)),
     ("vgg19", (224, 224, 3)), ("allconv", (32, 32, 3))],
)
def test_default_input_shape_attribute(name, shape):
    model = models.get(name)
    assert model.input_shape == shape
    assert type(model).input_shape == shape


# -- published parameter counts ------------------------------------------------


def test_lenet5_parameters_per_layer():
    counts = _per_layer(_param_shapes(models.get("lenet5")))
    assert counts == {"conv1": 156, "conv2": 2416, "conv3": 48120, "fc1": 10164, "fc2": 850}
    assert sum(counts.values()) == 61706


@pytest.mark.parametrize(
    "name, kwargs, total",
    [
        ("alexnet", {}, 62_378_344),
        ("vgg16", {}, 138_357_544),
        ("vgg16", {"include_top": False}, 14_714_688),
        ("vgg19", {}, 143_667_240),
        ("vgg19", {"include_top": False}, 20_024_384),
        ("allconv", {}, 1_369_738),
    ],
)
def test_published_parameter_counts(name, kwargs, total):
    assert _count(_param_shapes(models.get(name, **kwargs))) == total


def test_alexnet_parameters_per_layer():
    # 11*11*3*96+96, 5*5*96*256+256, 3*3*256*384+384, 3*3*384*384+384, 3*3*384*256+256,
    # 6*6*256*4096+4096, 4096*4096+4096, 4096*1000+1000.
    assert _per_layer(_param_shapes(models.get("alexnet"))) == {
        "conv1": 34944, "conv2": 614656, "conv3": 885120, "conv4": 1327488, "conv5": 884992,
        "fc6": 37752832, "fc7": 16781312, "fc8": 4097000,
    }


def test_params_are_kernel_and_bias_float32():
    variables = _param_shapes(models.get("vgg16"))
    assert set(variables) == {"params"}
    p = variables["params"]
    assert p["block1_conv1"]["kernel"].shape == (3, 3, 3, 64)
    assert p["fc1"]["kernel"].shape == (25088, 4096)
    assert p["predictions"]["bias"].shape == (1000,)
    assert {x.dtype for x in jax.tree.leaves(p)} == {jnp.dtype("float32")}


# -- layer names and shapes ----------------------------------------------------


def _traced_shapes(model, batch=1):
    x = jnp.zeros((batch, *model.input_shape))

    def run(x):
        variables = model.init(jax.random.key(0), x)
        return models.activations(model, variables, x)

    shapes = jax.eval_shape(run, x)  # a pytree: its dict comes back with sorted keys
    return {name: shapes[name].shape[1:] for name in model.layer_names()}


def test_lenet5_shapes_match_the_lecture():
    shapes = _traced_shapes(models.get("lenet5"))
    assert shapes == {
        "conv1": (28, 28, 6), "pool1": (14, 14, 6), "conv2": (10, 10, 16),
        "pool2": (5, 5, 16), "conv3": (1, 1, 120), "flatten": (120,), "fc1": (84,),
        "fc2": (10,),
    }


def test_alexnet_spatial_chain_227_55_27_13_6():
    model = models.get("alexnet")
    shapes = _traced_shapes(model)
    assert shapes == model.output_shapes()
    assert [shapes[k][0] for k in ("conv1", "pool1", "conv2", "pool2", "conv5", "pool5")] == [
        55, 27, 27, 13, 13, 6]
    assert list(shapes) == ["conv1", "lrn1", "pool1", "conv2", "lrn2", "pool2", "conv3",
                            "conv4", "conv5", "pool5", "flatten", "fc6", "dropout6", "fc7",
                            "dropout7", "fc8"]
    assert shapes["flatten"] == (9216,)


def _keras_vgg_names(blocks):
    names = []
    for b, n in enumerate(blocks, start=1):
        names += [f"block{b}_conv{i}" for i in range(1, n + 1)] + [f"block{b}_pool"]
    return names + ["flatten", "fc1", "fc2", "predictions"]


@pytest.mark.parametrize("name, blocks", [("vgg16", (2, 2, 3, 3, 3)),
                                          ("vgg19", (2, 2, 4, 4, 4))])
def test_vgg_keras_names_and_shapes(name, blocks):
    model = models.get(name)
    shapes = _traced_shapes(model)
    assert list(shapes) == _keras_vgg_names(blocks)
    assert list(_param_shapes(model)["params"]) == [
        n for n in _keras_vgg_names(blocks) if "conv" in n or n[:2] in ("fc", "pr")]
    assert [shapes[f"block{b}_pool"][0] for b in range(1, 6)] == [112, 56, 28, 14, 7]
    assert shapes["block1_conv1"] == (224, 224, 64)
    assert shapes["block5_pool"] == (7, 7, 512)
    assert shapes["predictions"] == (1000,)


def test_allconv_shapes():
    shapes = _traced_shapes(models.get("allconv"))
    assert [shapes[f"conv{i}"][:2] for i in range(1, 10)] == [
        (32, 32), (32, 32), (16, 16), (16, 16), (16, 16), (8, 8), (6, 6), (6, 6), (6, 6)]
    assert shapes["global_avg_pool"] == (10,)
    assert {"dropout0", "dropout3", "dropout6"} <= set(shapes)


@pytest.mark.parametrize("pooling, shape", [(None, (7, 7, 512)), ("avg", (512,)),
                                            ("max", (512,))])
def test_vgg_without_top(pooling, shape):
    model = models.get("vgg16", include_top=False, pooling=pooling)
    assert list(model.output_shapes().values())[-1] == shape


def test_too_small_input_names_the_first_empty_layer():
    with pytest.raises(ShapeError, match="block5_pool"):
        models.get("vgg16", input_shape=(16, 16, 3))
    with pytest.raises(ShapeError, match="conv1.*54.25"):
        models.get("alexnet", input_shape=(224, 224, 3))
    model = models.get("vgg16", include_top=False, input_shape=(32, 32, 3))
    with pytest.raises(ShapeError, match="block5_pool"):
        model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def test_wrong_input_is_a_value_error():
    model = models.get("lenet5")
    with pytest.raises(ValueError, match="channels"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="input_shape"):
        model.init(jax.random.key(0), jnp.zeros((1, 36, 36, 1)))
    with pytest.raises(ValueError, match="4-D"):
        model.init(jax.random.key(0), jnp.zeros((32, 32, 1)))


# -- forward passes ------------------------------------------------------------


@pytest.fixture(scope="module")
def lenet():
    model = models.get("lenet5")
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 1))
    return model, jax.jit(model.init)(jax.random.key(0), x), x


def test_lenet5_forward_and_intermediates(lenet):
    model, variables, x = lenet
    assert set(variables) == {"params"}
    logits = model.apply(variables, x, train=False)
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    out, state = model.apply(variables, x, mutable=["intermediates"])
    np.testing.assert_array_equal(out, logits)
    acts = models.activations(model, variables, x)
    assert list(acts) == ["conv1", "pool1", "conv2", "pool2", "conv3", "flatten", "fc1", "fc2"]
    np.testing.assert_array_equal(acts["fc2"], logits)
    np.testing.assert_array_equal(state["intermediates"]["conv1"]["output"], acts["conv1"])
    # conv1 is tanh(conv): bounded
    assert np.abs(acts["conv1"]).max() <= 1.0


def test_classifier_activation_softmax(lenet):
    model, variables, x = lenet
    probs = models.get("lenet5", classifier_activation="softmax").apply(variables, x)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs, jax.nn.softmax(model.apply(variables, x)), rtol=1e-5)


def test_bfloat16_compute(lenet):
    model, variables, x = lenet
    bf = models.get("lenet5", dtype=jnp.bfloat16)
    logits = bf.apply(variables, x)
    assert logits.dtype == jnp.float32
    assert models.activations(bf, variables, x)["conv1"].dtype == jnp.bfloat16
    np.testing.assert_allclose(logits, model.apply(variables, x), atol=0.05)


def test_dropout_only_in_train_mode(lenet):
    _, variables, x = lenet
    model = models.get("lenet5", dropout_rate=0.5)
    assert "dropout1" in model.layer_names()
    apply = jax.jit(model.apply, static_argnames="train")
    eval_out = apply(variables, x, train=False)
    np.testing.assert_allclose(eval_out, models.get("lenet5").apply(variables, x), atol=1e-5)
    a = apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    b = apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, eval_out) and not np.allclose(a, b)
    with pytest.raises(Exception, match="dropout"):
        model.apply(variables, x, train=True)


def test_allconv_forward_and_dropout():
    model = models.get("allconv")
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = {"params": _numpy_params(model, dtype=jnp.float32)}
    apply = jax.jit(model.apply, static_argnames="train")
    y = apply(variables, x, train=False)
    assert y.shape == (2, 10)
    np.testing.assert_array_equal(y, apply(variables, x, train=False))
    y_train = apply(variables, x, train=True, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(y, y_train)


def test_alexnet_forward_batch_1():
    model = models.get("alexnet", num_classes=10)
    x = jax.random.normal(jax.random.key(1), (1, 227, 227, 3))
    variables = {"params": _numpy_params(model, dtype=jnp.float32)}
    acts = jax.jit(lambda v, x: models.activations(model, v, x))(variables, x)
    assert acts["fc8"].shape == (1, 10)
    assert acts["pool5"].shape == (1, 6, 6, 256)
    assert np.all(np.isfinite(acts["fc8"]))
    assert np.all(np.asarray(acts["conv1"]) >= 0)  # ReLU


def test_vgg16_forward_small_input_without_top():
    model = models.get("vgg16", include_top=False, input_shape=(32, 32, 3))
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = {"params": _numpy_params(model, dtype=jnp.float32)}
    y = jax.jit(model.apply)(variables, x)
    assert y.shape == (2, 1, 1, 512) and np.all(np.isfinite(y))
    assert _count(variables) == 14_714_688  # conv parameters do not depend on the input size


# -- float64 gradient spot checks ----------------------------------------------


def _numpy_params(model, input_shape=None, seed=0, dtype=jnp.float64):
    """Parameters drawn with numpy from the traced shapes (no init to compile)."""
    rng = np.random.default_rng(seed)
    shapes = _param_shapes(model, input_shape)["params"]

    def draw(s):
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 10
        return jnp.asarray(rng.standard_normal(s.shape) * np.sqrt(1.0 / fan_in), dtype)

    return jax.tree.map(draw, shapes)


def _directional_check(model, input_shape, n_classes, seed=0):
    """<grad L, v> against the central difference (L(p + eps v) - L(p - eps v)) / 2 eps."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((2, *input_shape)))
    labels = jnp.arange(2) % n_classes
    params = _numpy_params(model, input_shape, seed)
    v = _numpy_params(model, input_shape, seed + 1)

    def loss(p):
        out = model.apply({"params": p}, x)
        out = out.reshape(out.shape[0], -1)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), labels[:, None], 1))

    loss = jax.jit(loss)
    grads = jax.jit(jax.grad(loss))(params)
    # ReLU kinks: a larger step lets some pre-activations change sign (2% off at 1e-5
    # for All-CNN); at 1e-7 the float64 central difference still has ~9 good digits.
    eps = 1e-7
    shift = jax.jit(lambda p, d, s: jax.tree.map(lambda a, b: a + s * b, p, d))
    numeric = (loss(shift(params, v, eps)) - loss(shift(params, v, -eps))) / (2 * eps)
    analytic = sum(float(np.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads),
                                                          jax.tree.leaves(v), strict=True))
    assert all(g.dtype == jnp.float64 for g in jax.tree.leaves(grads))
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads))
    np.testing.assert_allclose(analytic, float(numeric), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "name, kwargs, input_shape",
    [
        ("lenet5", {}, (32, 32, 1)),
        ("allconv", {"input_shape": (12, 12, 3)}, (12, 12, 3)),
        ("alexnet", {"input_shape": (67, 67, 3), "num_classes": 5}, (67, 67, 3)),
        ("vgg16", {"include_top": False, "pooling": "avg", "input_shape": (32, 32, 3)},
         (32, 32, 3)),
    ],
)
def test_gradients_float64(x64, name, kwargs, input_shape):
    model = models.get(name, **kwargs)
    _directional_check(model, input_shape, kwargs.get("num_classes", 10))


@pytest.mark.slow
def test_gradients_float64_vgg19(x64):
    model = models.get("vgg19", include_top=True, num_classes=3, input_shape=(32, 32, 3))
    _directional_check(model, (32, 32, 3), 3)


def test_lenet5_check_grads_wrt_input(x64):
    from jax.test_util import check_grads

    model = models.get("lenet5")
    x = jax.random.normal(jax.random.key(0), (1, 32, 32, 1), jnp.float64)
    variables = jax.tree.map(lambda p: p.astype(jnp.float64),
                             model.init(jax.random.key(1), x.astype(jnp.float32)))
    check_grads(jax.jit(lambda x: model.apply(variables, x).sum()), (x,), order=1,
                modes=["rev"])
