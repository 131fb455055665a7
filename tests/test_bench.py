"""`cnnjax bench` and cnnjax.bench: the real step timed, FLOPs counted by hand, MFU sane."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from cnnjax import bench, cli, models
from cnnjax.ops import conv as conv_module

# LeNet-5 at 32x32x1 (the lecture's table), multiply-adds per image:
#   conv1  5x5x1 -> 6,    output 28x28:  28*28 * 5*5*1*6    = 117,600
#   conv2  5x5x6 -> 16,   output 10x10:  10*10 * 5*5*6*16   = 240,000
#   conv3  5x5x16 -> 120, output 1x1:     1*1  * 5*5*16*120 =  48,000
#   fc1    120 -> 84:                                 120*84 =  10,080
#   fc2    84 -> 10:                                   84*10 =     840
LENET5_MACS = 28 * 28 * 5 * 5 * 1 * 6 + 10 * 10 * 5 * 5 * 6 * 16 + 5 * 5 * 16 * 120 \
    + 120 * 84 + 84 * 10
LENET5_FORWARD_FLOPS = 2 * LENET5_MACS


def test_hand_count_of_lenet5():
    assert LENET5_MACS == 416_520
    rows = bench.layer_macs(models.get("lenet5"))
    assert [r["name"] for r in rows] == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert [r["macs"] for r in rows] == [117_600, 240_000, 48_000, 10_080, 840]
    assert bench.model_flops_per_image(models.get("lenet5"), "infer") == LENET5_FORWARD_FLOPS
    assert bench.model_flops_per_image(models.get("lenet5"), "train") == 3 * LENET5_FORWARD_FLOPS


def test_alexnet_and_vgg16_forward_flops():
    # Published figures: AlexNet (ungrouped) ~1.14 GMACs, VGG-16 ~15.47 GMACs per image.
    alex = bench.model_flops_per_image(models.get("alexnet"), "infer") / 2
    vgg = bench.model_flops_per_image(models.get("vgg16"), "infer") / 2
    assert 1.0e9 < alex < 1.2e9
    assert vgg == pytest.approx(15.47e9, rel=0.01)


def _check_sane(result, mode, batch):
    for key in ("model", "mode", "batch", "dtype", "device", "images_per_sec", "step_time_s",
                "compile_s", "flops_per_image", "achieved_flops", "peak_flops", "mfu"):
        assert key in result, key
    assert result["mode"] == mode and result["batch"] == batch
    assert result["model"] == "lenet5" and result["dtype"] == "float32"
    assert result["images_per_sec"] > 0 and math.isfinite(result["images_per_sec"])
    assert result["step_time_s"] > 0 and result["compile_s"] > 0
    assert result["images_per_sec"] == pytest.approx(batch / result["step_time_s"])
    expected = LENET5_FORWARD_FLOPS * (3 if mode == "train" else 1)
    assert result["flops_per_image"] == expected
    # XLA's own count of the compiled step agrees within the uncounted extras
    # (bias, tanh, pooling, loss, optimizer), once the work of the formulation is
    # added: where conv2's forward pass is banded (blocks of 2 output columns, each
    # reading 6 input columns for a 5-wide filter), it multiplies the band's zeros
    # too, 6/5 of the layer's multiply-adds.
    banded = conv_module._pick_forward("auto", (5, 5, 6, 16), pads=((0, 0), (0, 0)),
                                       out_w=10) == "banded"
    xla_expected = expected + (2 * 240_000 // 5 if banded else 0)
    assert result["xla_flops_per_image"] == pytest.approx(xla_expected, rel=0.25)
    assert result["achieved_flops"] == pytest.approx(expected * result["images_per_sec"])
    assert result["peak_flops"] > 1e9
    assert 0 < result["mfu"] <= 1
    # HFU is MFU scaled by XLA's count over the model's.
    assert result["hfu"] == pytest.approx(
        result["mfu"] * result["xla_flops_per_image"] / expected)
    assert result["step_time_min_s"] <= result["step_time_s"] <= result["step_time_max_s"]


@pytest.mark.parametrize("mode,batch", [("train", 32), ("infer", 256)])
def test_cli_json(mode, batch, capsys):
    rc = cli.main(["bench", "--model", "lenet5", "--batch", str(batch), "--mode", mode,
                   "--steps", "3", "--warmup", "1", "--json"])
    assert rc == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1
    _check_sane(json.loads(lines[0]), mode, batch)


def test_cli_text_report_and_errors(capsys):
    assert cli.main(["bench", "--batch", "16", "--steps", "2", "--mode", "infer"]) == 0
    out = capsys.readouterr().out
    for word in ("images/s", "step time", "compile", "FLOPs/image", "MFU", "peak memory"):
        assert word in out
    assert cli.main(["bench", "--model", "resnet", "--steps", "1"]) == 2
    assert "resnet" in capsys.readouterr().err
    assert cli.main(["bench", "--batch", "0"]) == 2
    assert "batch=0" in capsys.readouterr().err


def test_peer_torch():
    pytest.importorskip("torch")
    result = bench.run_benchmark("lenet5", 32, "train", steps=3, warmup=1, peer="torch")
    _check_sane(result, "train", 32)
    assert result["peer"] == "torch" and result["peer_images_per_sec"] > 0
    assert result["speedup_vs_peer"] == pytest.approx(
        result["images_per_sec"] / result["peer_images_per_sec"])
    assert 0 < result["peer_mfu"] <= 1
    assert "cnnjax / torch" in bench.format_result(result)


def test_alternating_blocks_time_each_step_once_and_skip_the_first_after_a_switch():
    calls = []
    fns = {"jax": lambda: calls.append("j"), "peer": lambda: calls.append("p")}
    times = bench._time_alternately(fns, steps=10, warmup=1, block=4)
    assert [len(times["jax"]), len(times["peer"])] == [10, 10]
    assert all(t >= 0 for t in times["jax"] + times["peer"])
    # Warm-up, then blocks of 1 untimed + up to 4 timed calls, the order reversed
    # every other round: j p | p j | j p (blocks of 4, 4 and the last 2).
    expected = "jp" + "j" * 5 + "p" * 5 + "p" * 5 + "j" * 5 + "j" * 3 + "p" * 3
    assert "".join(calls) == expected
    # Alone, nothing is thrown away.
    calls.clear()
    alone = bench._time_alternately({"jax": fns["jax"]}, steps=7, warmup=0, block=4)
    assert len(alone["jax"]) == 7 and calls == ["j"] * 7
    with pytest.raises(ValueError, match="block"):
        bench._time_alternately(fns, steps=1, warmup=0, block=0)


def test_torch_peers_match_the_parameter_counts():
    torch = pytest.importorskip("torch")
    from cnnjax import bench_torch

    for name, params in (("lenet5", 61_706), ("alexnet", 62_378_344), ("vgg16", 138_357_544)):
        model = models.get(name)
        peer = bench_torch.build_model(name, model.num_classes, model.input_shape)
        assert sum(p.numel() for p in peer.parameters()) == params, name
    with torch.inference_mode():
        out = bench_torch.build_model("lenet5", 10, (32, 32, 1))(torch.zeros(2, 1, 32, 32))
    assert tuple(out.shape) == (2, 10)


def _tune_malloc_in_fresh_process(env_value):
    """(whether tune_malloc applied, JAX's async CPU dispatch setting, page faults of a
    64 MiB buffer used again, page faults of a jitted program with a 96 MiB result run
    again) in a new process."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("CNNJAX_TUNE_MALLOC", None)
    if env_value is not None:
        env["CNNJAX_TUNE_MALLOC"] = env_value
    code = """
import resource
from cnnjax.cli import tune_malloc
applied = tune_malloc()
import jax, jax.numpy as jnp
def use_buffer():
    b = bytearray(64 * 2**20)
    b[::4096] = bytes(len(range(0, len(b), 4096)))  # touch every page
    del b
x = jnp.ones((24 * 2**20,), jnp.float32)
double = jax.jit(lambda x: x * 2)
def run_program():
    jax.block_until_ready(double(x))
def fewest_faults_after_the_first(run):
    # The fewest page faults of six runs after a first one. Tuned, some runs of the
    # program still fault their whole result in now and then (no mmap, brk or
    # madvise call shows why) while most fault nothing; untuned, every run does.
    run()
    faults = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        run()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(faults)
print(applied, jax.config.values["jax_cpu_enable_async_dispatch"],
      fewest_faults_after_the_first(use_buffer), fewest_faults_after_the_first(run_program))
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], out[1], int(out[2]), int(out[3])


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc only")
def test_tune_malloc_reuses_freed_memory_without_page_faults():
    # A 64 MiB buffer is 16,384 pages of 4 KiB, a 96 MiB result 24,576. Untuned, glibc
    # maps each afresh and every page faults again (XLA:CPU allocates a result on a
    # worker thread, whose arena maps it whatever the settings); tuned, the freed memory
    # is reused and XLA:CPU runs the program on the calling thread.
    applied, async_dispatch, faults, program_faults = _tune_malloc_in_fresh_process(None)
    assert applied == "True" and async_dispatch == "False"
    assert faults < 2_000 and program_faults < 2_000
    applied, async_dispatch, faults, program_faults = _tune_malloc_in_fresh_process("0")
    assert applied == "False" and async_dispatch == "True"
    assert faults >= 16_000 and program_faults >= 24_000


def test_the_cnnjax_program_tunes_malloc_and_main_does_not(monkeypatch):
    from importlib.metadata import entry_points

    from cnnjax import cli

    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "cnnjax"]
    assert script.value == "cnnjax.cli:console_main"
    calls = []
    monkeypatch.setattr(cli, "tune_malloc", lambda: calls.append("tune"))
    monkeypatch.setattr(cli, "tune_gc", lambda: calls.append("gc"))
    monkeypatch.setattr(cli, "main", lambda: calls.append("main") or 0)
    assert cli.console_main() == 0 and calls == ["tune", "gc", "main"]


@pytest.mark.parametrize("env_value", [None, "0"])
def test_tune_gc_freezes_the_loaded_objects_now_and_at_exit(env_value):
    # In a new process: the objects alive after the imports leave the collector's
    # reach, a full collection then walks only what came later, and the exit hook
    # freezes again; CNNJAX_TUNE_GC=0 leaves the collector alone.
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("CNNJAX_TUNE_GC", None)
    if env_value is not None:
        env["CNNJAX_TUNE_GC"] = env_value
    code = """
import atexit, gc
import cnnjax.cli
def report():
    print(loaded, frozen, walked, gc.get_freeze_count(), flush=True)
atexit.register(report)  # registered first, so it runs after tune_gc's exit hook
loaded = len(gc.get_objects())
cnnjax.cli.tune_gc()
frozen = gc.get_freeze_count()
kept = [[i] for i in range(1000)]
walked = len(gc.get_objects())
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    loaded, frozen, walked, at_exit = map(int, out)
    assert loaded > 50_000  # JAX and Flax are loaded with the package
    if env_value is None:
        # (a few frozen objects are freed before exit)
        assert frozen >= loaded and walked < 5_000 and at_exit > frozen + 900
    else:
        assert frozen == 0 and walked > loaded and at_exit == 0


def test_train_step_compiled_in_the_background_is_the_same_step():
    # As cnnjax train starts: the step compiles in a thread while the parameters
    # initialize; the executable gives bit-for-bit the step compiled afterwards.
    _, steps, state, batch, options, _ = bench._build("lenet5", 8, "float32", 0)
    reference = steps.train_step.lower(state, batch).compile(options)
    _, early, state2, batch2, _, _ = bench._build("lenet5", 8, "float32", 0,
                                                  compile_train_step=True)
    assert isinstance(early.train_step, jax.stages.Compiled)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state2), strict=True):
        np.testing.assert_array_equal(a, b)
    (new, metrics), (new2, metrics2) = reference(state, batch), early.train_step(state2, batch2)
    for a, b in zip(jax.tree.leaves((new, metrics)), jax.tree.leaves((new2, metrics2)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_background_compile_reraises_its_error_in_the_caller():
    _, steps, state, _, _, _ = bench._build("lenet5", 8, "float32", 0)
    wrong = {"image": np.zeros((8, 28, 28, 1), np.uint8), "label": np.zeros((8,), np.int32),
             "mask": np.ones((8,), bool)}  # LeNet-5 takes 32x32 images
    wait = steps.compile_in_background(state, wrong)
    with pytest.raises(Exception) as info:
        wait()
    assert "32" in str(info.value) and "28" in str(info.value)


def test_profile_step_script_splits_a_step_by_layer_and_pass(capsys, monkeypatch, tmp_path):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "profile_step.py"
    hlo = tmp_path / "step.hlo"
    monkeypatch.setattr("sys.argv", ["profile_step.py", "--model", "lenet5", "--batch", "8",
                                     "--steps", "1", "--hlo", str(hlo)])
    monkeypatch.setenv("CNNJAX_TUNE_MALLOC", "0")  # leave this test process's settings alone
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "lenet5 train batch 8: step" in out
    assert "conv2 backward" in out and "conv1 forward" in out
    assert "HloModule" in hlo.read_text()
