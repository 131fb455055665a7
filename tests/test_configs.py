"""Every experiment config loads, uses only known fields and names real models/datasets."""

from __future__ import annotations

import pathlib

import pytest

from cnnjax import models
from cnnjax.train.config import default_config, load_config_file

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.py"))
REQUIRED = {"lenet5_digits", "lenet5_mnist", "allconv_cifar10", "alexnet_imagenet",
            "vgg16_imagenet", "vgg19_imagenet"}


def _fields(config, prefix=""):
    out = set()
    for key, value in config.items():
        out.add(prefix + key)
        if hasattr(value, "items"):
            out |= _fields(value, prefix + key + ".")
    return out


def test_required_configs_exist():
    assert REQUIRED <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_with_known_names(path):
    config = load_config_file(path)
    assert _fields(config) == _fields(default_config()), "configs only override known fields"
    assert config.model in models.available()
    assert config.dataset in ("digits", "synthetic") or config.dataset.startswith("tfds:")
    assert config.optimizer in ("sgd", "adam", "adamw")
    assert config.dtype in ("float32", "bfloat16")
    text = path.read_text()
    assert "cnnjax train" in text and "Expected result" in text


def test_default_config_is_the_digits_file():
    assert (load_config_file(CONFIG_DIR / "lenet5_digits.py").to_dict()
            == default_config().to_dict())
