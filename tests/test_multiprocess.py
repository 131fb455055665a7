"""Two real processes on loopback (2 CPU devices each) train as one 4-device run.

Each process is a ``cnnjax train`` started with ``--config.coordinator_address``,
``--config.num_processes=2`` and its own ``--config.process_id``; they feed
per-process halves of every global batch and write one shared checkpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cnnjax.train import default_config, train_and_evaluate

STEPS = 12
COMMON = {"num_epochs": 1, "stop_after_steps": STEPS, "checkpoint_every_steps": 5,
          "log_every_steps": 1, "progress_bar": False, "batch_size": 32}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir, devices: int, log_path, **extra) -> subprocess.Popen:
    args = [f"--config.{k}={v}" for k, v in {**COMMON, **extra}.items()]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "cnnjax.cli", "train", "--workdir",
                                 str(workdir), *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env)


def wait_all(procs, timeout=300) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(deadline - time.time(), 1)))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    return codes


def two_processes(workdir, tmp_path, tag, **extra):
    address = f"127.0.0.1:{free_port()}"
    return [start(workdir, 2, tmp_path / f"{tag}{i}.log", coordinator_address=address,
                  num_processes=2, process_id=i, distributed_timeout_s=120, **extra)
            for i in range(2)]


def restored_params(workdir):
    """The run's final parameters, restored in this (single-device) process."""
    config = default_config()
    for key, value in COMMON.items():
        config[key] = value
    result = train_and_evaluate(config, str(workdir))
    assert result["step"] == STEPS and result["train_step_traces"] == 0
    return result["params"]


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(tmp_path):
    procs = two_processes(tmp_path / "two", tmp_path, "p")
    single = start(tmp_path / "one", 4, tmp_path / "single.log")
    codes = wait_all([*procs, single])
    logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0, 0], (logs, (tmp_path / "single.log").read_text())
    assert "devices: 4 x cpu over 2 process(es)" in logs[0]
    assert "devices: 4 x cpu over 1 process(es)" in (tmp_path / "single.log").read_text()
    # One shared checkpoint directory, readable by one process with one device.
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["10", "12", "5"]
    two, one = restored_params(tmp_path / "two"), restored_params(tmp_path / "one")
    print("max |two processes - one process|:", max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(one), strict=True)))
    for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(one), strict=True):
        # gloo and XLA:CPU add the 4 partial gradients in another order: not bit-equal
        # (max difference 7e-8 here after 12 Adam steps).
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() < 1e-4
        assert np.linalg.norm(a - b) <= 1e-5 * max(np.linalg.norm(a), 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_one_process_stops_both_at_the_same_saved_step(sig, tmp_path):
    workdir = tmp_path / "run"
    procs = two_processes(workdir, tmp_path, "p", stop_after_steps=400, num_epochs=10)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.time() < deadline and all(p.poll() is None for p in procs), \
            [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
        time.sleep(0.02)
    procs[1].send_signal(sig)
    codes = wait_all(procs, timeout=120)
    logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
    assert codes == [75, 75], logs
    # The signalled process names its signal; its partner learns of it as a preemption.
    names = [sig.name if i == 1 else "SIGTERM" for i in range(2)]
    steps = {int(log.split(f"{name}: saved the checkpoint at step ")[1].split()[0])
             for name, log in zip(names, logs, strict=True)}
    assert len(steps) == 1, logs
    step = steps.pop()
    assert step < 400 and str(step) in os.listdir(workdir / "checkpoints")


def test_a_process_whose_partner_never_starts_fails_clearly_in_bounded_time(tmp_path):
    t0 = time.time()
    proc = start(tmp_path / "alone", 2, tmp_path / "alone.log",
                 coordinator_address=f"127.0.0.1:{free_port()}", num_processes=2,
                 process_id=0, distributed_timeout_s=5)
    code = wait_all([proc], timeout=120)[0]
    log = (tmp_path / "alone.log").read_text()
    assert code == 2, log
    assert ("error: process 0 of 2 could not reach all processes through the coordinator at "
            "127.0.0.1:") in log
    assert "Traceback" not in log and "Check failure" not in log
    assert time.time() - t0 < 60


def test_sigint_in_a_multi_process_run_is_passed_on_as_sigterm():
    from cnnjax.train.loop import _StopRequests

    seen = []
    service = jax.config.jax_enable_preemption_service
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        stop = _StopRequests(multi_process=True)
        try:
            # SIGTERM stays with whoever had it (JAX's preemption notifier); SIGINT is ours.
            assert signal.getsignal(signal.SIGTERM) is not stop._handle
            signal.raise_signal(signal.SIGINT)
            assert stop.signal_name == "SIGINT" and seen == [signal.SIGTERM]
        finally:
            stop.restore()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        # Without the preemption service nothing would catch it: Ctrl-C stays Ctrl-C.
        jax.config.update("jax_enable_preemption_service", False)
        stop = _StopRequests(multi_process=True)
        assert stop._previous == {}
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        jax.config.update("jax_enable_preemption_service", service)
        signal.signal(signal.SIGTERM, previous)
