"""tpu/*.sh: every script's --dry-run prints the exact gcloud commands; shellcheck is clean.

The scripts run with a ``gcloud`` on PATH that fails loudly, so a dry run that
tried to call the real tool would fail the test. shellcheck is required: when
it is missing the test fails (install it with ``apt-get install -y shellcheck``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

TPU = Path(__file__).resolve().parent.parent / "tpu"
SCRIPTS = ["create.sh", "setup.sh", "launch.sh", "delete.sh"]
BASE_ENV = {"PROJECT": "proj-1", "ZONE": "us-west4-a", "ACCELERATOR_TYPE": "v5litepod-8",
            "TPU_NAME": "vm1", "BUCKET": "gs://bkt", "CNNJAX_REPO": "https://example.org/c.git"}


@pytest.fixture
def env(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    gcloud = fake / "gcloud"
    gcloud.write_text("#!/bin/sh\necho 'the real gcloud was called in a dry run' >&2\nexit 97\n")
    gcloud.chmod(0o755)
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR")}
    return {**keep, "PATH": f"{fake}:/usr/bin:/bin", **BASE_ENV}


def dry_run(script: str, *args: str, env: dict, **overrides: str) -> list[list[str]]:
    proc = subprocess.run(["bash", str(TPU / script), "--dry-run", *args],
                          env={**env, **overrides}, capture_output=True, text=True,
                          timeout=30, cwd=TPU.parent)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def flags(cmd: list[str]) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in cmd if arg.startswith("--") and "=" in arg)


def test_create_runtime_versions(env):
    expected = {"v4-8": "tpu-ubuntu2204-base", "v4-32": "tpu-ubuntu2204-base",
                "v5litepod-8": "v2-alpha-tpuv5-lite", "v5p-8": "v2-alpha-tpuv5",
                "v6e-8": "v2-alpha-tpuv6e"}
    for accel, version in expected.items():
        [cmd] = dry_run("create.sh", env=env, ACCELERATOR_TYPE=accel)
        assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "vm1"]
        assert flags(cmd) == {"zone": "us-west4-a", "project": "proj-1",
                              "accelerator-type": accel, "version": version}
        assert "--spot" not in cmd


def test_create_spot_queued_and_flags(env):
    [create, describe] = dry_run("create.sh", "--spot", "--queued", "--type", "v6e-16",
                                 "--name", "big", env=env)
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "big-qr"]
    assert flags(create) == {"node-id": "big", "zone": "us-west4-a", "project": "proj-1",
                             "accelerator-type": "v6e-16", "runtime-version": "v2-alpha-tpuv6e"}
    assert create[-1] == "--spot"
    assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe",
                            "big-qr"]
    [cmd] = dry_run("create.sh", "--spot", env=env, PROJECT="")
    assert "--spot" in cmd and not any(a.startswith("--project") for a in cmd)


def test_create_rejects_unknown(env):
    proc = subprocess.run(["bash", str(TPU / "create.sh"), "--dry-run"],
                          env={**env, "ACCELERATOR_TYPE": "v3-8"}, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode != 0 and "RUNTIME_VERSION" in proc.stderr
    proc = subprocess.run(["bash", str(TPU / "create.sh"), "--bogus"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--bogus" in proc.stderr


def test_setup_installs_everywhere_and_copies_data(env):
    cmds = dry_run("setup.sh", env=env)
    assert all(c[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vm1"] for c in cmds)
    assert all("--worker=all" in c for c in cmds)
    remote = [flags(c)["command"] for c in cmds]
    assert 'pip install "jax[tpu]" gcsfs google-cloud-storage' in remote[0]
    assert "git clone https://example.org/c.git ~/cnnjax" in remote[1]
    assert "pip install -e ." in remote[1]
    assert ("gcloud storage cp -r gs://bkt/tensorflow_datasets/imagenet2012 "
            "/mnt/disks/data/tensorflow_datasets/") in remote[2]
    assert "jax.device_count()" in remote[3]
    assert len(dry_run("setup.sh", "--skip-data", env=env)) == 3


def test_setup_from_a_wheel(env):
    wheel = "dist/cnnjax-0.1-py3-none-any.whl"
    cmds = dry_run("setup.sh", "--skip-data", env=env, CNNJAX_WHEEL=wheel)
    scp = [c for c in cmds if c[4] == "scp"]
    assert len(scp) == 2
    assert scp[0][5:7] == ["dist/cnnjax-0.1-py3-none-any.whl", "vm1:~/cnnjax/"]
    assert "--recurse" in scp[1] and scp[1][6].endswith("experiments/configs")
    assert scp[1][7] == "vm1:~/cnnjax/experiments/"
    assert any("pip install ~/cnnjax/cnnjax-0.1-py3-none-any.whl" in flags(c).get("command", "")
               for c in cmds)


def test_launch_starts_train_on_all_workers(env):
    [cmd] = dry_run("launch.sh", "--", "--config.num_epochs=1", env=env)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vm1"]
    assert "--worker=all" in cmd
    remote = flags(cmd)["command"]
    assert ("cnnjax train --config experiments/configs/vgg16_imagenet_tpu.py --workdir "
            "gs://bkt/runs/vgg16_imagenet_tpu --config.data_dir=/mnt/disks/data/"
            "tensorflow_datasets --config.num_epochs=1") in remote
    assert "$HOME/cnnjax_logs/train.log" in remote
    assert "gs://bkt/runs/vgg16_imagenet_tpu/logs/$(hostname).log" in remote
    assert "CNNJAX_DISTRIBUTED=1" not in remote  # one host
    [pod] = dry_run("launch.sh", "--workdir", "gs://bkt/r2", env=env, ACCELERATOR_TYPE="v4-32")
    assert "CNNJAX_DISTRIBUTED=1" in flags(pod)["command"]
    assert "--workdir gs://bkt/r2" in flags(pod)["command"]


def test_launch_logs_per_worker_and_stop(env):
    cmds = dry_run("launch.sh", "--logs", env=env, ACCELERATOR_TYPE="v4-32")
    assert cmds[0] == ["mkdir", "-p", "logs"]
    assert [c[-1] for c in cmds[1:]] == [f"--worker={i}" for i in range(4)]
    assert [c[6] for c in cmds[1:]] == [f"logs/worker-{i}.log" for i in range(4)]
    assert len(dry_run("launch.sh", "--logs", env=env, ACCELERATOR_TYPE="v5litepod-16")) == 5
    [stop] = dry_run("launch.sh", "--stop", env=env)
    assert "train.pid" in flags(stop)["command"] and "--worker=all" in stop


def test_delete(env):
    [cmd] = dry_run("delete.sh", env=env)
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "vm1", "--zone=us-west4-a",
                   "--project=proj-1", "--quiet"]
    [cmd] = dry_run("delete.sh", "--queued", env=env)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "vm1-qr"]
    assert "--force" in cmd


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed; install it (apt-get install -y shellcheck) "
                    "so the tpu/ scripts can be checked.")
    paths = [str(TPU / name) for name in [*SCRIPTS, "env.sh"]]
    proc = subprocess.run([shellcheck, "-x", *paths], capture_output=True, text=True,
                          timeout=60, cwd=TPU)
    assert proc.returncode == 0, proc.stdout + proc.stderr
