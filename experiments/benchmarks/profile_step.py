"""Where the time of a compiled train/eval step goes, per XLA op and per layer.

Builds the trainer's own step (as ``cnnjax bench`` does), runs a few steps
under ``jax.profiler.trace``, reads the trace's per-op events back and maps
each executed HLO instruction to the JAX operation it came from (the
``op_name`` metadata of the compiled HLO: ``jvp(...)`` is the forward pass,
``transpose(jvp(...))`` the backward pass, and the layer name is in the path).

    python experiments/benchmarks/profile_step.py --model vgg16 --batch 4 --mode train
    python experiments/benchmarks/profile_step.py --model lenet5 --top 40 --hlo step.hlo

Prints the median step time, then the ops with the most time per step, and a
summary by layer and pass. Op times add up to more than the step when ops
run concurrently on several cores; asynchronous ops (XLA:CPU's own Eigen
convolutions) appear with their dispatch time only, so a gap in the
timeline, not a long op, is their signature.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time

import jax

from cnnjax import bench, cli


def _op_names(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (result shape, op_name metadata)."""
    names = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+)", line)
        if m:
            op = re.search(r'op_name="([^"]+)"', line)
            names[m.group(1)] = (m.group(2)[:40], op.group(1) if op else "")
    return names


def _layer_and_pass(op_name: str) -> tuple[str, str]:
    """("block3_conv2", "backward") from ".../transpose(jvp(VGG))/block3_conv2/..."."""
    if not op_name:
        return "(no metadata)", ""
    segments = [p for p in op_name.split("/") if not re.fullmatch(r"\w*\(.*\)", p)]
    layer = segments[0] if len(segments) > 1 else "(outside the model: loss, optimizer, metrics)"
    return layer, "backward" if "transpose(" in op_name else "forward"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--mode", choices=bench.MODES, default="train")
    parser.add_argument("--steps", type=int, default=5, help="traced steps")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--hlo", help="also write the compiled HLO text here")
    args = parser.parse_args()
    # The `cnnjax` program's allocator and dispatch settings (see cli.tune_malloc), so
    # that the figures are those of `cnnjax bench` and `cnnjax train`.
    cli.tune_malloc()

    _, steps, state, batch, options, _ = bench._build(args.model, args.batch, "float32", 0)
    if args.mode == "train":
        compiled = steps.train_step.lower(state, batch).compile(options)

        def run(s):
            return compiled(s, batch)[0]
    else:
        compiled = steps.eval_step.lower(state.params, batch).compile(options)

        def run(s):
            jax.block_until_ready(compiled(s.params, batch))
            return s
    hlo = compiled.as_text()
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(hlo)
    names = _op_names(hlo)

    times = []
    for i in range(args.steps + 2):
        t0 = time.perf_counter()
        state = jax.block_until_ready(run(state))
        if i >= 2:
            times.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.steps):
                state = jax.block_until_ready(run(state))
        (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]

    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in names:
            per_op[e["name"]] += e["dur"] / 1e3 / args.steps
    total = sum(per_op.values())
    print(f"{args.model} {args.mode} batch {args.batch}: step {1e3 * statistics.median(times):.1f}"
          f" ms median (untraced); op time {total:.1f} ms per step (ops may overlap)")
    print(f"\n{'ms/step':>9}  {'HLO op':30s} {'shape':28s} JAX op")
    for name, ms in per_op.most_common(args.top):
        shape, op = names[name]
        op = re.sub(r"jit\((train|eval)_step\)/", "", op)
        print(f"{ms:9.2f}  {name:30s} {shape:28s} {op[:90]}")
    by_layer: collections.Counter = collections.Counter()
    for name, ms in per_op.items():
        by_layer[_layer_and_pass(names[name][1])] += ms
    print(f"\n{'ms/step':>9}  layer / pass")
    for (layer, pass_), ms in by_layer.most_common():
        print(f"{ms:9.2f}  {layer} {pass_}")


if __name__ == "__main__":
    main()
