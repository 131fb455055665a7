"""Bad input everywhere a user touches: one sentence naming the field and a fix.

One table of command lines: each must exit with status 2, print exactly one
``error:`` line that matches the expected text, and no traceback. A few cases
go through the library instead (a researcher's call), and two through a real
``cnnjax`` process (more devices; ``--debug``).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from cnnjax import cli, models
from cnnjax.train import CheckpointError, default_config, train_and_evaluate

FAST = ["--config.progress_bar=false", "--config.num_epochs=1"]


@pytest.fixture(autouse=True)
def fresh_cli_logging():
    """The CLI's log handler writes to the stderr of the test that created it: drop it."""
    logger = logging.getLogger("cnnjax")
    propagate = logger.propagate
    for handler in [h for h in logger.handlers if getattr(h, "_cnnjax_cli", False)]:
        logger.removeHandler(handler)
    yield
    for handler in [h for h in logger.handlers if getattr(h, "_cnnjax_cli", False)]:
        logger.removeHandler(handler)
    logger.propagate = propagate  # (the CLI turns it off; caplog elsewhere needs it)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LeNet-5 workdir with a checkpoint at step 2 (for eval and mismatch cases)."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    config = default_config()
    config.progress_bar, config.stop_after_steps = False, 2
    train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    return str(path)


# (id, argv (WORKDIR, TRAINED, FILE are substituted), regex the error line must match)
CASES = [
    ("unknown model", ["train", "--config.model=lenet"],
     r"--config\.model='lenet' is unknown; did you mean --config\.model=lenet5\?"),
    ("unknown model 2", ["train", "--config.model=vgg_16"],
     r"did you mean --config\.model=vgg16\?"),
    ("unknown dataset", ["train", "--config.dataset=digit"],
     r"--config\.dataset='digit' is unknown; did you mean --config\.dataset=digits\?"),
    ("unknown tfds dataset", ["train", "--config.dataset=tfds:mnits"],
     r"tfds has no dataset called 'mnits'; did you mean --config\.dataset=tfds:mnist\?"),
    ("unknown field", ["train", "--config.batch_sise=32"],
     r"unknown config field --config\.batch_sise; did you mean --config\.batch_size"),
    ("unknown nested field", ["train", "--config.augment.rotaton=3"],
     r"did you mean --config\.augment\.rotation"),
    ("int field given text", ["train", "--config.num_epochs=three"],
     r"--config\.num_epochs='three' is not an integer"),
    ("bool field given text", ["train", "--config.progress_bar=maybe"],
     r"--config\.progress_bar='maybe' is not a boolean"),
    ("float field given text", ["train", "--config.learning_rate=fast"],
     r"--config\.learning_rate='fast' is not a number"),
    ("learning rate 0", ["train", "--config.learning_rate=0"],
     r"--config\.learning_rate=0\.0 must be > 0; e\.g\. --config\.learning_rate=1e-3"),
    ("learning rate < 0", ["train", "--config.learning_rate=-0.1"],
     r"--config\.learning_rate=-0\.1 must be > 0"),
    ("batch size 0", ["train", "--config.batch_size=0"],
     r"batch_size=0 must be a positive multiple of the device count .* "
     r"--config\.batch_size=32"),
    ("eval batch size < 0", ["train", "--config.eval_batch_size=-8"],
     r"eval_batch_size=-8 must be a positive multiple"),
    ("no epochs", ["train", "--config.num_epochs=0"], r"--config\.num_epochs=0 must be > 0"),
    ("image too small for the model", ["train", "--config.image_shape=16,16,1"],
     r"conv3: .* larger than the padded input .* use a larger input"),
    ("image with 2 channels", ["train", "--config.image_shape=32,32,2"],
     r"image_shape=\(32, 32, 2\) must be .* 1 or 3 channels, e\.g\. \(32, 32, 1\)"),
    ("image shape of 2 numbers", ["train", "--config.image_shape=32,32"],
     r"--config\.image_shape=\(32, 32\) must be three positive integers"),
    ("crop larger than the image", ["train", "--config.image_shape=32,32,1",
                                    "--config.augment.crop=40"],
     r"--config\.augment\.crop=40 is larger than the image \(32x32\); e\.g\. "
     r"--config\.augment\.crop=32"),
    ("stride 0 (shape command)", ["shape", "--size", "32", "--kernel", "3", "--stride", "0"],
     r"stride"),
    ("unknown optimizer", ["train", "--config.optimizer=adm"],
     r"did you mean --config\.optimizer=adam\?"),
    ("unknown schedule", ["train", "--config.schedule=cosin"],
     r"did you mean --config\.schedule=cosine\?"),
    ("unknown dtype", ["train", "--config.dtype=float8"], r"--config\.dtype='float8' is unknown"),
    ("unknown image fit", ["train", "--config.image_fit=crop"],
     r"--config\.image_fit='crop' is unknown; known: resize, pad"),
    ("momentum >= 1", ["train", "--config.momentum=1.5"],
     r"--config\.momentum=1\.5 must be in \[0, 1\); e\.g\. --config\.momentum=0\.9"),
    ("negative weight decay", ["train", "--config.weight_decay=-1"],
     r"--config\.weight_decay=-1\.0 must be >= 0"),
    ("dropout >= 1", ["train", "--config.dropout_rate=1.5"],
     r"--config\.dropout_rate=1\.5 must be < 1"),
    ("checkpoint interval 0", ["train", "--config.checkpoint_every_steps=0"],
     r"--config\.checkpoint_every_steps=0 must be > 0"),
    ("log interval 0", ["train", "--config.log_every_steps=0"],
     r"--config\.log_every_steps=0 must be > 0"),
    ("missing tfds data_dir", ["train", "--config.dataset=tfds:mnist",
                               "--config.data_dir=WORKDIR/no_data"],
     r"tfds dataset 'mnist' is not prepared in .*no_data: prepare it with `tfds build mnist"),
    ("missing config file", ["train", "--config", "WORKDIR/nope.py"],
     r"config file .*nope\.py' does not exist; pass the path of a \.py file"),
    ("unwritable workdir", ["train", "--workdir", "FILE/run"],
     r"--workdir '.*a_file/run' cannot be created \(Not a directory\); pass a writable "
     r"--workdir"),
    ("init_from missing", ["train", "--config.init_from=WORKDIR/none"],
     r"--config\.init_from='.*none' is not a directory \(give the workdir of an earlier "
     r"run\)"),
    ("bad coordinator address", ["train", "--config.coordinator_address=nohost"],
     r"--config\.coordinator_address='nohost' is not host:port"),
    ("process id out of range", ["train", "--config.coordinator_address=127.0.0.1:1234",
                                 "--config.num_processes=2", "--config.process_id=2"],
     r"--config\.process_id=2 must be in 0\.\.1"),
    ("eval without checkpoint", ["eval", "--workdir", "WORKDIR"],
     r"no checkpoint in .*; train first with `cnnjax train --workdir"),
    ("eval with another model", ["eval", "--workdir", "TRAINED", "--config.model=allconv"],
     r"does not fit this config's model/optimizer/shapes \(config fields that differ from "
     r"the run that wrote it: .*model 'lenet5' -> 'allconv'.*\); use a new --workdir, or "
     r"start a new run from its matching parameters with --config\.init_from="),
    ("resume with another optimizer", ["train", "--workdir", "TRAINED",
                                       "--config.optimizer=sgd"],
     r"config fields that differ .*optimizer 'adam' -> 'sgd'"),
]
assert len(CASES) >= 25


# A restore that does not fit leaves orbax's read coroutines un-awaited (harmless).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_bad_input_is_one_line_and_status_2(argv, message, capsys, tmp_path, trained,
                                                 a_file):
    argv = [arg.replace("WORKDIR", str(tmp_path)).replace("TRAINED", trained)
            .replace("FILE", a_file) for arg in argv]
    if argv[0] == "train":
        argv[1:1] = FAST  # before the case's own fields, which must win
        if "--workdir" not in argv:
            argv += ["--workdir", str(tmp_path / "run")]
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(message, lines[0]), lines[0]


def test_disk_full_during_a_save_says_so_and_keeps_what_was_saved(
        capsys, tmp_path, monkeypatch):
    """The second checkpoint's write fails with ENOSPC (simulated)."""
    real = ocp.JsonCheckpointHandler._save_fn
    calls = []

    def full_disk(self, x, directory):
        calls.append(str(directory))
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return real(self, x, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full_disk)
    workdir = str(tmp_path / "run")
    code = cli.main(["train", "--workdir", workdir, "--config.stop_after_steps=10",
                     "--config.checkpoint_every_steps=5", *FAST])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(r"error: the disk is full: saving the checkpoint at step 10 to .* failed "
                     r"\(.*\); the checkpoints saved before \(newest: step 5\) are intact; "
                     r"free some space", lines[0]), lines[0]
    monkeypatch.undo()
    config = default_config()
    config.progress_bar, config.stop_after_steps, config.num_epochs = False, 5, 1
    assert train_and_evaluate(config, workdir)["step"] == 5  # step 5 reads back


@pytest.mark.parametrize("call, message", [
    (lambda: models.get("lenet5").init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))),
     r"LeNet5: x has 3 channels but input_shape is \(32, 32, 1\); pass input_shape="),
    (lambda: models.get("lenett"), r"unknown model 'lenett'; available: .*lenet5"),
    (lambda: models.from_pattern("INPUT -> CONV(stride=0) -> FC"),
     r"stride must be a positive integer .* got 0"),
    (lambda: models.get("alexnet", input_shape=(224, 224, 3)),
     r"conv1: \(224 - 11 \+ 2\*0\) / 4 \+ 1 = 54\.25 is not an integer; use input 223 or "
     r"input 227"),
], ids=["wrong channels", "unknown model", "pattern stride 0", "alexnet 224"])
def test_library_bad_input_is_a_value_error_naming_the_fix(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert re.search(message, str(info.value).splitlines()[0]), str(info.value)


def test_restoring_another_shape_in_the_library_names_the_fields(trained, monkeypatch):
    # The shapes are compared with the stored metadata first: no array is read (orbax's
    # restore, stopped by a mismatch, left its reads un-awaited).
    reads = []
    restore = ocp.CheckpointManager.restore

    def spy(self, step, *a, args=None, **k):
        if args is not None and "state" in args:  # not the small JSON config item
            reads.append(step)
        return restore(self, step, *a, args=args, **k)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", spy)
    config = default_config()
    config.progress_bar, config.stop_after_steps, config.image_shape = False, 2, (36, 36, 1)
    with pytest.raises(CheckpointError, match=r"image_shape \(\) -> \(36, 36, 1\)"):
        train_and_evaluate(config, trained)
    assert reads == []


@pytest.mark.slow
def test_batch_not_divisible_by_devices_in_a_real_process_and_debug_traceback(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    base = [sys.executable, "-m", "cnnjax.cli", "train", "--workdir", str(tmp_path),
            "--config.batch_size=30", *FAST]
    plain = subprocess.run(base, capture_output=True, text=True, env=env, timeout=180)
    assert plain.returncode == 2, plain.stderr
    assert plain.stderr.strip() == (
        "error: batch_size=30 does not split evenly over 4 devices; use a multiple of 4, "
        "e.g. --config.batch_size=28."), plain.stderr
    debug = subprocess.run([*base, "--debug"], capture_output=True, text=True, env=env,
                           timeout=180)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "does not split evenly over 4 devices" in debug.stderr
