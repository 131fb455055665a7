"""The training system end to end: digits, mock tfds, resume, devices, compile-once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from cnnjax.train import default_config, evaluate, optim, train_and_evaluate
from cnnjax.train.loop import NonFiniteLossError


def small_config(**overrides):
    config = default_config()
    config.progress_bar = False
    config.log_every_steps = 10
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("digits")
    config = small_config(num_epochs=4, learning_rate=3e-3)
    return config, str(workdir), train_and_evaluate(config, str(workdir))


def test_digits_reaches_accuracy_and_compiles_once(digits_run):
    _, _, result = digits_run
    assert result["test_accuracy"] >= 0.93, result
    assert result["step"] == 4 * 44 and result["epoch"] == 4
    assert result["train_step_traces"] == 1  # no silent recompiles


def test_metrics_files_and_checkpoint(digits_run):
    _, workdir, result = digits_run
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert all("step" in r and "epoch" in r for r in lines)
    epochs = [r for r in lines if "test_accuracy" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert epochs[-1]["test_accuracy"] == pytest.approx(result["test_accuracy"])
    assert "test_top5_accuracy" not in epochs[-1]  # only when classes > 10
    logged = [r for r in lines if "images_per_sec" in r]
    assert logged and {"train_loss", "train_accuracy", "learning_rate"} <= set(logged[-1])
    assert any(f.startswith("events.out.tfevents") for f in
               os.listdir(os.path.join(workdir, "tensorboard")))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == str(result["step"])


def test_evaluate_scores_the_newest_checkpoint(digits_run):
    _, workdir, result = digits_run
    scores = evaluate(None, workdir)  # the config comes from the checkpoint
    assert scores["step"] == result["step"]
    assert scores["test_accuracy"] == pytest.approx(result["test_accuracy"])


def test_rerun_of_a_finished_run_does_not_train_again(digits_run):
    config, workdir, result = digits_run
    again = train_and_evaluate(config, workdir)
    assert again["step"] == result["step"] and again["train_step_traces"] == 0
    assert_trees_equal(again["params"], result["params"])


def test_resume_after_stop_matches_uninterrupted_run(tmp_path):
    config = small_config(num_epochs=2, checkpoint_every_steps=20,
                          **{"augment.rotation": 5.0, "augment.shift": 0.05})
    whole = train_and_evaluate(config, str(tmp_path / "whole"))

    stopped = config.copy_and_resolve_references()
    stopped.stop_after_steps = 30  # also saves at 30, off the 20-step interval
    first = train_and_evaluate(stopped, str(tmp_path / "parts"))
    assert first["step"] == 30 and first["last_checkpoint_step"] == 30
    second = train_and_evaluate(config, str(tmp_path / "parts"))
    assert second["step"] == whole["step"] == 88
    assert_trees_equal(second["params"], whole["params"])
    lines = [json.loads(line) for line in open(tmp_path / "parts" / "metrics.jsonl")]
    assert [r["step"] for r in lines if "test_accuracy" in r] == [44, 88]


def test_resume_drops_metric_lines_logged_past_the_checkpoint(tmp_path):
    # A run killed after logging past its newest checkpoint: the lines after that
    # checkpoint (and a torn last line) go, the resumed run logs those steps once.
    config = small_config(num_epochs=1, checkpoint_every_steps=20, log_every_steps=5)
    stopped = config.copy_and_resolve_references()
    stopped.stop_after_steps = 20
    train_and_evaluate(stopped, str(tmp_path))
    path = tmp_path / "metrics.jsonl"
    before = path.read_text()
    with open(path, "a") as f:
        f.write(json.dumps({"step": 25, "epoch": 0.6, "train_loss": 9.0}) + "\n")
        f.write('{"step": 30, "train_lo')
    result = train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 44
    text = path.read_text()
    assert text.startswith(before)
    records = [json.loads(line) for line in text.splitlines()]
    # One line of each kind per step (the epoch's summary shares step 44 with the
    # interval line), in step order; the planted step-25 line is gone.
    keys = [(r["step"], tuple(sorted(r))) for r in records]
    assert len(keys) == len(set(keys))
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    assert 25 in [r["step"] for r in records]
    assert all(r["train_loss"] != 9.0 for r in records if "train_loss" in r)


def test_mock_tfds_short_run(tmp_path):
    import tensorflow_datasets as tfds

    config = small_config(dataset="tfds:mnist", num_epochs=1, batch_size=8,
                          eval_batch_size=16, image_fit="pad")
    with tfds.testing.mock_data(num_examples=32):
        result = train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 4 and np.isfinite(result["test_loss"])
    assert 0.0 <= result["test_accuracy"] <= 1.0


def test_non_finite_loss_stops_with_the_step(tmp_path):
    config = small_config(dataset="synthetic", optimizer="sgd", learning_rate=1e38,
                          num_epochs=1, schedule="constant")
    with pytest.raises(NonFiniteLossError, match=r"at step \d+"):
        train_and_evaluate(config, str(tmp_path))
    assert not os.listdir(tmp_path / "checkpoints")  # nothing non-finite was saved


def test_schedules():
    config = small_config(learning_rate=0.1, schedule="step", decay_epochs=(2, 3),
                          decay_factor=0.1, warmup_epochs=1.0)
    lr = optim.make_schedule(config, steps_per_epoch=10, total_steps=40)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.05)
    assert float(lr(15)) == pytest.approx(0.1) and float(lr(25)) == pytest.approx(0.01)
    assert float(lr(35)) == pytest.approx(0.001)
    config.schedule, config.warmup_epochs = "cosine", 0.0
    lr = optim.make_schedule(config, steps_per_epoch=10, total_steps=40)
    assert float(lr(0)) == pytest.approx(0.1) and float(lr(40)) == pytest.approx(0.0)
    config.schedule = "nope"
    with pytest.raises(ValueError, match="schedule 'nope' is unknown"):
        optim.make_schedule(config, 10, 40)


def test_weight_decay_only_on_kernels():
    import jax.numpy as jnp

    config = small_config(optimizer="sgd", momentum=0.0, weight_decay=0.5, learning_rate=1.0)
    tx = optim.make_optimizer(config, optim.make_schedule(config, 1, 1))
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(updates["kernel"][0, 0]) == pytest.approx(-0.5)
    assert float(updates["bias"][0]) == 0.0


_DEVICE_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, jax
    from cnnjax.train import default_config, train_and_evaluate
    config = default_config()
    config.num_epochs, config.progress_bar, config.stop_after_steps = 1, False, 20
    config.augment.rotation, config.augment.shift = 5.0, 0.05
    config.compilation_cache_dir = ""
    result = train_and_evaluate(config, sys.argv[1])
    assert jax.device_count() == int(sys.argv[3]), jax.device_count()
    leaves = [np.asarray(x) for x in jax.tree.leaves(result["params"])]
    np.savez(sys.argv[2], *leaves, acc=result["test_accuracy"])
""")


@pytest.mark.slow
def test_eight_devices_match_one_device(tmp_path):
    outs = {}
    for devices in (1, 8):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   JAX_PLATFORMS="cpu")
        out = tmp_path / f"params{devices}.npz"
        subprocess.run([sys.executable, "-c", _DEVICE_SCRIPT, str(tmp_path / f"w{devices}"),
                        str(out), str(devices)], check=True, env=env, timeout=300)
        outs[devices] = np.load(out)
    one, eight = outs[1], outs[8]
    assert len(one.files) == len(eight.files)
    for name in one.files:
        # float32 sums reduce in another order over 8 devices; Adam's normalization
        # turns those last-bit differences into at most ~1e-5 after 20 steps.
        a, b = one[name], eight[name]
        assert np.abs(a - b).max() < 1e-4, name
        assert np.linalg.norm(a - b) <= 1e-5 * max(np.linalg.norm(a), 1.0), name


def test_bfloat16_compute_keeps_float32_params(tmp_path):
    config = small_config(dataset="synthetic", dtype="bfloat16", stop_after_steps=3)
    result = train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 3 and np.isfinite(result["test_loss"])
    assert {x.dtype for x in jax.tree.leaves(result["params"])} == {np.dtype("float32")}


def test_cpu_compiler_options_drop_the_copies_of_donated_parameters():
    # Without region analysis in copy insertion XLA:CPU copies donated parameters
    # that are read before their in-place update (VGG-16's fc1: 411 MB a step).
    import re

    from cnnjax import bench
    from cnnjax.train.loop import compiler_options

    options = compiler_options(default_config())
    assert options["xla_cpu_copy_insertion_use_region_analysis"] is True
    _, steps, state, batch, _, _ = bench._build("lenet5", 8, "float32", 0)

    def parameter_copies(opts):
        text = steps.train_step.lower(state, batch).compile(opts).as_text()
        return len(re.findall(r"copy\(%state_params", text))

    assert parameter_copies(options) == 0
    assert parameter_copies({**options, "xla_cpu_copy_insertion_use_region_analysis": False}) > 0
    # The slow-compile switch keeps the copy fix; other backends get no options.
    config = default_config()
    config.fast_cpu_compile = False
    assert compiler_options(config) == {"xla_cpu_copy_insertion_use_region_analysis": True}


def test_cpu_init_compiler_options_change_speed_not_values():
    # The run-once init program: small models compile fast, large ones run fast;
    # the parameters drawn are the same bits under every option set.
    from cnnjax.models import LeNet5
    from cnnjax.train.loop import OPTIMIZED_INIT_PARAMS, compiler_options
    from cnnjax.train.state import create_state

    config = default_config()
    small = compiler_options(config, run_once=True, num_params=61_706)
    large = compiler_options(config, run_once=True, num_params=OPTIMIZED_INIT_PARAMS)
    assert small["xla_backend_optimization_level"] == 0
    assert small["xla_cpu_use_fusion_emitters"] is False
    assert large["xla_backend_optimization_level"] == 1
    assert "xla_cpu_use_fusion_emitters" not in large
    for options in (small, large):
        assert options["xla_cpu_copy_insertion_use_region_analysis"] is True
    model = LeNet5()
    tx = optim.make_optimizer(config, optim.make_schedule(config, 10, 100))
    rng = jax.random.PRNGKey(7)
    lowered = jax.jit(lambda key: create_state(model, tx, key, (32, 32, 1))).lower(rng)
    states = [lowered.compile(options)(rng) for options in (small, large, None)]
    for state in states[:2]:
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(states[2]), strict=True):
            np.testing.assert_array_equal(a, b)


def test_cpu_eval_step_compiles_without_ynnpack_fusions_and_train_step_with():
    # Forward-only programs run faster on XLA:CPU's own kernels; training keeps
    # YNNPACK's products. The trainer's Steps carry both option sets.
    from cnnjax import bench
    from cnnjax.train.loop import compiler_options

    assert compiler_options(default_config(), inference=True)[
        "xla_cpu_experimental_ynn_fusion_type"] == ""
    assert "xla_cpu_experimental_ynn_fusion_type" not in compiler_options(default_config())
    keep = default_config()
    keep.cpu_eval_ynnpack = True  # the other choice stays selectable
    assert "xla_cpu_experimental_ynn_fusion_type" not in compiler_options(keep, inference=True)
    _, steps, state, batch, options, _ = bench._build("lenet5", 8, "float32", 0)
    eval_hlo = steps.eval_step.lower(state.params, batch).compile(options).as_text()
    train_hlo = steps.train_step.lower(state, batch).compile(options).as_text()
    assert "ynn_fusion" not in eval_hlo and "ynn_fusion" in train_hlo
    # The options travel with the jitted functions, so a step compiled on first call
    # (cnnjax eval) gets them too.
    assert "ynn_fusion" not in steps.eval_step.lower(state.params, batch).compile().as_text()


def test_metric_writer_remote_path_rewrites_and_discards(tmp_path):
    # The gs:// code path (whole-file rewrites through etils.epath), on a local directory.
    from cnnjax.train.metrics import MetricWriter

    writer = MetricWriter(str(tmp_path), tensorboard=False)
    writer._remote = True
    for step in (5, 10, 15):
        writer.write(step, {"train_loss": float(step)})
    writer.discard_after(10)
    writer.write(15, {"train_loss": 1.5})
    again = MetricWriter(str(tmp_path), tensorboard=False)
    again._remote = True
    again.write(20, {"train_loss": 2.0})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train_loss"]) for r in records] == [(5, 5.0), (10, 10.0), (15, 1.5),
                                                               (20, 2.0)]


def test_metric_writer_tensorboard_hides_steps_a_killed_run_logged_again(tmp_path):
    # A run logs steps 5, 10, 15 and dies; its newest checkpoint is step 10. The
    # resumed run logs step 15 again: TensorBoard must show it once, the new value.
    from _events import tensorboard_scalars

    from cnnjax.train.metrics import MetricWriter

    first = MetricWriter(str(tmp_path))
    for step in (5, 10, 15):
        first.write(step, {"train_loss": float(step)})
    first.close()
    resumed = MetricWriter(str(tmp_path))
    resumed.discard_after(10)
    resumed.write(15, {"train_loss": 1.5})
    resumed.write(20, {"train_loss": 2.0})
    resumed.close()
    logdir = tmp_path / "tensorboard"
    assert len(os.listdir(logdir)) == 2  # the second writer did not overwrite the first
    assert tensorboard_scalars(logdir)["train_loss"] == [(5, 5.0), (10, 10.0), (15, 1.5),
                                                          (20, 2.0)]


def test_importing_the_trainer_leaves_orbax_until_a_checkpoint_is_used():
    code = ("import sys, cnnjax.train; before = 'orbax.checkpoint' in sys.modules; "
            "from cnnjax.train.checkpoint import Checkpoints; import tempfile; "
            "Checkpoints(tempfile.mkdtemp()); print(before, 'orbax.checkpoint' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.stdout.split()[-2:] == ["False", "True"], out.stdout + out.stderr


def test_prefetch_yields_the_global_batches_in_order_and_raises_where_the_source_did():
    from cnnjax.train import mesh as mesh_lib
    from cnnjax.train.loop import _Prefetch

    mesh = mesh_lib.make_mesh()
    n = jax.device_count()
    local = [{"image": np.full((n, 2, 2, 1), i, np.uint8), "label": np.arange(n, dtype=np.int32)}
             for i in range(5)]
    prefetch = _Prefetch(mesh, iter(local))
    got = [int(np.asarray(b["image"])[0, 0, 0, 0]) for b in prefetch]
    assert got == [0, 1, 2, 3, 4]
    with pytest.raises(StopIteration):  # and stays ended
        next(prefetch)
    prefetch.close()

    def failing():
        yield local[0]
        yield local[1]
        raise OSError("the shard went missing")

    prefetch = _Prefetch(mesh, failing())
    assert int(np.asarray(next(prefetch)["image"])[0, 0, 0, 0]) == 0
    assert int(np.asarray(next(prefetch)["image"])[0, 0, 0, 0]) == 1
    with pytest.raises(OSError, match="the shard went missing"):
        next(prefetch)
    prefetch.close()

    def endless():
        while True:
            yield local[2]

    prefetch = _Prefetch(mesh, endless(), depth=2)
    assert int(np.asarray(next(prefetch)["label"])[-1]) == n - 1
    prefetch.close()  # stops reading ahead of an endless source
    assert not prefetch._thread.is_alive()
