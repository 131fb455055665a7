"""Keras-style summaries against the lecture's tables (traced with eval_shape: no init)."""

from __future__ import annotations

import flax.linen as nn
import pytest

import cnnjax
from cnnjax import layers as L
from cnnjax import models
from cnnjax.cli import main
from cnnjax.shapes import ShapeError
from cnnjax.summary import Summary, format_bytes, summary


def test_exported_as_cnnjax_summary():
    assert cnnjax.summary is summary


def test_lenet5_matches_the_lecture_table():
    s = summary(models.get("lenet5"), (32, 32, 1))
    assert isinstance(s, Summary)
    assert [(r.name, r.type, r.output_shape_text, r.params) for r in s.rows] == [
        ("conv1", "Conv", "(None, 28, 28, 6)", 156),
        ("pool1", "AvgPool", "(None, 14, 14, 6)", 0),
        ("conv2", "Conv", "(None, 10, 10, 16)", 2416),
        ("pool2", "AvgPool", "(None, 5, 5, 16)", 0),
        ("conv3", "Conv", "(None, 1, 1, 120)", 48120),
        ("flatten", "Flatten", "(None, 120)", 0),
        ("fc1", "Dense", "(None, 84)", 10164),
        ("fc2", "Dense", "(None, 10)", 850),
    ]
    assert (s.total_params, s.trainable_params, s.non_trainable_params) == (61706, 61706, 0)
    text = str(s)
    for line in ("Total params: 61706 (241.04 KB)", "Trainable params: 61706 (241.04 KB)",
                 "Non-trainable params: 0 (0.00 Byte)", "Layer (type)", "Output Shape",
                 "Param #"):
        assert line in text
    conv1 = next(line for line in text.splitlines() if "conv1 (Conv)" in line)
    assert conv1.split() == ["conv1", "(Conv)", "(None,", "28,", "28,", "6)", "156"]


class _TransferHead(nn.Module):
    """The lecture's transfer-learning model: frozen VGG-16 base, new dense head."""

    @nn.compact
    def __call__(self, x):
        x = models.vgg16(include_top=False, name="vgg16")(x)
        x = L.Flatten(name="flatten")(x)
        x = L.Dense(4096, activation="relu", name="dense_4")(x)
        x = L.Dense(4096, activation="relu", name="dense_5")(x)
        return L.Dense(1, activation="sigmoid", name="dense_6")(x)


@pytest.mark.parametrize("how", [
    {"frozen": {"vgg16"}},
    {"trainable": {"flatten", "dense_4", "dense_5", "dense_6"}},
    {"trainable": lambda path: path[0] != "vgg16"},
])
def test_transfer_learning_table(how):
    s = summary(_TransferHead(), (224, 224, 3), **how)
    assert [(r.name, r.output_shape_text, r.params) for r in s.rows] == [
        ("vgg16", "(None, 7, 7, 512)", 14714688),
        ("flatten", "(None, 25088)", 0),
        ("dense_4", "(None, 4096)", 102764544),
        ("dense_5", "(None, 4096)", 16781312),
        ("dense_6", "(None, 1)", 4097),
    ]
    text = str(s)
    assert "Total params: 134264641 (512.18 MB)" in text
    assert "Trainable params: 119549953 (456.05 MB)" in text
    assert "Non-trainable params: 14714688 (56.13 MB)" in text


@pytest.mark.parametrize("name, total", [("vgg16", 138357544), ("vgg19", 143667240),
                                         ("alexnet", 62378344), ("allconv", 1369738)])
def test_big_models_are_summarized_from_shapes(name, total):
    s = summary(models.get(name))
    assert s.total_params == total == sum(r.params for r in s.rows)


def test_vgg16_rows_and_other_input_size():
    s = summary(models.get("vgg16", include_top=False), (64, 64, 3))
    assert s.rows[0].name == "block1_conv1" and s.rows[0].output_shape == (1, 64, 64, 64)
    assert s.rows[-1].output_shape_text == "(None, 2, 2, 512)"
    assert s.total_params == 14714688


def test_too_small_input_names_the_first_empty_layer():
    with pytest.raises(ShapeError, match="block5_pool"):
        summary(models.get("vgg16"), (16, 16, 3))


def test_argument_errors():
    with pytest.raises(ValueError, match="input_shape"):
        summary(L.Dense(3))
    with pytest.raises(ValueError, match="trainable or frozen"):
        summary(models.get("lenet5"), trainable={"conv1"}, frozen={"conv2"})
    with pytest.raises(ValueError, match="frozen"):
        summary(models.get("lenet5"), frozen="conv1")


@pytest.mark.parametrize("n, text", [(0, "0.00 Byte"), (1000, "1000.00 Byte"),
                                     (246824, "241.04 KB"), (537058564, "512.18 MB"),
                                     (3 * 1024**3, "3.00 GB")])
def test_format_bytes_like_keras(n, text):
    assert format_bytes(n) == text


def test_cli_summary_every_model(capsys):
    for name in models.available():
        assert main(["summary", name]) == 0
        out = capsys.readouterr().out
        assert "Total params:" in out
    assert main(["summary", "lenet5"]) == 0
    assert "Total params: 61706 (241.04 KB)" in capsys.readouterr().out


def test_cli_summary_options_and_errors(capsys):
    assert main(["summary", "lenet5", "--num-classes", "5"]) == 0
    assert "(None, 5)" in capsys.readouterr().out
    assert main(["summary", "vgg16", "--input-shape", "32,32,3", "--num-classes", "2"]) == 0
    assert "(None, 1, 1, 512)" in capsys.readouterr().out
    assert main(["summary", "vgg16", "--input-shape", "16,16,3"]) == 2
    assert "block5_pool" in capsys.readouterr().err
    assert main(["summary", "vgg16", "--input-shape", "16x16"]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert main(["summary", "resnet"]) == 2
    assert "available" in capsys.readouterr().err
