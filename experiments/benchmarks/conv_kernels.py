"""Figures for the cnnjax kernels: conv2d (forward, forward+backward) and LRN.

Every case times a set of competitors in the same process: jitted, warm-up
(compile) excluded, ``block_until_ready``, the runs of the competitors
interleaved (the order reversed every other round) so that machine drift hits
them alike; the median of the runs is reported with its ratio against the
baseline of the case (autodiff of ``lax.conv_general_dilated``, or the naive
jnp LRN). A ratio > 1 means faster than the baseline.

    python experiments/benchmarks/conv_kernels.py            # full table
    python experiments/benchmarks/conv_kernels.py --quick    # fewer runs and cases
    python experiments/benchmarks/conv_kernels.py --json     # one JSON line per measurement

PyTorch (``pip install torch==2.13.0``) is timed as a peer when it imports,
with ``torch.set_num_threads`` equal to the CPU count XLA uses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnjax import cli
from cnnjax.ops import local_response_norm
from cnnjax.ops.conv import conv2d

try:  # optional peer
    import torch
    import torch.nn.functional as torch_f
except ImportError:  # pragma: no cover - depends on the machine
    torch = None

_DN = ("NHWC", "HWIO", "NHWC")


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def time_interleaved(
    fns: dict[str, Callable[[], object]], runs: int, cpu_times: dict | None = None
) -> dict[str, list[float]]:
    """Run every callable once to warm up, then ``runs`` alternating rounds.

    Returns the wall-clock seconds per call; the process CPU seconds per call
    (all threads) go into ``cpu_times`` when given.
    """
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(runs):
        for name in names if r % 2 == 0 else names[::-1]:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            t1, c1 = time.perf_counter(), time.process_time()
            times[name].append(t1 - t0)
            if cpu_times is not None:
                cpu_times.setdefault(name, []).append(c1 - c0)
    return times


def _ready(out):
    return jax.block_until_ready(out)


def conv_competitors(
    n, h, w, c, k, f, stride, dilation, padding, mode, impls, with_torch, seed=0
) -> tuple[str, dict[str, Callable[[], object]]]:
    """Callables for one conv case; the first one is the baseline."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    kern = jnp.asarray(rng.standard_normal((f, f, c, k)) / np.sqrt(f * f * c), jnp.float32)
    s, d, p = _pair(stride), _pair(dilation), _pair(padding)
    pads = ((p[0], p[0]), (p[1], p[1]))

    def lax_conv(a, b):
        return lax.conv_general_dilated(a, b, s, pads, rhs_dilation=d, dimension_numbers=_DN)

    y_shape = jax.eval_shape(lax_conv, x, kern).shape
    ct = jnp.asarray(rng.standard_normal(y_shape), jnp.float32)

    def fwd_bwd(fn):
        def run(a, b, g):
            y, vjp = jax.vjp(fn, a, b)
            return (y, *vjp(g))

        return jax.jit(run)

    fns: dict[str, Callable[[], object]] = {}
    if mode == "fwd":
        base = jax.jit(lax_conv)
        fns["lax"] = lambda: _ready(base(x, kern))
    else:
        base = fwd_bwd(lax_conv)
        fns["lax autodiff"] = lambda: _ready(base(x, kern, ct))
    for dil_impl, wg_impl in impls:
        if mode == "fwd" and wg_impl != impls[0][1]:
            continue

        def ours(a, b, dil_impl=dil_impl, wg_impl=wg_impl):
            return conv2d(
                a, b, stride=s, padding=p, dilation=d,
                dilation_impl=dil_impl, weight_grad_impl=wg_impl,
            )  # fmt: skip

        name = f"cnnjax {dil_impl}" + ("" if mode == "fwd" else f"/{wg_impl}")
        if mode == "fwd":
            jf = jax.jit(ours)
            fns[name] = lambda jf=jf: _ready(jf(x, kern))
        else:
            jf = fwd_bwd(ours)
            fns[name] = lambda jf=jf: _ready(jf(x, kern, ct))
    if with_torch:
        tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
        tw = torch.from_numpy(np.asarray(kern).transpose(3, 2, 0, 1).copy())
        tct = torch.from_numpy(np.asarray(ct).transpose(0, 3, 1, 2).copy())

        if mode == "fwd":

            def torch_run():
                with torch.no_grad():
                    return torch_f.conv2d(tx, tw, stride=s, padding=p, dilation=d)
        else:
            txg = tx.clone().requires_grad_(True)
            twg = tw.clone().requires_grad_(True)

            def torch_run():
                txg.grad = None
                twg.grad = None
                y = torch_f.conv2d(txg, twg, stride=s, padding=p, dilation=d)
                y.backward(tct)
                return y, txg.grad, twg.grad

        fns["torch"] = torch_run
    label = f"conv {f}x{f} {c}->{k} {n}x{h}x{w} s{s[0]} d{d[0]} p{p[0]} {mode}"
    return label, fns


def naive_lrn(x, size=5, k=2.0, alpha=1e-4, beta=0.75):
    """Paper LRN as a sum of shifted squares; differentiated by autodiff."""
    sq = jnp.pad(x * x, ((0, 0),) * (x.ndim - 1) + ((size // 2, (size - 1) // 2),))
    c = x.shape[-1]
    total = sum(sq[..., j : j + c] for j in range(size))
    return x / (k + alpha * total) ** beta


def lrn_competitors(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    ct = jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def fwd_bwd(fn):
        def run(a, g):
            y, vjp = jax.vjp(fn, a)
            return (y, *vjp(g))

        return jax.jit(run)

    naive = fwd_bwd(naive_lrn)
    ours = fwd_bwd(local_response_norm)
    fns = {
        "naive jnp autodiff": lambda: _ready(naive(x, ct)),
        "cnnjax custom_vjp": lambda: _ready(ours(x, ct)),
    }
    if torch is not None:
        lrn = torch.nn.LocalResponseNorm(5, alpha=5 * 1e-4, beta=0.75, k=2.0)
        tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_(True)
        tct = torch.from_numpy(np.asarray(ct).transpose(0, 3, 1, 2).copy())

        def torch_run():
            tx.grad = None
            y = lrn(tx)
            y.backward(tct)
            return y, tx.grad

        fns["torch"] = torch_run
    return "lrn size 5 " + "x".join(map(str, shape)) + " fwd+bwd", fns


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs and cases")
    parser.add_argument("--json", action="store_true", help="one JSON line per measurement")
    parser.add_argument("--runs", type=int, default=None, help="rounds per case")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    parser.add_argument("--only", default="", help="run only cases whose label contains this")
    args = parser.parse_args(argv)
    # The `cnnjax` program's allocator and dispatch settings (see cli.tune_malloc), so
    # that the figures are those of `cnnjax bench` and `cnnjax train`.
    cli.tune_malloc()
    runs = args.runs or (3 if args.quick else 7)
    with_torch = torch is not None and not args.no_torch
    threads = os.cpu_count() or 1
    if with_torch:
        torch.set_num_threads(threads)

    impls = [
        ("native", "per_image"),
        ("native", "im2col"),
        ("native", "stacked"),
        ("native", "offsets"),
        ("native", "xla"),
    ]
    if args.quick:  # only the default weight gradient
        impls = impls[:1]
    s2b = [("space_to_batch", "per_image")]
    cases = []  # (n, h, w, c, k, f, stride, dilation, padding, extra impls)
    batches = (1, 8)
    for n in batches:
        for d in (1, 2, 4):
            if args.quick and n == 8 and d != 1:
                continue
            cases.append((n, 128, 128, 64, 64, 3, 1, d, d, [] if d == 1 else s2b))
    if not args.quick:
        cases.append((16, 227, 227, 3, 96, 11, 4, 1, 0, []))  # AlexNet conv1
        cases.append((4, 224, 224, 64, 64, 3, 1, 1, 1, []))  # VGG conv1_2
    else:
        cases.append((4, 227, 227, 3, 96, 11, 4, 1, 0, []))

    header = {
        "machine": platform.processor() or platform.machine(),
        "cpus": threads,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "torch": torch.__version__ if with_torch else None,
        "runs": runs,
        # Other processes on the machine distort the figures: record the load.
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    if args.json:
        print(json.dumps({"header": header}))
    else:
        print(" ".join(f"{key}={val}" for key, val in header.items()))

    def report(label, fns):
        cpu: dict[str, list[float]] = {}
        times = time_interleaved(fns, runs, cpu)
        base_name = next(iter(times))
        base = statistics.median(times[base_name])
        if not args.json:
            print(f"\n{label}")
        for name, ts in times.items():
            med = statistics.median(ts)
            row = {
                "case": label,
                "impl": name,
                "median_ms": round(med * 1e3, 2),
                "min_ms": round(min(ts) * 1e3, 2),
                "cpu_ms": round(statistics.median(cpu[name]) * 1e3, 2),
                "speedup_vs_" + base_name.replace(" ", "_"): round(base / med, 3),
            }
            if args.json:
                print(json.dumps(row))
            else:
                print(
                    f"  {name:30s} {med * 1e3:9.1f} ms   x{base / med:5.2f} vs {base_name}"
                    f"   (cpu {statistics.median(cpu[name]) * 1e3:8.1f} ms)"
                )

    for n, h, w, c, k, f, s, d, p, extra in cases:
        for mode in ("fwd", "fwd+bwd"):
            label, fns = conv_competitors(
                n, h, w, c, k, f, s, d, p, mode, impls + extra, with_torch
            )
            if args.only and args.only not in label:
                continue
            report(label, fns)
    for shape in [(8, 55, 55, 96)] + ([] if args.quick else [(8, 27, 27, 256)]):
        label, fns = lrn_competitors(shape)
        if args.only and args.only not in label:
            continue
        report(label, fns)


if __name__ == "__main__":
    main()
