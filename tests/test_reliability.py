"""Reliability of the training loop: preemption, kill -9 at many moments, non-finite
values, checkpoints that do not fit, corrupt checkpoints, init_from.

The end-to-end tests drive a real ``cnnjax train`` process (``python -m
cnnjax.cli``) and compare its final parameters with one uninterrupted
in-process run of the same config. Kill moments are chosen from the run's own
progress (its log lines, metrics.jsonl, the checkpoint directory), not from
wall-clock sleeps, so they land at the intended phase on a loaded machine.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.train import CheckpointError, default_config, train_and_evaluate
from cnnjax.train import steps as steps_lib
from cnnjax.train.loop import NonFiniteLossError, _check_finite

# The run the end-to-end tests interrupt: LeNet-5 on digits, 3 epochs of 44 steps,
# a checkpoint every 5 steps (so async saves are in flight most of the time), a
# metrics line every step (the progress the kill moments are chosen from).
RUN = {"num_epochs": 3, "checkpoint_every_steps": 5, "log_every_steps": 1,
       "progress_bar": False, "max_checkpoints_to_keep": 3}
TOTAL_STEPS = 3 * 44


def make_config(**overrides):
    config = default_config()
    for key, value in {**RUN, **overrides}.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


@pytest.fixture(autouse=True)
def cnnjax_logs_reach_caplog(monkeypatch):
    """An earlier in-process `cnnjax` CLI call turns propagation off for its handler."""
    monkeypatch.setattr(logging.getLogger("cnnjax"), "propagate", True)


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted one must end equal to."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    return train_and_evaluate(make_config(), workdir)


def final_params(workdir: str):
    """The parameters of a finished run (rerunning it restores and trains nothing)."""
    result = train_and_evaluate(make_config(), workdir)
    assert result["step"] == TOTAL_STEPS and result["train_step_traces"] == 0
    return result["params"]


def complete_steps(workdir: str) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


class Train:
    """A real ``cnnjax train`` process whose log and metrics can be watched."""

    def __init__(self, workdir: str, tmp_path, tag: str):
        self.workdir = workdir
        self.log_path = tmp_path / f"{tag}.log"
        self.metrics_path = os.path.join(workdir, "metrics.jsonl")
        # Only lines this process writes count: earlier runs may have logged further
        # than their newest complete checkpoint. The process drops those lines by
        # replacing the file (a new inode); until then its lines follow the old end.
        self.metrics_offset, self.metrics_inode = 0, None
        if os.path.exists(self.metrics_path):
            stat = os.stat(self.metrics_path)
            self.metrics_offset, self.metrics_inode = stat.st_size, stat.st_ino
        args = [f"--config.{k}={v}" for k, v in RUN.items()]
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
        self.started = time.time()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cnnjax.cli", "train", "--workdir", workdir, *args],
                stdout=log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text()

    def metrics_step(self) -> int:
        if not os.path.exists(self.metrics_path):
            return -1
        with open(self.metrics_path) as f:
            if os.fstat(f.fileno()).st_ino == self.metrics_inode:
                f.seek(self.metrics_offset)
            lines = f.read().splitlines(keepends=True)
        steps = [json.loads(line)["step"] for line in lines if line.endswith("\n")]
        return max(steps, default=-1)

    def saving(self) -> bool:
        """An async save of this process is in flight: orbax's temporary step directory
        exists and was written since the process started (not one a kill left)."""
        for path in glob.glob(os.path.join(self.workdir, "checkpoints",
                                           "*.orbax-checkpoint-tmp*")):
            try:
                if os.stat(path).st_mtime >= self.started:
                    return True
            except FileNotFoundError:  # renamed just now: the save completed
                pass
        return False

    def wait_until(self, condition, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended (rc {self.proc.returncode}) before the "
                                     f"kill moment:\n{self.log()[-3000:]}")
            if time.time() > deadline:
                self.proc.kill()
                raise AssertionError(f"kill moment not reached in {timeout} s:\n{self.log()}")
            time.sleep(0.005)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=120)

    def finish(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def resumed_from(self) -> int | None:
        match = re.search(r"resumed from the checkpoint at step (\d+)", self.log())
        return int(match.group(1)) if match else None


# --------------------------------------------------------------------------- preemption

@pytest.mark.slow
def test_sigterm_and_sigint_save_the_current_step_and_resume_bit_for_bit(
        reference, tmp_path):
    workdir = str(tmp_path / "run")
    stops = []
    for tag, sig, after in (("term", signal.SIGTERM, 7), ("int", signal.SIGINT, 23)):
        run = Train(workdir, tmp_path, tag)
        start = max(complete_steps(workdir), default=0)
        run.wait_until(lambda run=run, start=start, after=after:
                       run.metrics_step() >= start + after)
        run.signal(sig)
        log = run.log()
        assert run.proc.returncode == 75, log  # EXIT_PREEMPTED
        name = signal.Signals(sig).name
        match = re.search(name + r": saved the checkpoint at step (\d+)", log)
        assert match, log
        step = int(match.group(1))
        assert step > start + after - 1 and step == max(complete_steps(workdir))
        assert "Traceback" not in log
        assert f"stopped: {name} received: stopped at step {step}" in log
        stops.append(step)
    last = Train(workdir, tmp_path, "last")
    assert last.finish() == 0, last.log()
    assert last.resumed_from() == stops[-1]
    assert_trees_equal(final_params(workdir), reference["params"])


# --------------------------------------------------------------------------- sudden death

@pytest.mark.slow
def test_kill_9_at_ten_moments_resumes_each_time_and_ends_bit_for_bit(reference, tmp_path):
    """SIGKILL during start-up, compile, training, async saves and evaluation."""
    workdir = str(tmp_path / "run")

    def after_steps(n):
        return lambda run, start: run.metrics_step() >= start + n

    def log_says(text):
        return lambda run, start: text in run.log()

    def while_saving(run, start):
        return run.metrics_step() > start and run.saving()

    def after_a_completed_save(run, start):
        return max(complete_steps(workdir), default=0) > start and (
            run.metrics_step() >= max(complete_steps(workdir)) + 2)

    def at_epoch_end(run, start):  # the epoch's metrics line is written before its eval
        step = run.metrics_step()
        return step > start and step % 44 == 0

    def while_restoring(run, start):  # (nothing to restore yet: after 2 steps instead)
        return "resumed from the checkpoint" in run.log() or (
            not start and run.metrics_step() >= 2)

    moments = [
        ("start-up", log_says("compiling the train and eval steps")),
        ("before the first checkpoint", after_steps(3)),
        ("async save", while_saving),
        ("after a completed save", after_a_completed_save),
        ("restore", while_restoring),
        ("async save 2", while_saving),
        ("after 12 steps", after_steps(12)),
        ("async save 3", while_saving),
        ("evaluation", at_epoch_end),
        ("async save 4", while_saving),
    ]
    expected_resume: int | None = None
    left_partial = 0
    for i, (name, moment) in enumerate(moments):
        run = Train(workdir, tmp_path, f"kill{i}")
        start = expected_resume or 0
        run.wait_until(lambda run=run, start=start, moment=moment: moment(run, start))
        run.signal(signal.SIGKILL)
        assert run.proc.returncode == -signal.SIGKILL, name
        # The previous kill left this workdir; this run must have resumed from its
        # newest complete checkpoint (or started afresh when there was none).
        if run.resumed_from() is not None or expected_resume:
            assert run.resumed_from() == expected_resume, (name, run.log())
        assert "Traceback" not in run.log() and "error:" not in run.log(), run.log()
        steps = complete_steps(workdir)
        expected_resume = steps[-1] if steps else None
        left_partial += bool(run.saving())
        print(f"kill {i} ({name}): resumed from {run.resumed_from()}, logged up to step "
              f"{run.metrics_step()}, complete checkpoints {steps}, partial save left: "
              f"{run.saving()}")  # shown by pytest on failure (or with -s)
    # At least one kill landed inside an async save and left orbax's partial step
    # directory, which the next run ignored (and saved that step again later).
    assert left_partial >= 1
    last = Train(workdir, tmp_path, "last")
    assert last.finish() == 0, last.log()
    assert last.resumed_from() == expected_resume
    assert "Traceback" not in last.log()
    assert_trees_equal(final_params(workdir), reference["params"])
    # Lines the killed runs logged past their checkpoints were dropped on resume:
    # every kind of line appears once per step, in step order.
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    keys = [(r["step"], tuple(sorted(r))) for r in records]
    assert len(keys) == len(set(keys))
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    # TensorBoard's event files are append-only: there each resumed run's purge
    # marker hides what the killed ones logged past their checkpoints. Killed
    # runs may also have lost events not yet flushed; the last run's are all there.
    from _events import tensorboard_scalars

    shown = tensorboard_scalars(os.path.join(workdir, "tensorboard"))["train_loss"]
    logged = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    shown_steps = [s for s, _ in shown]
    assert shown_steps == sorted(shown_steps)
    shown_count, logged_count = Counter(shown_steps), Counter(s for s, _ in logged)
    assert all(shown_count[step] <= logged_count[step] for step in shown_count)
    after = [(s, v) for s, v in shown if s > expected_resume]
    assert after == [(s, pytest.approx(v, rel=1e-6)) for s, v in logged if s > expected_resume]


# --------------------------------------------------------------------------- non-finite

def test_check_finite_names_loss_gradient_or_parameters():
    ok = {"loss_sum": 1.0, "nonfinite_params": 0}
    _check_finite(ok, 3, 0, "ckpts")
    cases = [({"loss_sum": float("nan")}, r"training loss became nan at step 7"),
             ({"loss_sum": float("inf"), "nonfinite_params": 3},
              r"training loss became inf at step 7"),
             ({"nonfinite_params": 2}, r"2 parameters became NaN/Inf after the update \(the "
                                       r"loss was finite: a gradient was NaN/Inf or the "
                                       r"update overflowed\) at step 7")]
    for change, message in cases:
        with pytest.raises(NonFiniteLossError, match=message) as info:
            _check_finite({**ok, **change}, 7, 5, "ckpts")
        assert "last checkpoint (step 5) in ckpts is left as it was" in str(info.value)
    tree = {"a": jnp.array([1.0, jnp.nan, jnp.inf]), "b": jnp.ones(3)}
    assert int(steps_lib.count_nonfinite(tree)) == 2


def test_non_finite_gradient_stops_at_once_and_keeps_the_last_checkpoint(
        tmp_path, monkeypatch):
    config = make_config(dataset="synthetic", stop_after_steps=10, log_every_steps=50)
    workdir = str(tmp_path)
    train_and_evaluate(config, workdir)
    assert complete_steps(workdir) == [5, 10]

    # A loss whose value is finite but whose gradient is NaN.
    real_loss = steps_lib.optax.softmax_cross_entropy_with_integer_labels

    @jax.custom_vjp
    def nan_grad_loss(logits, labels):
        return real_loss(logits, labels)

    def fwd(logits, labels):
        return real_loss(logits, labels), labels

    def bwd(labels, g):
        return (jnp.full(g.shape + (10,), jnp.nan), None)

    nan_grad_loss.defvjp(fwd, bwd)
    monkeypatch.setattr(steps_lib.optax, "softmax_cross_entropy_with_integer_labels",
                        nan_grad_loss)
    config.stop_after_steps = 20
    with pytest.raises(NonFiniteLossError,
                       match=r"parameters became NaN/Inf after the update \(the loss was "
                             r"finite: a gradient was NaN/Inf or the update overflowed\) at "
                             r"step 11; the last checkpoint \(step 10\)"):
        train_and_evaluate(config, workdir)
    assert complete_steps(workdir) == [5, 10]  # nothing non-finite was written
    monkeypatch.undo()
    config.stop_after_steps = 10
    again = train_and_evaluate(config, workdir)  # the kept checkpoint reads and is finite
    assert again["step"] == 10
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(again["params"]))


@pytest.mark.parametrize("optimizer,momentum,nesterov,weight_decay", [
    ("sgd", 0.0, False, 0.0), ("sgd", 0.9, False, 5e-4), ("sgd", 0.9, True, 0.0),
    ("adam", 0.9, False, 0.0), ("adam", 0.9, False, 5e-4), ("adamw", 0.9, False, 1e-2)])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("bad_step", [0, 1])
def test_every_optimizer_carries_a_non_finite_gradient_into_the_parameters(
        optimizer, momentum, nesterov, weight_decay, bad, bad_step):
    # The train step reads only the updated parameters, never the gradients: a
    # non-finite gradient must make a parameter non-finite, for every optimizer the
    # trainer builds: at the first warm-up step, where the learning rate is 0, and
    # after a finite step.
    from cnnjax.train import optim
    config = make_config(optimizer=optimizer, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay, warmup_epochs=1.0, schedule="constant",
                         learning_rate=0.1)
    schedule = optim.make_schedule(config, steps_per_epoch=10, total_steps=100)
    assert float(schedule(0)) == 0.0
    tx = optim.make_optimizer(config, schedule)
    params = {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}
    opt_state = tx.init(params)
    for step in range(bad_step + 1):
        grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
        if step == bad_step:
            grads["kernel"] = grads["kernel"].at[1, 2].set(bad)
        updates, opt_state = tx.update(grads, opt_state, params)
        new = steps_lib.optax.apply_updates(params, updates)
        if step < bad_step:
            params = new
            assert not bool(steps_lib.has_nonfinite(params))
    assert bool(steps_lib.has_nonfinite(new))
    assert int(steps_lib.count_nonfinite(new)) >= 1
    assert int(steps_lib.count_nonfinite_if(jnp.asarray(True), grads)) == 1
    assert int(steps_lib.count_nonfinite_if(jnp.asarray(False), grads)) == 0


def test_the_train_steps_guard_reads_the_updated_parameters_and_no_gradient():
    # A conditional that took the gradients (to count their non-finite values) kept
    # them all alive to the end of the program: VGG-16's train step 4-7% slower.
    from cnnjax import bench
    _, steps, state, batch, _, _ = bench._build("lenet5", 8, "float32", 0)
    traced = steps.train_step.trace(state, batch)
    jaxpr = traced.jaxpr.jaxpr
    out_tree = jax.tree.structure(traced.out_info)
    positions = jax.tree.unflatten(out_tree, list(range(out_tree.num_leaves)))
    new_params = [jaxpr.outvars[i] for i in jax.tree.leaves(positions[0].params)]
    conds = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
    assert len(conds) == 1
    operands = conds[0].invars[1:]
    assert len(operands) == len(new_params) == len(jax.tree.leaves(state.params))
    assert all(any(v is p for p in new_params) for v in operands)
    assert "nonfinite_params" in positions[1]


def test_non_finite_parameters_from_a_huge_learning_rate(tmp_path):
    config = make_config(dataset="synthetic", optimizer="sgd", learning_rate=1e38,
                         schedule="constant", momentum=0.0, stop_after_steps=10)
    with pytest.raises(NonFiniteLossError, match=r"at step [1-3]; no checkpoint was written"):
        train_and_evaluate(config, str(tmp_path))
    assert complete_steps(str(tmp_path)) == []


# --------------------------------------------------------------------------- checkpoints

# A restore that does not fit leaves orbax's read coroutines un-awaited (harmless).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_checkpoint_of_another_model_names_the_fields_and_init_from_loads_what_fits(
        tmp_path, caplog):
    first = str(tmp_path / "lenet")
    train_and_evaluate(make_config(stop_after_steps=2), first)

    with pytest.raises(CheckpointError) as info:
        train_and_evaluate(make_config(stop_after_steps=2, optimizer="sgd",
                                       **{"image_shape": (36, 36, 1)}), first)
    message = str(info.value)
    assert "\n" not in message
    assert "image_shape () -> (36, 36, 1)" in message and "optimizer 'adam' -> 'sgd'" in message
    assert "use a new --workdir" in message and "--config.init_from=" in message

    # Partial restore: a 36x36 input changes the first dense layer's input size only.
    caplog.set_level(logging.INFO, logger="cnnjax")
    second = make_config(stop_after_steps=1, image_shape=(36, 36, 1), init_from=first,
                         learning_rate=1e-12, schedule="constant")
    result = train_and_evaluate(second, str(tmp_path / "bigger"))
    skipped = [r.getMessage() for r in caplog.records if "kept the fresh initialization" in
               r.getMessage()]
    assert len(skipped) == 1 and "shape" in skipped[0], skipped
    old = train_and_evaluate(make_config(stop_after_steps=2), first)["params"]
    for layer, params in old.items():
        for name, value in params.items():
            new = np.asarray(result["params"][layer][name])
            if new.shape == np.asarray(value).shape:  # loaded (lr 1e-12 barely moves it)
                np.testing.assert_allclose(new, np.asarray(value), atol=1e-6)


def _damage(workdir: str, step: int, how: str) -> None:
    root = os.path.join(workdir, "checkpoints", str(step), "state")
    if how == "truncate":
        files = [f for f in glob.glob(os.path.join(root, "**", "d", "*"), recursive=True)
                 if os.path.isfile(f)]
        assert files
        for path in files:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 3)
    else:  # garble the tree metadata
        with open(os.path.join(root, "_METADATA"), "w") as f:
            f.write("{\x00garbage")


# Orbax leaves an "event loop is closed" callback behind after failing to read garbled JSON.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_checkpoints_are_reported_and_the_newest_older_one_is_used(tmp_path, caplog):
    workdir = str(tmp_path)
    config = make_config(dataset="synthetic", stop_after_steps=15)
    whole = train_and_evaluate(config, str(tmp_path / "whole"))
    train_and_evaluate(config, workdir)
    assert complete_steps(workdir) == [5, 10, 15]
    _damage(workdir, 15, "truncate")
    _damage(workdir, 10, "garble")
    with open(os.path.join(workdir, "checkpoints", "15", "meta", "metadata"), "w") as f:
        f.write('{"model": ')  # the stored config of step 15 too

    caplog.set_level(logging.WARNING, logger="cnnjax")
    from cnnjax.train import evaluate

    assert evaluate(None, workdir)["step"] == 5  # eval falls back too (and moves nothing)
    assert complete_steps(workdir) == [5, 10, 15]
    caplog.clear()
    result = train_and_evaluate(config, workdir)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"checkpoint at step 15 in {workdir}/checkpoints/15 cannot be read" in w
               for w in warnings), warnings
    assert any("checkpoint at step 10" in w and "cannot be read" in w for w in warnings)
    assert result["step"] == 15 and complete_steps(workdir) == [5, 10, 15]
    assert {"10.corrupt", "15.corrupt"} <= set(os.listdir(os.path.join(workdir, "checkpoints")))
    assert_trees_equal(result["params"], whole["params"])

    # Nothing readable at all: one sentence listing each step and path.
    for step in (5, 10, 15):
        _damage(workdir, step, "garble")
    with pytest.raises(CheckpointError, match=r"no readable checkpoint: step 15 \(.*15: .*"
                                              r"step 5 \(") as info:
        train_and_evaluate(config, workdir)
    assert "\n" not in str(info.value)
