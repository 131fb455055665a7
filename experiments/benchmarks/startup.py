"""Start-up time of a whole process: import, build LeNet-5, run one training step.

Each round starts one fresh Python process per contender, alternately, and
times it from outside (fork to exit), so that interpreter start, imports,
model construction, compilation and the first step all count:

* ``cnnjax``: starts as the ``cnnjax`` program does (``cli.tune_malloc`` and
  ``cli.tune_gc`` after the package's imports), builds the trainer's own
  jitted train step for LeNet-5 (batch 128, SGD momentum,
  ``cnnjax.train.steps.Steps``, as ``cnnjax bench`` does), compiled with the
  trainer's XLA options and the persistent compilation cache that ``cnnjax
  train`` uses, in a background thread while the parameters initialize (as
  ``cnnjax train`` does), and runs one step to completion. Run "cold" (empty
  cache directory, so XLA compiles) and "warm" (the cache filled by an earlier
  run: what every later ``cnnjax train`` sees).
* ``torch``: imports torch (and nothing of cnnjax), builds the same LeNet-5
  as ``cnnjax.bench_torch`` and runs one SGD step (there is no compile step).

Usage: ``python experiments/benchmarks/startup.py [--rounds 5]``. Prints the
median and minimum seconds per contender and the ratios against PyTorch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

CNNJAX = r"""
import sys
from cnnjax.cli import tune_gc, tune_malloc
tune_malloc()
tune_gc()
from cnnjax.train.loop import enable_compilation_cache
enable_compilation_cache(sys.argv[1])
import jax
from cnnjax import bench
_, steps, state, batch, _, _ = bench._build("lenet5", 128, "float32", 0, compile_train_step=True)
state, metrics = steps.train_step(state, batch)
jax.block_until_ready((state, metrics))
"""

# Plain PyTorch, importing nothing from cnnjax (which would import jax).
TORCH = r"""
import torch
from torch import nn
model = nn.Sequential(
    nn.Conv2d(1, 6, 5), nn.Tanh(), nn.AvgPool2d(2),
    nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2),
    nn.Conv2d(16, 120, 5), nn.Tanh(), nn.Flatten(),
    nn.Linear(120, 84), nn.Tanh(), nn.Linear(84, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x, y = torch.randn(128, 1, 32, 32), torch.randint(0, 10, (128,))
opt.zero_grad(set_to_none=True)
nn.functional.cross_entropy(model(x), y).backward()
opt.step()
"""


def _time(args: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    warm_cache = tempfile.mkdtemp(prefix="cnnjax-startup-warm-")
    times: dict[str, list[float]] = {"torch": [], "cnnjax cold cache": [],
                                     "cnnjax warm cache": []}
    try:
        _time([sys.executable, "-c", CNNJAX, warm_cache], env)  # fill the warm cache
        for _ in range(args.rounds):
            cold = tempfile.mkdtemp(prefix="cnnjax-startup-cold-")
            try:
                times["cnnjax cold cache"].append(_time([sys.executable, "-c", CNNJAX, cold], env))
            finally:
                shutil.rmtree(cold, ignore_errors=True)
            times["cnnjax warm cache"].append(
                _time([sys.executable, "-c", CNNJAX, warm_cache], env))
            times["torch"].append(_time([sys.executable, "-c", TORCH], env))
    finally:
        shutil.rmtree(warm_cache, ignore_errors=True)
    base = statistics.median(times["torch"])
    print(f"start-up: import + build LeNet-5 + one train step (batch 128), {args.rounds} "
          f"rounds, fresh processes, load average {os.getloadavg()[0]:.2f}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:18s} {median:6.2f} s median (min {min(values):.2f})   "
              f"PyTorch / this = {base / median:.2f}x")


if __name__ == "__main__":
    main()
