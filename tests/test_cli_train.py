"""`cnnjax train` / `cnnjax eval` and the --config.field=value overrides."""

from __future__ import annotations

import os

import pytest

from cnnjax import cli
from cnnjax.train.config import (
    ConfigError,
    apply_overrides,
    default_config,
    split_override_args,
)


def test_split_override_args_both_spellings():
    rest, overrides = split_override_args(
        ["train", "--config.num_epochs=3", "--workdir", "w", "--config.augment.rotation", "10"])
    assert rest == ["train", "--workdir", "w"]
    assert overrides == [("num_epochs", "3"), ("augment.rotation", "10")]


def test_overrides_are_parsed_by_the_field_type():
    config = apply_overrides(default_config(), [
        ("num_epochs", "3"), ("learning_rate", "3e-3"), ("augment.rotation", "10"),
        ("augment.hflip", "true"), ("nesterov", "1"), ("decay_epochs", "(5, 8)"),
        ("image_shape", "32,32,1"), ("optimizer", "sgd"), ("batch_size", "64.0")])
    assert config.num_epochs == 3 and isinstance(config.num_epochs, int)
    assert config.learning_rate == 3e-3
    assert config.augment.rotation == 10.0 and isinstance(config.augment.rotation, float)
    assert config.augment.hflip is True and config.nesterov is True
    assert config.decay_epochs == (5, 8) and config.image_shape == (32, 32, 1)
    assert config.optimizer == "sgd" and config.batch_size == 64
    assert default_config().num_epochs != 3 or True  # the default is untouched


@pytest.mark.parametrize("field, value, message", [
    ("batch_sise", "3", r"unknown config field --config\.batch_sise; did you mean "
                        r"--config\.batch_size"),
    ("augment.rotaton", "3", r"did you mean --config\.augment\.rotation"),
    ("augmnt.rotation", "3", r"unknown config field --config\.augmnt"),
    ("num_epochs", "three", r"--config\.num_epochs='three' is not an integer"),
    ("num_epochs", "2.5", r"is not an integer"),
    ("augment.hflip", "maybe", r"is not a boolean"),
    ("learning_rate", "fast", r"is not a number"),
    ("augment", "1", r"is a group of fields"),
])
def test_override_errors_are_one_sentence(field, value, message):
    with pytest.raises(ConfigError, match=message) as info:
        apply_overrides(default_config(), [(field, value)])
    assert "\n" not in str(info.value)


def test_cli_unknown_field_exits_2_without_traceback(capsys):
    assert cli.main(["train", "--config.num_epoch=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config field --config.num_epoch; did you mean "
                          "--config.num_epochs") and "Traceback" not in err


def test_cli_missing_config_file(capsys, tmp_path):
    assert cli.main(["train", "--config", str(tmp_path / "nope.py")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_override_without_value():
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--config.num_epochs"])
    assert info.value.code == 2


def test_cli_eval_without_checkpoint(capsys, tmp_path):
    assert cli.main(["eval", "--workdir", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_cli_train_default_workdir_then_eval(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--config.num_epochs=1", "--config.learning_rate=3e-3",
                     "--config.progress_bar=false"]) == 0
    out = capsys.readouterr().out
    assert "lenet5 on digits: test_accuracy" in out and "after 44 steps" in out
    workdir = os.path.join("runs", "lenet5_digits")
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "44"))
    assert cli.main(["eval", "--workdir", workdir]) == 0
    first = capsys.readouterr().out
    assert "checkpoint step 44: test_loss" in first
    # Overrides apply to the config stored with the checkpoint.
    assert cli.main(["eval", "--workdir", workdir, "--config.eval_batch_size=128"]) == 0
    assert capsys.readouterr().out == first
    assert cli.main(["eval", "--workdir", workdir, "--config.eval_batch_sise=128"]) == 2
