"""Throughput of the real jitted train/eval step on synthetic data, with FLOPs and MFU.

``run_benchmark("lenet5", batch=128, mode="train")`` builds the trainer's own
:class:`cnnjax.train.steps.Steps` (the same ``train_step`` / ``eval_step``,
shardings, buffer donation and XLA options as ``cnnjax train``), compiles the
step ahead of time (timed: ``compile_s``), feeds it one synthetic uint8 batch
that already lives on the device, excludes the warm-up steps, and times every
step to ``block_until_ready``. It returns a dict (what ``cnnjax bench --json``
prints):

* ``images_per_sec`` = batch / median step time; ``step_time_s`` (median),
  ``step_time_min_s``, ``step_time_max_s``.
* ``flops_per_image``: counted from the layer shapes, 2 x the multiply-adds of
  every convolution and dense layer (``H_out * W_out * F_h * F_w * C_in * C_out``
  and ``in * out``) for one image's forward pass, x3 for a train step (forward,
  dL/dx, dL/dW). Activations, pooling, LRN, the loss and the optimizer are not
  counted (they are a few percent at most). ``xla_flops_per_image`` is XLA's own
  count (``compiled.cost_analysis()``) divided by the batch, as a cross-check.
  XLA counts the body of a loop once: weight gradients computed block by block
  in a loop (``weight_grad_impl`` "im2col", and "row_col", which the CPU picks
  for VGG's 64-channel layers) are undercounted, and so is ``hfu`` below.
* ``achieved_flops`` = flops_per_image x images_per_sec (FLOP/s).
* ``peak_flops``: the device's matmul throughput measured in this process (a
  jitted square ``dot`` in the compute dtype, best of several runs just before
  and just after the timed steps), and
  ``mfu`` = achieved_flops / peak_flops. These are model FLOPs (the direct
  convolution's count, as MFU is usually defined): a layer computed in
  Winograd's form does 4/9 of them, so MFU can pass 100%.
* ``hfu`` = XLA's counted FLOPs per second / peak_flops: the utilisation of the
  arithmetic the compiled step actually performs.
* ``peak_memory_bytes`` where the backend reports it (``None`` on CPU).

``peer="torch"`` also times an equivalent PyTorch model (``cnnjax.bench_torch``)
in the same process, in alternating blocks of consecutive steps (the first step
of each block untimed: the other framework's threads are still busy then), and adds
``peer_*`` keys and ``speedup_vs_peer`` (cnnjax images/s over PyTorch's).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["run_benchmark", "model_flops_per_image", "layer_macs", "measure_matmul_peak",
           "format_result", "MODES"]

MODES = ("train", "infer")
_JSON_KEYS = ("model", "mode", "batch", "dtype", "device", "images_per_sec", "step_time_s",
              "compile_s", "flops_per_image", "achieved_flops", "peak_flops", "mfu")


# --------------------------------------------------------------------------- FLOPs

def layer_macs(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> list[dict]:
    """Multiply-adds per image of every conv and dense layer, from the traced shapes.

    Every module call whose own parameters hold a ``kernel`` (conv HWIO or
    dense (in, out)) gives ``prod(output spatial dims) * prod(kernel shape)``
    multiply-adds per image (a dense layer has no spatial dims; a grouped conv's
    kernel is already (F_h, F_w, C_in / groups, C_out)). Traced with
    :func:`jax.eval_shape`, so nothing is materialized. Returns one dict per
    layer: ``name``, ``output_shape`` (batch 1), ``kernel_shape``, ``macs``.
    """
    input_shape = tuple(input_shape or model.input_shape)
    rows: list[dict] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if context.method_name != "__call__" or mod.scope is None:
            return out
        own = mod.scope.get_variable("params", "kernel") if mod.scope.has_variable(
            "params", "kernel") else None
        if own is not None and hasattr(out, "shape"):
            kernel = tuple(own.shape)
            spatial = int(np.prod(out.shape[1:-1])) if len(out.shape) > 2 else 1
            rows.append({"name": "/".join(mod.scope.path), "output_shape": tuple(out.shape),
                         "kernel_shape": kernel, "macs": spatial * int(np.prod(kernel))})
        return out

    def run(x):
        variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
        with nn.intercept_methods(record):
            model.apply(variables, x)

    jax.eval_shape(run, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    return rows


def model_flops_per_image(model: nn.Module, mode: str = "infer",
                          input_shape: tuple[int, ...] | None = None) -> int:
    """2 x the conv/dense multiply-adds of one image; x3 for ``mode="train"``."""
    _check_mode(mode)
    forward = 2 * sum(row["macs"] for row in layer_macs(model, input_shape))
    return forward * (3 if mode == "train" else 1)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is unknown; use one of {', '.join(MODES)}.")


# --------------------------------------------------------------------------- peak

def measure_matmul_peak(dtype: str = "float32", n: int | None = None,
                        repeats: int | None = None) -> dict[str, Any]:
    """FLOP/s of a jitted n x n x n ``dot`` in ``dtype`` on the default device, best run.

    n defaults to 2048 on CPU (about 0.1 s a product on 2 cores) and 8192 on
    accelerators. Returns ``{"peak_flops", "n", "dtype", "repeats"}``.
    """
    backend = jax.default_backend()
    n = n or (2048 if backend == "cpu" else 8192)
    repeats = repeats or (5 if backend == "cpu" else 20)
    jdtype = jnp.dtype(dtype)
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(jdtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(jdtype)
    dot = jax.jit(lambda a, b: a @ b)
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return {"peak_flops": 2.0 * n ** 3 / best, "n": n, "dtype": str(jdtype), "repeats": repeats}


# --------------------------------------------------------------------------- the step

def _xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def _peak_memory() -> int | None:
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:
        return None
    if not stats:
        return None
    value = stats.get("peak_bytes_in_use")
    return int(value) if value is not None else None


def _device_text() -> str:
    dev = jax.devices()[0]
    return f"{jax.device_count()}x {dev.device_kind} ({dev.platform})"


def _build(model_name: str, batch: int, dtype: str, seed: int, *,
           compile_train_step: bool = False):
    """The trainer's Steps for this model, a state on the mesh and one synthetic batch.

    ``compile_train_step``: compile the train step in a background thread while the
    parameters initialize, as ``cnnjax train`` starts (``steps.train_step`` is then
    the compiled executable).
    """
    from cnnjax import models
    from cnnjax.data import augment
    from cnnjax.train import mesh as mesh_lib
    from cnnjax.train import optim
    from cnnjax.train.config import default_config
    from cnnjax.train.loop import DTYPES, build_model, compiler_options
    from cnnjax.train.state import count_params, create_state
    from cnnjax.train.steps import Steps

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is unknown; use one of {', '.join(DTYPES)}.")
    config = default_config()
    config.model = model_name
    config.dtype = dtype
    config.dataset = "synthetic"
    config.batch_size = batch
    config.eval_batch_size = batch
    config.optimizer = "sgd"            # the papers' optimizer; PyTorch's peer uses the same
    config.momentum = 0.9
    config.learning_rate = 0.01
    config.schedule = "constant"
    config.augment = augment.default_config()  # no random transforms: time the network
    devices = jax.device_count()
    if batch < 1 or batch % devices or batch % jax.process_count():
        raise ValueError(f"batch={batch} must be a positive multiple of the device count "
                         f"({devices}), e.g. --batch {max(devices, 128 // devices * devices)}.")
    if model_name not in models.available():
        raise ValueError(f"model {model_name!r} is unknown; use one of "
                         f"{', '.join(models.available())}.")
    model = build_model(config)
    num_classes = int(model.num_classes)
    image_shape = tuple(model.input_shape)
    schedule = optim.make_schedule(config, steps_per_epoch=100, total_steps=1000)
    tx = optim.make_optimizer(config, schedule)
    mesh = mesh_lib.make_mesh()
    channels = image_shape[-1]
    steps = Steps(model, tx, schedule, mesh=mesh, num_classes=num_classes,
                  preprocess=augment.preprocess, augment_config=config.augment,
                  mean=[0.5] * channels, std=[0.25] * channels,
                  compiler_options=compiler_options(config),
                  eval_compiler_options=compiler_options(config, inference=True))
    rng = jax.random.PRNGKey(seed)
    local = batch // jax.process_count()
    np_rng = np.random.default_rng(seed)
    host_batch = {
        "image": np_rng.integers(0, 256, (local, *image_shape), dtype=np.uint8),
        "label": np_rng.integers(0, num_classes, (local,), dtype=np.int32),
        "mask": np.ones((local,), bool),
    }

    def init(key):
        return create_state(model, tx, key, image_shape)

    lowered = jax.jit(init, out_shardings=mesh_lib.replicated(mesh)).lower(rng)
    wait_for_compile = None
    if compile_train_step:
        wait_for_compile = steps.compile_in_background(lowered.out_info, host_batch)
    state = lowered.compile(compiler_options(
        config, run_once=True, num_params=count_params(lowered.out_info.params)))(rng)
    if wait_for_compile is not None:
        wait_for_compile()
    device_batch = mesh_lib.global_batch(mesh, host_batch)
    return model, steps, state, device_batch, compiler_options(config), num_classes


def run_benchmark(model: str = "lenet5", batch: int = 128, mode: str = "train", *,
                  dtype: str = "float32", steps: int = 20, warmup: int = 2,
                  peer: str | None = None, measure_peak: bool = True,
                  seed: int = 0) -> dict[str, Any]:
    """Times ``steps`` calls of the real jitted step; returns the figures as a dict.

    Args:
      model: a registered model name (``cnnjax.models.available()``).
      batch: global batch size (a multiple of the device count).
      mode: ``"train"`` (the trainer's train_step: forward, backward, SGD-momentum
        update) or ``"infer"`` (its eval_step: forward and the metric sums).
      dtype: compute dtype, ``"float32"`` or ``"bfloat16"`` (parameters stay float32).
      steps: timed steps (after ``warmup`` untimed ones).
      peer: ``"torch"`` to time the PyTorch equivalent alternately in this process.
      measure_peak: measure the matmul peak (else ``peak_flops`` and ``mfu`` are None).

    See the module docstring for the keys.
    """
    _check_mode(mode)
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, "
                         f"warmup={warmup}.")
    if peer not in (None, "torch"):
        raise ValueError(f"peer {peer!r} is unknown; the only peer is 'torch'.")
    flax_model, built_steps, state, device_batch, options, num_classes = _build(
        model, batch, dtype, seed)
    flops_per_image = model_flops_per_image(flax_model, mode)

    # ---- compile ahead of time, as the trainer does (timed)
    t0 = time.perf_counter()
    if mode == "train":
        compiled = built_steps.train_step.lower(state, device_batch).compile(options)
    else:
        compiled = built_steps.eval_step.lower(state.params, device_batch).compile(options)
    compile_s = time.perf_counter() - t0
    xla_flops = _xla_flops(compiled)

    holder = {"state": state}
    if mode == "train":
        def jax_step() -> None:
            new_state, metrics = compiled(holder["state"], device_batch)
            jax.block_until_ready((new_state, metrics))
            holder["state"] = new_state
    else:
        params = state.params

        def jax_step() -> None:
            jax.block_until_ready(compiled(params, device_batch))

    fns: dict[str, Callable[[], None]] = {"jax": jax_step}
    peer_info: dict[str, Any] = {}
    if peer == "torch":
        from cnnjax import bench_torch

        peer_step, peer_info = bench_torch.make_step(
            model, batch=batch, mode=mode, dtype=dtype, num_classes=num_classes,
            input_shape=tuple(flax_model.input_shape), seed=seed)
        fns["peer"] = peer_step

    # The matmul peak is measured just before and just after the timed steps and the
    # higher kept: a shared machine's load lowers a single measurement.
    peaks = [measure_matmul_peak(dtype)] if measure_peak else []
    times = _time_alternately(fns, steps, warmup)
    if measure_peak:
        peaks.append(measure_matmul_peak(dtype))
    result = _figures(times["jax"], batch, flops_per_image)
    result = {"model": model, "mode": mode, "batch": batch, "dtype": dtype,
              "device": _device_text(), "backend": jax.default_backend(), "steps": steps,
              "warmup": warmup, **result, "compile_s": compile_s,
              "flops_per_image": flops_per_image,
              "xla_flops_per_image": xla_flops / batch if xla_flops is not None else None}
    result["achieved_flops"] = flops_per_image * result["images_per_sec"]
    peak = max(peaks, key=lambda p: p["peak_flops"]) if peaks else None
    result["peak_flops"] = peak["peak_flops"] if peak else None
    result["peak_matmul_n"] = peak["n"] if peak else None
    result["mfu"] = (result["achieved_flops"] / result["peak_flops"]) if peak else None
    result["hfu"] = (xla_flops / batch * result["images_per_sec"] / result["peak_flops"]
                     if peak and xla_flops else None)
    result["peak_memory_bytes"] = _peak_memory()
    if peer == "torch":
        figures = _figures(times["peer"], batch, flops_per_image)
        result["peer"] = "torch"
        result.update({f"peer_{k}": v for k, v in figures.items()})
        result["peer_achieved_flops"] = flops_per_image * figures["images_per_sec"]
        result["peer_mfu"] = (result["peer_achieved_flops"] / result["peak_flops"]
                              if peak else None)
        result.update({f"peer_{k}": v for k, v in peer_info.items()})
        result["speedup_vs_peer"] = result["images_per_sec"] / figures["images_per_sec"]
        # Fastest step against fastest step: less sensitive to other load on the machine.
        result["speedup_vs_peer_min"] = figures["step_time_min_s"] / result["step_time_min_s"]
    try:
        result["loadavg_1min"] = os.getloadavg()[0]
    except (AttributeError, OSError):
        result["loadavg_1min"] = None
    return result


# Timed steps per block when a peer runs alongside (see _time_alternately).
TIMED_STEPS_PER_BLOCK = 4


def _time_alternately(fns: dict[str, Callable[[], None]], steps: int, warmup: int,
                      block: int = TIMED_STEPS_PER_BLOCK) -> dict[str, list[float]]:
    """Seconds per call of each function: ``steps`` timed calls each.

    The functions take turns in blocks of ``block`` consecutive timed calls, the
    order reversed every other round, so that drift in the machine's speed hits all
    alike. With more than one function every block starts with one untimed call:
    a framework's worker threads keep spinning for some milliseconds after its step
    (PyTorch's OpenMP threads, XLA's pool), and a step of the other framework
    started at once runs on what is left of the cores. Alternating single steps,
    LeNet-5's 11-12 ms JAX train step measured 15-17 ms after each PyTorch step.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}.")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    switching = len(fns) > 1
    for round_index in range(-(-steps // block)):
        for name in (names if round_index % 2 == 0 else names[::-1]):
            fn = fns[name]
            if switching:
                fn()
            for _ in range(min(block, steps - len(times[name]))):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def _figures(times: list[float], batch: int, flops_per_image: int) -> dict[str, float]:
    median = statistics.median(times)
    return {"images_per_sec": batch / median, "step_time_s": median,
            "step_time_min_s": min(times), "step_time_max_s": max(times)}


# --------------------------------------------------------------------------- report

def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.2f} {unit}"


def format_result(r: dict[str, Any]) -> str:
    """The human-readable report of a :func:`run_benchmark` result."""
    ms = 1e3
    lines = [
        f"cnnjax bench: {r['model']} {r['mode']}, batch {r['batch']}, {r['dtype']}, "
        f"{r['device']}, {r['steps']} timed steps after {r['warmup']} warm-up",
        f"  images/s        {r['images_per_sec']:,.1f}",
        f"  step time       {r['step_time_s'] * ms:.2f} ms median "
        f"(min {r['step_time_min_s'] * ms:.2f}, max {r['step_time_max_s'] * ms:.2f})",
        f"  compile         {r['compile_s']:.2f} s",
    ]
    basis = "2 x conv/dense MACs" + (" x 3 (train)" if r["mode"] == "train" else "")
    flops = f"  FLOPs/image     {_si(r['flops_per_image'], 'FLOP')} ({basis})"
    if r.get("xla_flops_per_image"):
        flops += (f"; XLA cost analysis {_si(r['xla_flops_per_image'], 'FLOP')} "
                  f"({r['xla_flops_per_image'] / r['flops_per_image']:.2f}x)")
    lines.append(flops)
    lines.append(f"  achieved        {_si(r['achieved_flops'], 'FLOP/s')}")
    if r.get("peak_flops"):
        lines.append(f"  matmul peak     {_si(r['peak_flops'], 'FLOP/s')} (jitted {r['dtype']} "
                     f"dot {r['peak_matmul_n']}^3, best run before/after the steps)")
        hfu = (f"; HFU {100 * r['hfu']:.1f}% (XLA's count of the FLOPs it runs)"
               if r.get("hfu") else "")
        lines.append(f"  MFU             {100 * r['mfu']:.1f}% (model FLOPs){hfu}")
    memory = r.get("peak_memory_bytes")
    lines.append("  peak memory     " + (f"{memory / 2**20:,.1f} MiB" if memory else "n/a"))
    if r.get("peer"):
        mfu = f", MFU {100 * r['peer_mfu']:.1f}%" if r.get("peer_mfu") else ""
        lines.append(
            f"  peer {r['peer']:<10} {r['peer_images_per_sec']:,.1f} images/s, "
            f"{r['peer_step_time_s'] * ms:.2f} ms median (min {r['peer_step_time_min_s'] * ms:.2f}"
            f", max {r['peer_step_time_max_s'] * ms:.2f}){mfu}; {r.get('peer_version', '')} "
            f"{r.get('peer_threads', '')} threads".rstrip())
        lines.append(f"  cnnjax / {r['peer']}    {r['speedup_vs_peer']:.2f}x images/s, median "
                     f"steps ({r['speedup_vs_peer_min']:.2f}x fastest steps; alternating "
                     f"blocks of {TIMED_STEPS_PER_BLOCK} steps, same process)")
    if r.get("loadavg_1min") is not None:
        lines.append(f"  load average    {r['loadavg_1min']:.2f} (1 min)")
    return "\n".join(lines)


def to_json(r: dict[str, Any]) -> str:
    """One JSON line; the keys of ``_JSON_KEYS`` first."""
    ordered = {k: r.get(k) for k in _JSON_KEYS}
    ordered.update({k: v for k, v in r.items() if k not in ordered})
    return json.dumps(ordered)
