"""The training loop: ``train_and_evaluate(config, workdir)`` and ``evaluate``.

Read top to bottom: set-up, mesh, input, model, sharding and init,
checkpoint/resume, steps, loop, final evaluation. Every random draw of step
``s`` (data order, augmentation, dropout) is a pure function of
``(config.seed, s)``, so a run resumed from the checkpoint at step ``s`` ends
with the same parameters as one that never stopped.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from cnnjax.train import mesh as mesh_lib
from cnnjax.train import optim
from cnnjax.train.checkpoint import CheckpointError, Checkpoints
from cnnjax.train.metrics import MetricWriter, Progress
from cnnjax.train.state import TrainState, count_params, create_state
from cnnjax.train.steps import Steps

log = logging.getLogger("cnnjax.train")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


# --------------------------------------------------------------------------- set-up

def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """``jax.distributed.initialize()`` when the run spans several processes.

    Turned on by ``config.distributed`` or the environment variable
    ``CNNJAX_DISTRIBUTED=1`` (set it on every host of a TPU pod slice; the
    coordinator is discovered automatically there). Must run before any other
    JAX call; a second call is a no-op.
    """
    wanted = bool(config.get("distributed", False)) or os.environ.get("CNNJAX_DISTRIBUTED") == "1"
    if not wanted:
        return
    if not jax.distributed.is_initialized():
        jax.distributed.initialize()


def enable_compilation_cache(directory: str) -> None:
    """Turns on JAX's persistent compilation cache (re-runs skip XLA compiles)."""
    if not directory or jax.config.jax_compilation_cache_dir:
        return
    directory = os.path.expanduser(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return  # a read-only home: just compile
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _resolve_workdir(workdir: str, *, create: bool) -> str:
    """An absolute local path (created), or a remote URL such as gs://bucket/run as is."""
    workdir = os.fspath(workdir)
    if "://" in workdir:
        return workdir
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if create:
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError as err:
            raise ValueError(f"workdir {workdir!r} cannot be created ({err.strerror}); "
                             "pass a writable --workdir.") from None
    return workdir


def compiler_options(config: ml_collections.ConfigDict, *,
                     run_once: bool = False) -> dict[str, Any] | None:
    """XLA options that cut compile time on CPU (``config.fast_cpu_compile``).

    On a laptop CPU compiling dominates a short run. LLVM's expensive passes
    cost ~30% of a LeNet-5 train step's compile and nothing measurable in its
    run time; a program run once (the parameter init) is compiled without
    backend optimization at all (~10x faster to compile: 5 s -> 0.5 s here).
    GPUs and TPUs are left alone.
    """
    if not config.get("fast_cpu_compile", True) or jax.default_backend() != "cpu":
        return None
    if run_once:
        return {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    return {"xla_llvm_disable_expensive_passes": True}


def _validate(config: ml_collections.ConfigDict) -> None:
    if config.num_epochs <= 0:
        raise ValueError(f"num_epochs must be > 0, got {config.num_epochs}.")
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype {config.dtype!r} is unknown; use one of {', '.join(DTYPES)}.")
    mesh_lib.check_batch_size(config.batch_size)
    mesh_lib.check_batch_size(config.eval_batch_size, "eval_batch_size")


# --------------------------------------------------------------------------- model and data

def build_model(config: ml_collections.ConfigDict, num_classes: int | None = None):
    """The model named by the config (``cnnjax.models.get``)."""
    from cnnjax import models

    kwargs: dict[str, Any] = {"dtype": DTYPES[config.dtype]}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if config.get("dropout_rate", -1.0) >= 0:
        kwargs["dropout_rate"] = float(config.dropout_rate)
    return models.get(config.model, **kwargs)


def build_source(config: ml_collections.ConfigDict):
    """The data source, producing images at the model's input shape."""
    from cnnjax.data import get_source

    image_shape = tuple(config.get("image_shape", ()) or ())
    if not image_shape:
        image_shape = tuple(build_model(config).input_shape)
    options: dict[str, Any] = {}
    if config.dataset != "synthetic":
        options = {"fit": config.get("image_fit", "resize"),
                   "num_workers": int(config.get("data_workers", 0))}
    return get_source(config.dataset, image_shape=image_shape,
                      data_dir=config.data_dir or None, **options), image_shape


def model_input_shape(config: ml_collections.ConfigDict,
                      image_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The model's input: the source's images, or their random/center crop."""
    crop = int(config.augment.get("crop", 0) or 0)
    if crop:
        return (crop, crop, image_shape[-1])
    return tuple(image_shape)


def _log_parameters(model, abstract_params, image_shape) -> None:
    """The Keras-style parameter table (cnnjax.summary), else a per-layer count."""
    try:
        from cnnjax.summary import summary

        log.info("parameters:\n%s", summary(model, image_shape))
        return
    except Exception as err:  # a model summary cannot trace: fall back to counting
        log.debug("cnnjax.summary failed (%s); counting parameters instead", err)
    lines = [f"{'layer':<24}{'params':>14}"]
    for name, sub in abstract_params.items():
        lines.append(f"{name:<24}{count_params(sub):>14,}")
    lines.append(f"{'total':<24}{count_params(abstract_params):>14,}")
    log.info("parameters:\n%s", "\n".join(lines))


# --------------------------------------------------------------------------- evaluation

def _sum_metrics(total: dict | None, new: dict) -> dict:
    if total is None:
        return dict(new)
    return {k: total[k] + new[k] for k in total}


def run_eval(steps: Steps, params, source, mesh, eval_batch_size: int,
             split: str = "test") -> dict[str, float]:
    """Loss, top-1 (and top-5) accuracy over a whole split; padding rows excluded."""
    sums = None
    for batch in source.eval_batches(eval_batch_size, split=split,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count()):
        sums = _sum_metrics(sums, steps.eval_step(params, mesh_lib.global_batch(mesh, batch)))
    if sums is None:
        return {}
    sums = jax.device_get(sums)
    count = max(float(sums["count"]), 1.0)
    result = {f"{split}_loss": float(sums["loss_sum"]) / count,
              f"{split}_accuracy": float(sums["correct"]) / count}
    if "top5_correct" in sums and source.info.num_classes > 10:
        result[f"{split}_top5_accuracy"] = float(sums["top5_correct"]) / count
    return result


# --------------------------------------------------------------------------- train

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains ``config.model`` on ``config.dataset`` in ``workdir``; returns final metrics.

    Resumes from the newest complete checkpoint in ``workdir/checkpoints``.
    The returned dict holds the last epoch's ``train_loss``, ``train_accuracy``,
    ``test_loss``, ``test_accuracy`` (``test_top5_accuracy`` when there are
    more than 10 classes), plus ``step``, ``epoch``, ``wall_time_s``,
    ``train_step_traces`` (1 when the step compiled once; 0 when there was
    nothing left to train), ``last_checkpoint_step`` and ``params`` (the final
    parameters, replicated on the mesh).

    The train and eval steps are compiled ahead of time in a background thread
    while the parameters are initialized or restored; the compiled executables
    cannot recompile, so a batch of another shape is an error, never a silent
    recompile.
    """
    t_start = time.time()
    maybe_initialize_distributed(config)
    _validate(config)
    enable_compilation_cache(config.get("compilation_cache_dir", ""))
    workdir = _resolve_workdir(workdir, create=True)
    is_main = jax.process_index() == 0
    writer = MetricWriter(workdir, enabled=is_main)

    # ---- mesh
    mesh = mesh_lib.make_mesh()
    log.info("devices: %d x %s over %d process(es); global batch %d",
             jax.device_count(), jax.devices()[0].platform, jax.process_count(),
             config.batch_size)

    # ---- input
    source, image_shape = build_source(config)
    info = source.info
    steps_per_epoch = source.steps_per_epoch(config.batch_size)
    total_steps = int(config.num_epochs) * steps_per_epoch
    stop_at = total_steps
    if config.get("stop_after_steps", -1) > 0:
        stop_at = min(total_steps, int(config.stop_after_steps))
    log.info("data: %s, %d train / %d test images, %d classes, %s; %d steps/epoch",
             info.name, info.num_train, info.num_test, info.num_classes, image_shape,
             steps_per_epoch)

    # ---- model, optimizer
    model = build_model(config, info.num_classes)
    schedule = optim.make_schedule(config, steps_per_epoch, total_steps)
    tx = optim.make_optimizer(config, schedule)

    # ---- sharding and init: shapes first, then parameters born where they live
    replicated = mesh_lib.replicated(mesh)
    rng = jax.random.PRNGKey(config.seed)

    input_shape = model_input_shape(config, image_shape)

    def init(key):
        return create_state(model, tx, key, input_shape)

    abstract_state = jax.eval_shape(init, rng)
    _log_parameters(model, abstract_state.params, input_shape)
    ckpt = Checkpoints(workdir, max_to_keep=config.max_checkpoints_to_keep)
    step0 = ckpt.latest_step() or 0

    # ---- steps, compiled in a background thread while the state is built or restored
    from cnnjax.data import augment

    steps = Steps(model, tx, schedule, mesh=mesh, num_classes=info.num_classes,
                  preprocess=augment.preprocess, augment_config=config.augment,
                  mean=info.mean, std=info.std)
    batches = iter(())
    compile_errors: list[BaseException] = []
    compiler = None
    if step0 < stop_at:
        batches = source.train_batches(config.batch_size, seed=config.seed, start_step=step0,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count())
        first_batch = next(batches)
        batches = itertools.chain([first_batch], batches)

        def compile_steps() -> None:
            try:
                steps.compile(abstract_state, first_batch, config.eval_batch_size,
                              compiler_options(config))
            except BaseException as err:  # re-raised in the main thread
                compile_errors.append(err)

        log.info("compiling the train and eval steps...")
        compiler = threading.Thread(target=compile_steps, daemon=True)
        compiler.start()
    t_compile = time.time()

    # ---- checkpoint / resume (while the steps compile)
    config_dict = config.to_dict()
    try:
        if step0:
            state, step = ckpt.restore(abstract_state, replicated, step0)
            log.info("resumed from the checkpoint at step %d in %s", step, ckpt.directory)
        else:
            state = jax.jit(init, out_shardings=replicated).lower(rng).compile(
                compiler_options(config, run_once=True))(rng)
            step = 0
        if compiler is not None:
            compiler.join()
        if compile_errors:
            raise compile_errors[0]
    except BaseException:
        if compiler is not None:
            compiler.join()
        ckpt.close()
        raise
    if compiler is not None:
        log.info("compiled in %.1f s (%.1f s since start)", time.time() - t_compile,
                 time.time() - t_start)

    # ---- loop
    progress = Progress(total_steps, step, enabled=config.get("progress_bar", True) and is_main)
    pending: list[dict] = []                 # device metrics not yet fetched
    epoch_sums: dict[str, float] = {}
    interval_sums: dict[str, float] = {}
    interval_start, interval_images = time.time(), 0
    final: dict[str, Any] = {}
    last_saved = step if ckpt.latest_step() == step else -1
    warm = False
    evaluated_at = -1

    def flush(upto_step: int) -> None:
        """Fetches pending metrics, stops on a non-finite loss, updates the bar."""
        nonlocal pending
        if not pending:
            return
        fetched = jax.device_get(pending)
        first = upto_step - len(pending)
        for i, m in enumerate(fetched):
            if not math.isfinite(float(m["loss_sum"])):
                raise NonFiniteLossError(
                    f"the training loss became {float(m['loss_sum'])} at step {first + i + 1}; "
                    "lower --config.learning_rate or check the data (the last checkpoint "
                    "is left as it was).")
            for k in ("loss_sum", "correct", "count"):
                epoch_sums[k] = epoch_sums.get(k, 0.0) + float(m[k])
                interval_sums[k] = interval_sums.get(k, 0.0) + float(m[k])
        interval_sums["learning_rate"] = float(fetched[-1]["learning_rate"])
        progress.update(len(pending))
        pending = []

    try:
        while step < stop_at:
            batch = mesh_lib.global_batch(mesh, next(batches))
            # After the first (tracing) call, fail loudly on hidden host<->device copies.
            with jax.transfer_guard("disallow" if warm else "allow"):
                state, metrics = steps.train_step(state, batch)
            pending.append(metrics)
            step += 1
            interval_images += config.batch_size
            if not warm:  # time images/s from the second step on
                jax.block_until_ready(metrics)
                warm = True
                interval_start, interval_images = time.time(), 0
            epoch_end = step % steps_per_epoch == 0
            save_now = (step % config.checkpoint_every_steps == 0) or step == stop_at
            if step % config.log_every_steps == 0 or epoch_end or save_now:
                flush(step)
                elapsed = max(time.time() - interval_start, 1e-9)
                ips = interval_images / elapsed if interval_images else float("nan")
                count = max(interval_sums.get("count", 0.0), 1.0)
                writer.write(step, {"epoch": step / steps_per_epoch,
                                    "train_loss": interval_sums.get("loss_sum", 0.0) / count,
                                    "train_accuracy": interval_sums.get("correct", 0.0) / count,
                                    "learning_rate": interval_sums.get("learning_rate", 0.0),
                                    "images_per_sec": ips})
                progress.show(loss=interval_sums.get("loss_sum", 0.0) / count,
                              accuracy=interval_sums.get("correct", 0.0) / count,
                              images_per_sec=ips)
                interval_sums.clear()
                interval_start, interval_images = time.time(), 0
            if epoch_end:
                epoch = step // steps_per_epoch
                count = max(epoch_sums.get("count", 0.0), 1.0)
                record = {"epoch": epoch,
                          "train_loss": epoch_sums.get("loss_sum", 0.0) / count,
                          "train_accuracy": epoch_sums.get("correct", 0.0) / count}
                epoch_sums.clear()
                every = max(int(config.get("eval_every_epochs", 1)), 1)
                if epoch % every == 0 or step == total_steps:
                    record.update(run_eval(steps, state.params, source, mesh,
                                           config.eval_batch_size))
                    evaluated_at = step
                writer.write(step, record)
                final.update(record)
                msg = f"epoch {epoch}/{config.num_epochs}: " + ", ".join(
                    f"{k} {v:.4f}" for k, v in record.items() if k != "epoch")
                if progress.bar is not None:
                    progress.write(msg)  # above the bar
                else:
                    log.info(msg)
                interval_start, interval_images = time.time(), 0
            if save_now:
                if ckpt.save(step, state, config_dict):
                    last_saved = step
    finally:
        progress.close()
        ckpt.close()
        writer.close()

    if evaluated_at != step:  # stopped mid-epoch, or nothing left to train
        final.update(run_eval(steps, state.params, source, mesh, config.eval_batch_size))
    final.update(step=step, epoch=step / steps_per_epoch, wall_time_s=time.time() - t_start,
                 train_step_traces=steps.traces["train"], last_checkpoint_step=last_saved)
    final["params"] = state.params
    log.info("done at step %d: %s", step, ", ".join(
        f"{k} {v:.4f}" for k, v in final.items() if k.startswith("test_")))
    return final


# --------------------------------------------------------------------------- eval

def stored_config(workdir: str) -> ml_collections.ConfigDict:
    """The config saved beside the newest checkpoint in ``workdir``."""
    ckpt = Checkpoints(_resolve_workdir(workdir, create=False), read_only=True)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint in {ckpt.directory}; train first with "
                                  f"`cnnjax train --workdir {workdir}`.")
        return ml_collections.ConfigDict(ckpt.restore_config(step))
    finally:
        ckpt.close()


def evaluate(config: ml_collections.ConfigDict | None, workdir: str,
             split: str = "test") -> dict[str, Any]:
    """Evaluates the newest checkpoint in ``workdir`` on ``split``.

    ``config=None`` uses the config stored beside the checkpoint.
    """
    maybe_initialize_distributed(config or ml_collections.ConfigDict())
    workdir = _resolve_workdir(workdir, create=False)
    ckpt = Checkpoints(workdir, read_only=True)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint in {ckpt.directory}; train first with "
                                  f"`cnnjax train --workdir {workdir}`.")
        if config is None:
            config = ml_collections.ConfigDict(ckpt.restore_config(step))
        mesh_lib.check_batch_size(config.eval_batch_size, "eval_batch_size")
        mesh = mesh_lib.make_mesh()
        source, image_shape = build_source(config)
        info = source.info
        steps_per_epoch = source.steps_per_epoch(config.batch_size)
        model = build_model(config, info.num_classes)
        schedule = optim.make_schedule(config, steps_per_epoch,
                                       int(config.num_epochs) * steps_per_epoch)
        tx = optim.make_optimizer(config, schedule)
        input_shape = model_input_shape(config, image_shape)
        abstract_state = jax.eval_shape(
            lambda key: create_state(model, tx, key, input_shape), jax.random.PRNGKey(0))
        state, step = ckpt.restore(abstract_state, mesh_lib.replicated(mesh), step)
    finally:
        ckpt.close()
    from cnnjax.data import augment

    steps = Steps(model, tx, schedule, mesh=mesh, num_classes=info.num_classes,
                  preprocess=augment.preprocess, augment_config=config.augment,
                  mean=info.mean, std=info.std)
    result = run_eval(steps, state.params, source, mesh, config.eval_batch_size, split)
    result["step"] = int(step)
    return result


__all__ = ["train_and_evaluate", "evaluate", "run_eval", "NonFiniteLossError",
           "TrainState"]
