"""TransferModel: the lecture's summary, one freeze spec for summary/optimizer/model, freezing."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from test_weights import _random_params, write_keras_h5

import cnnjax
from cnnjax import models, weights
from cnnjax.models import TransferModel, trainable_mask
from cnnjax.ops import conv as conv_module
from cnnjax.train import loop, optim
from cnnjax.train.config import load_config_file
from cnnjax.train.steps import masked_metrics

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"


def _small(**kwargs):
    kwargs = {"base": "lenet5", "head": (16,), "input_shape": (32, 32, 1), **kwargs}
    return models.get("transfer", **kwargs)


def test_vgg16_transfer_summary_is_the_lecture_table():
    model = models.get("vgg16_transfer")
    assert isinstance(model, TransferModel)
    s = cnnjax.summary(model, (224, 224, 3))
    assert [(r.name, r.output_shape_text, r.params) for r in s.rows] == [
        ("vgg16", "(None, 7, 7, 512)", 14_714_688),
        ("flatten", "(None, 25088)", 0),
        ("dense_1", "(None, 4096)", 102_764_544),
        ("dense_2", "(None, 4096)", 16_781_312),
        ("predictions", "(None, 1)", 4_097),
    ]
    assert (s.total_params, s.trainable_params, s.non_trainable_params) == (
        134_264_641, 119_549_953, 14_714_688)
    text = str(s)
    for line in ("Total params: 134264641 (512.18 MB)", "Trainable params: 119549953 (456.05 MB)",
                 "Non-trainable params: 14714688 (56.13 MB)"):
        assert line in text


def test_fine_tuning_block5_mask_is_what_summary_counts():
    model = models.get("vgg16_transfer", freeze=["block1", "block2", "block3", "block4"])
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    mask = trainable_mask(model, abstract["params"])
    assert mask["vgg16"]["block4_conv3"]["kernel"] is False
    assert mask["vgg16"]["block5_conv1"]["kernel"] is True
    assert mask["dense_1"]["kernel"] is True
    counted = sum(int(np.prod(p.shape)) for p, t in zip(
        jax.tree.leaves(abstract["params"]), jax.tree.leaves(mask), strict=True) if t)
    block5 = 3 * (3 * 3 * 512 * 512 + 512)
    s = cnnjax.summary(model, (224, 224, 3))
    assert s.trainable_params == counted == 119_549_953 + block5
    assert cnnjax.summary(models.get("vgg16_transfer", freeze="none")).non_trainable_params == 0


def test_arguments_are_checked():
    with pytest.raises(ValueError, match=r"match no layer of vgg16 without top; use prefixes "
                                         r"\['block1'"):
        models.get("vgg16_transfer", freeze=["block9"])
    with pytest.raises(ValueError, match="freeze must be 'base', 'none'"):
        models.get("vgg16_transfer", freeze="everything")
    with pytest.raises(ValueError, match="head must be a sequence of positive"):
        models.get("vgg16_transfer", head=(0,))
    with pytest.raises(ValueError, match="unknown argument"):
        models.get("vgg16_transfer", colour="red")
    assert models.get("vgg16_transfer", num_classes=2).num_outputs == 1
    assert models.get("vgg16_transfer", num_classes=10).num_outputs == 10


def test_frozen_base_gets_no_gradient_and_no_backward_pass():
    x = jnp.ones((2, 32, 32, 1))

    def convs(freeze):
        """(grads, convolutions, matrix products) of the gradient program."""
        model = _small(freeze=freeze)
        variables = jax.jit(model.init)(jax.random.key(0), x)
        grad = jax.jit(jax.grad(lambda p: model.apply({"params": p}, x).sum()))
        program = grad.lower(variables["params"]).as_text()
        return (grad(variables["params"]), program.count("stablehlo.convolution"),
                program.count("stablehlo.dot_general"))

    grads, n_frozen, dots_frozen = convs("base")
    assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree.leaves(grads["lenet5"]))
    assert float(jnp.abs(grads["dense_1"]["kernel"]).sum()) > 0
    # conv1 and conv2 forward only (conv3's 5x5 filter covers its 5x5 input: a matrix
    # product; where the backend takes conv1's 25 columns as a direct sum, or conv2
    # as the banded product, that layer is no convolution either)
    direct = conv_module._pick_forward("auto", (5, 5, 1, 6)) == "direct"
    banded = conv_module._pick_forward("auto", (5, 5, 6, 16), pads=((0, 0), (0, 0)),
                                       out_w=10) == "banded"
    assert n_frozen == (0 if direct else 1) + (0 if banded else 1)
    _, n_all, dots_all = convs("none")
    # Trained, the base adds its weight and input gradients (on CPU small layers
    # take them as matrix products, elsewhere as convolutions).
    assert n_all + dots_all > n_frozen + dots_frozen
    grads, _, _ = convs(["conv1", "conv2"])
    assert float(jnp.abs(grads["lenet5"]["conv1"]["kernel"]).sum()) == 0
    assert float(jnp.abs(grads["lenet5"]["conv3"]["kernel"]).sum()) > 0


def test_optimizer_keeps_no_state_for_frozen_params():
    model = _small()
    params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 32, 32, 1)))["params"]
    config = ml_collections.ConfigDict({"optimizer": "adam", "weight_decay": 0.0})
    plain = optax.adam(1e-3)
    tx = optim.with_frozen(optim.make_optimizer(config, optax.constant_schedule(1e-3)), model)
    state_size = sum(x.size for x in jax.tree.leaves(tx.init(params)))
    head = sum(x.size for k, v in params.items() if k != "lenet5" for x in jax.tree.leaves(v))
    assert 2 * head <= state_size <= 2 * head + 4  # Adam's mu and nu of the head, step counts
    assert sum(x.size for x in jax.tree.leaves(plain.init(params))) > state_size
    assert optim.with_frozen(plain, models.get("lenet5")) is plain


def test_binary_cross_entropy_from_one_logit():
    logits = jnp.array([[2.0], [-1.0], [0.5]])
    labels = jnp.array([1, 1, 0])
    mask = jnp.array([True, True, False])
    loss, metrics = masked_metrics(logits, labels, mask, with_top5=True)
    expected = optax.sigmoid_binary_cross_entropy(jnp.array([2.0, -1.0]), jnp.array([1.0, 1.0]))
    np.testing.assert_allclose(loss, expected.mean(), rtol=1e-6)
    assert float(metrics["correct"]) == 1.0 and "top5_correct" not in metrics


def test_demo_training_keeps_the_base_bit_for_bit(tmp_path):
    config = load_config_file(CONFIGS / "transfer_digits_demo.py")
    config.num_epochs = 1
    config.stop_after_steps = 4
    config.progress_bar = False
    config.compilation_cache_dir = ""
    model = loop.build_model(config, 10)
    assert isinstance(model, TransferModel) and model.num_outputs == 1
    state0 = jax.jit(lambda key: loop.create_state(
        model, optax.adam(1e-3), key, (32, 32, 1)))(jax.random.PRNGKey(config.seed))
    result = loop.train_and_evaluate(config, str(tmp_path))
    after = jax.device_get(result["params"])
    before = jax.device_get(state0.params)
    for a, b in zip(jax.tree.leaves(after["lenet5"]), jax.tree.leaves(before["lenet5"]),
                    strict=True):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert not np.array_equal(after["dense_1"]["kernel"], before["dense_1"]["kernel"])
    assert not np.array_equal(after["predictions"]["bias"], before["predictions"]["bias"])
    assert result["step"] == 4 and 0.0 <= result["test_accuracy"] <= 1.0
    # The run restores for evaluation and pictures (frozen optimizer state included).
    from cnnjax import viz

    run = viz.restore_run(tmp_path)
    assert run["step"] == 4
    for a, b in zip(jax.tree.leaves(jax.device_get(run["variables"]["params"])),
                    jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loop.evaluate(None, str(tmp_path))["test_accuracy"] == result["test_accuracy"]


def test_keras_notop_weights_load_into_the_base(tmp_path, rng):
    base = models.get("lenet5", include_top=False)
    base_params = _random_params(base, rng)
    path = tmp_path / "lenet_notop.h5"
    write_keras_h5(path, base_params, base.layer_names())
    model, variables = models.pretrained("transfer", path, base="lenet5", head=(16,),
                                         input_shape=(32, 32, 1))
    for name, p in base_params.items():
        np.testing.assert_array_equal(variables["params"]["lenet5"][name]["bias"], p["bias"])
    assert variables["params"]["dense_1"]["kernel"].shape == (120, 16)
    # A file with the classifier loads too: its feature layers fill the base.
    full = models.get("lenet5")
    full_params = _random_params(full, rng)
    write_keras_h5(tmp_path / "lenet.h5", full_params, full.layer_names())
    params = weights.load_into(variables["params"], model, tmp_path / "lenet.h5")
    assert sorted(params["lenet5"]) == ["conv1", "conv2", "conv3"]
    np.testing.assert_array_equal(params["lenet5"]["conv3"]["kernel"],
                                  full_params["conv3"]["kernel"])
    with pytest.raises(weights.WeightsError, match="does not fit"):
        weights.load_into(variables["params"], _small(base="allconv", input_shape=(32, 32, 3)),
                          path)


def test_config_fields_reach_the_model():
    config = load_config_file(CONFIGS / "vgg16_transfer_cats_vs_dogs.py")
    config.freeze = "block1,block2,block3,block4"
    model = loop.build_model(config, 2)
    assert model.freeze == ("block1", "block2", "block3", "block4") and model.num_outputs == 1
    config = load_config_file(CONFIGS / "lenet5_digits.py")
    config.freeze = "base"
    with pytest.raises(ValueError, match="apply to transfer models only"):
        loop.build_model(config, 10)
