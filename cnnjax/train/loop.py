"""The training loop: ``train_and_evaluate(config, workdir)`` and ``evaluate``.

Read top to bottom: set-up, mesh, input, model, sharding and init,
checkpoint/resume, steps, loop, final evaluation. Every random draw of step
``s`` (data order, augmentation, dropout) is a pure function of
``(config.seed, s)``, so a run resumed from the checkpoint at step ``s`` ends
with the same parameters as one that never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import itertools
import logging
import math
import os
import queue
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from cnnjax.train import mesh as mesh_lib
from cnnjax.train import optim
from cnnjax.train.checkpoint import CheckpointError, Checkpoints, load_matching_params
from cnnjax.train.config import ConfigError
from cnnjax.train.metrics import MetricWriter, Progress
from cnnjax.train.state import TrainState, count_params, create_state
from cnnjax.train.steps import Steps

log = logging.getLogger("cnnjax.train")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class NonFiniteLossError(FloatingPointError):
    """The training loss, a gradient or a parameter became NaN or infinite."""


class TrainingPreempted(Exception):  # noqa: N818 (not an error: the run stopped on request)
    """SIGTERM/SIGINT stopped the run after a checkpoint at ``step`` was saved."""

    def __init__(self, step: int, signal_name: str, checkpoint_dir: str):
        self.step, self.signal_name, self.checkpoint_dir = step, signal_name, checkpoint_dir
        super().__init__(f"{signal_name} received: stopped at step {step} after saving a "
                         f"checkpoint in {checkpoint_dir}; rerun the same command to resume.")


# --------------------------------------------------------------------------- set-up

def _distributed_settings(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """The ``jax.distributed.initialize`` arguments the config (or env) asks for, else None.

    ``config.coordinator_address`` ("host:port"; env ``CNNJAX_COORDINATOR_ADDRESS``),
    ``config.num_processes`` (``CNNJAX_NUM_PROCESSES``) and ``config.process_id``
    (``CNNJAX_PROCESS_ID``) name the processes explicitly (GPU clusters, or
    several processes on one machine); ``config.distributed=True`` or
    ``CNNJAX_DISTRIBUTED=1`` alone lets JAX discover them (TPU pod slices).
    """
    env = os.environ
    address = str(config.get("coordinator_address", "") or
                  env.get("CNNJAX_COORDINATOR_ADDRESS", ""))
    wanted = (bool(config.get("distributed", False)) or env.get("CNNJAX_DISTRIBUTED") == "1"
              or bool(address))
    if not wanted:
        return None
    timeout = config.get("distributed_timeout_s", 300)
    if not isinstance(timeout, int) or timeout <= 0:
        raise ConfigError(f"--config.distributed_timeout_s={timeout!r} must be a positive "
                          "number of seconds, e.g. --config.distributed_timeout_s=300.")
    if not address:
        return {"initialization_timeout": timeout}
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--config.coordinator_address={address!r} is not host:port; "
                          "give the address of process 0, e.g. 10.0.0.2:8476.")

    def number(field: str, env_name: str, default: int) -> int:
        value = config.get(field, default)
        if value == default and env.get(env_name, "") != "":
            value = env[env_name]
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--config.{field}={value!r} is not an integer; e.g. "
                              f"--config.{field}=0.") from None

    num_processes = number("num_processes", "CNNJAX_NUM_PROCESSES", 0)
    process_id = number("process_id", "CNNJAX_PROCESS_ID", -1)
    if num_processes < 1:
        raise ConfigError(f"--config.num_processes={num_processes} must be >= 1 with "
                          "--config.coordinator_address; give the number of processes.")
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"--config.process_id={process_id} must be in 0..{num_processes - 1}; "
                          "give each process its own id (0 runs the coordinator).")
    return {"coordinator_address": address, "num_processes": num_processes,
            "process_id": process_id, "initialization_timeout": timeout}


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """``jax.distributed.initialize()`` when the run spans several processes.

    See ``_distributed_settings`` for the fields. Must run before any other
    JAX call; a second call is a no-op. If the other processes do not all
    connect within ``config.distributed_timeout_s`` seconds, this process
    prints one ``error:`` line and exits with status 2 (JAX itself would
    abort with a C++ stack trace a little later).
    """
    settings = _distributed_settings(config)
    if settings is None or jax.distributed.is_initialized():
        return
    timeout = settings["initialization_timeout"]
    who = (f"process {settings['process_id']} of {settings['num_processes']}"
           if "process_id" in settings else "this process")
    where = settings.get("coordinator_address", "the discovered coordinator")

    def give_up() -> None:
        sys.stderr.write(
            f"error: {who} could not reach all processes through the coordinator at {where} "
            f"within {timeout} s; start every process with the same "
            "--config.coordinator_address and its own --config.process_id, or raise "
            "--config.distributed_timeout_s.\n")
        sys.stderr.flush()
        os._exit(2)

    watchdog = threading.Timer(timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**{**settings, "initialization_timeout": timeout + 30})
    finally:
        watchdog.cancel()


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
            raise ConfigError(f"--workdir {workdir!r} cannot be created ({err.strerror}); "
                              "pass a writable --workdir.") from None
        probe = os.path.join(workdir, f".cnnjax-write-test-{os.getpid()}")
        try:
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as err:
            raise ConfigError(f"--workdir {workdir!r} is not writable ({err.strerror}); "
                              "pass a writable --workdir.") from None
    return workdir


# A run-once program (the parameter init) drawing at least this many parameters is
# compiled at LLVM level 1; smaller ones at level 0 with XLA's loop emitters.
OPTIMIZED_INIT_PARAMS = 2**24


def compiler_options(config: ml_collections.ConfigDict, *, run_once: bool = False,
                     num_params: int = 0, inference: bool = False) -> dict[str, Any] | None:
    """XLA options for the CPU; GPUs and TPUs are left alone.

    Copy insertion with region analysis: without it XLA:CPU copies every large
    donated parameter that is read before its in-place update (AlexNet's fc6,
    151 MB: 24 ms a step; VGG-16's fc1, 411 MB); with it the copy goes and the
    results are bit-for-bit the same (NOTES.md, attempt 20).

    ``config.fast_cpu_compile`` (default on): on a laptop CPU compiling
    dominates a short run. LLVM's expensive passes cost ~30% of a LeNet-5
    train step's compile and nothing measurable in its run time. A program run
    once (``run_once``: the parameter init, drawing ``num_params`` random
    values) trades its compile against its one run: below
    ``OPTIMIZED_INIT_PARAMS`` it is compiled without backend optimization and
    with XLA's older loop emitters (LeNet-5: 0.33 -> 0.17 s, run < 5 ms),
    above at LLVM level 1, whose code draws the values ~3x faster (VGG-16's
    138 M: compile + run 0.8 + 4.5 -> 1.0 + 1.3 s; NOTES.md, attempt 62). The
    values drawn are the same bits under every option.

    ``inference``: the options of an eval (forward-only) step, which XLA:CPU
    compiles without its YNNPACK fusions (``xla_cpu_experimental_ynn_fusion_type``
    empty): its own dot and convolution kernels run every model's forward pass
    faster here (eval steps x0.78 all-conv net, x0.86-0.89 both AlexNets, x0.94
    VGG-16, x0.97 LeNet-5), where training steps need YNNPACK's products
    (without them AlexNet x1.77, VGG-16 x1.5; NOTES.md, attempt 64).
    ``config.cpu_eval_ynnpack=True`` keeps them in eval steps too.
    """
    if jax.default_backend() != "cpu":
        return None
    options: dict[str, Any] = {"xla_cpu_copy_insertion_use_region_analysis": True}
    if config.get("fast_cpu_compile", True):
        options["xla_llvm_disable_expensive_passes"] = True
        if run_once and num_params >= OPTIMIZED_INIT_PARAMS:
            options["xla_backend_optimization_level"] = 1
        elif run_once:
            options["xla_backend_optimization_level"] = 0
            options["xla_cpu_use_fusion_emitters"] = False
    if inference and not config.get("cpu_eval_ynnpack", False):
        options["xla_cpu_experimental_ynn_fusion_type"] = ""
    return options


def _choice(field: str, value: Any, known: list[str] | tuple[str, ...]) -> None:
    """ConfigError naming the closest known name unless ``value`` is one of ``known``."""
    if value in known:
        return
    close = difflib.get_close_matches(str(value), [str(k) for k in known], n=1, cutoff=0.4)
    hint = f"did you mean --config.{field}={close[0]}? " if close else ""
    raise ConfigError(f"--config.{field}={value!r} is unknown; {hint}known: "
                      f"{', '.join(map(str, known))}.")


def _validate(config: ml_collections.ConfigDict) -> None:
    """Checks every field a user sets before anything is built: one sentence per mistake."""
    from cnnjax import models
    from cnnjax.data.base import FITS

    def need(ok: bool, field: str, rule: str, example: str) -> None:
        if not ok:
            raise ConfigError(f"--config.{field}={config_value(field)!r} {rule}; e.g. "
                              f"--config.{field}={example}.")

    def config_value(field: str) -> Any:
        node = config
        for part in field.split("."):
            node = node[part]
        return node

    _choice("model", str(config.model).lower(), models.available())
    dataset = str(config.dataset)
    if dataset not in ("digits", "synthetic") and not (dataset.startswith("tfds:")
                                                        and len(dataset) > 5):
        _choice("dataset", dataset, ["digits", "synthetic", "tfds:mnist", "tfds:cifar10",
                                     "tfds:imagenet2012"])
    _choice("optimizer", config.optimizer, list(optim.OPTIMIZERS))
    _choice("schedule", config.schedule, list(optim.SCHEDULES))
    _choice("dtype", config.dtype, list(DTYPES))
    _choice("image_fit", config.get("image_fit", "resize"), list(FITS))
    need(config.num_epochs > 0, "num_epochs", "must be > 0", "10")
    need(config.learning_rate > 0, "learning_rate", "must be > 0", "1e-3")
    need(0 <= config.momentum < 1, "momentum", "must be in [0, 1)", "0.9")
    need(config.weight_decay >= 0, "weight_decay", "must be >= 0", "5e-4")
    need(config.warmup_epochs >= 0, "warmup_epochs", "must be >= 0", "0")
    need(config.decay_factor > 0, "decay_factor", "must be > 0", "0.1")
    need(config.dropout_rate < 1, "dropout_rate", "must be < 1 (or < 0 for the model's "
         "default)", "0.5")
    need(config.log_every_steps > 0, "log_every_steps", "must be > 0", "50")
    need(config.checkpoint_every_steps > 0, "checkpoint_every_steps", "must be > 0", "1000")
    need(config.max_checkpoints_to_keep >= 0, "max_checkpoints_to_keep",
         "must be >= 0 (0 keeps every checkpoint)", "3")
    need(config.get("eval_every_epochs", 1) > 0, "eval_every_epochs", "must be > 0", "1")
    need(config.get("data_workers", 0) >= 0, "data_workers", "must be >= 0", "0")
    image_shape = tuple(config.get("image_shape", ()) or ())
    if image_shape:
        need(len(image_shape) == 3 and all(isinstance(v, int) and v > 0 for v in image_shape),
             "image_shape", "must be three positive integers (height, width, channels)",
             "32,32,1")
    crop = config.augment.get("crop", 0) or 0
    need(crop >= 0, "augment.crop", "must be >= 0 (0: no crop)", "0")
    if crop and image_shape:
        need(crop <= min(image_shape[:2]), "augment.crop",
             f"is larger than the image ({image_shape[0]}x{image_shape[1]})",
             str(min(image_shape[:2])))
    init_from = config.get("init_from", "")
    if init_from and "://" not in init_from:
        need(os.path.isdir(os.path.expanduser(init_from)), "init_from",
             "is not a directory (give the workdir of an earlier run)", "runs/lenet5_digits")
    weights_path = config.get("weights", "")
    if weights_path:
        need(os.path.isfile(os.path.expanduser(weights_path)), "weights",
             "is not a file (give a Keras .h5, torchvision .pth or .safetensors file)",
             "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5")
    _choice("binary_labels", config.get("binary_labels", ""), ["", *LABEL_MAPS])
    mesh_lib.check_batch_size(config.batch_size)
    mesh_lib.check_batch_size(config.eval_batch_size, "eval_batch_size")


# --------------------------------------------------------------------------- model and data

def build_model(config: ml_collections.ConfigDict, num_classes: int | None = None):
    """The model named by the config (``cnnjax.models.get``)."""
    from cnnjax import models

    kwargs: dict[str, Any] = {"dtype": DTYPES[config.dtype]}
    if num_classes is not None:
        kwargs["num_classes"] = 2 if config.get("binary_labels", "") else num_classes
    if config.get("dropout_rate", -1.0) >= 0:
        kwargs["dropout_rate"] = float(config.dropout_rate)
    transfer = {"freeze": config.get("freeze", ""), "base": config.get("transfer_base", ""),
                "head": tuple(config.get("transfer_head", ()) or ())}
    if isinstance(models.get(config.model), models.TransferModel):
        if transfer["freeze"] and transfer["freeze"] not in ("base", "none"):
            transfer["freeze"] = tuple(n.strip() for n in transfer["freeze"].split(",")
                                       if n.strip())
        kwargs.update({k: v for k, v in transfer.items() if v})
    elif any(transfer.values()):
        raise ConfigError(f"--config.freeze, transfer_base and transfer_head apply to transfer "
                          f"models only, not {config.model!r}; use e.g. "
                          "--config.model=vgg16_transfer.")
    image_shape = tuple(config.get("image_shape", ()) or ())
    if image_shape:  # the model checks it fits (e.g. "too small for conv1" in one sentence)
        kwargs["input_shape"] = model_input_shape(config, image_shape)
    return models.get(config.model, **kwargs)


# Label mappings of --config.binary_labels (10 classes -> 0/1), jittable.
LABEL_MAPS = {
    "lt5": lambda labels: (labels < 5).astype(labels.dtype),        # 1: classes 0-4
    "even": lambda labels: (labels % 2 == 0).astype(labels.dtype),  # 1: even classes
}


def step_options(config: ml_collections.ConfigDict, info) -> dict[str, Any]:
    """Steps' labels, input normalization and XLA options: ``--config.binary_labels``,
    with ``--config.weights`` the normalization those weights expect, and
    :func:`compiler_options` for the train and the eval step."""
    mean, std = info.mean, info.std
    if config.get("weights", ""):
        from cnnjax import weights

        mean, std = weights.input_normalization(os.path.expanduser(config.weights))
    binary = config.get("binary_labels", "")
    return {"num_classes": 2 if binary else info.num_classes, "mean": mean, "std": std,
            "label_map": LABEL_MAPS[binary] if binary else None,
            "compiler_options": compiler_options(config),
            "eval_compiler_options": compiler_options(config, inference=True)}


def _load_weights(path: str, model, state: TrainState, sharding) -> TrainState:
    """``--config.weights``: published weights put into the fresh parameters (the base
    of a transfer model, else all of them)."""
    from cnnjax import weights

    path = os.path.expanduser(path)
    params = weights.load_into(jax.device_get(state.params), model, path)
    log.info("loaded weights from %s", path)
    return state.replace(params=jax.device_put(params, sharding))


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


class _Prefetch:
    """The next global batches, assembled (``mesh_lib.global_batch``) by a background
    thread at most ``depth`` steps ahead, in order; for the training and the
    evaluation batches.

    The CPU runs a step synchronously under the ``cnnjax`` program
    (``cli.tune_malloc``), so the host's work for the next batch would otherwise
    wait for it: 5% of LeNet-5's run on the digits. The thread only reads ahead;
    the training source's position is the step (a resumed run builds a new source
    at its step), so what it had read past the last step is simply dropped. An
    error of the source is raised by ``next`` in the order it happened.
    """

    _END = object()

    def __init__(self, mesh, batches, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(mesh, batches),
                                        name="cnnjax-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, mesh, batches) -> None:
        try:
            for local in batches:
                if not self._put(mesh_lib.global_batch(mesh, local)):
                    return
            self._put(self._END)
        except BaseException as err:  # re-raised by __next__ in the main thread
            self._put(err)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._END:
            self._queue.put(item)  # every later call ends too
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stops reading ahead; waits for a batch being read, but not for a stalled source."""
        self._stop.set()
        self._thread.join(timeout=30)


def run_eval(steps: Steps, params, source, mesh, eval_batch_size: int,
             split: str = "test") -> dict[str, float]:
    """Loss, top-1 (and top-5) accuracy over a whole split; padding rows excluded."""
    sums = None
    batches = _Prefetch(mesh, source.eval_batches(eval_batch_size, split=split,
                                                  process_index=jax.process_index(),
                                                  process_count=jax.process_count()))
    try:
        for batch in batches:
            sums = _sum_metrics(sums, steps.eval_step(params, batch))
    finally:
        batches.close()
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
    tx = optim.with_frozen(optim.make_optimizer(config, schedule), model)

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

    steps = Steps(model, tx, schedule, mesh=mesh, preprocess=augment.preprocess,
                  augment_config=config.augment, **step_options(config, info))
    batches = iter(())
    wait_for_compile = None
    if step0 < stop_at:
        batches = source.train_batches(config.batch_size, seed=config.seed, start_step=step0,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count())
        first_batch = next(batches)
        batches = itertools.chain([first_batch], batches)
        log.info("compiling the train and eval steps...")
        wait_for_compile = steps.compile_in_background(abstract_state, first_batch,
                                                       config.eval_batch_size)
    t_compile = time.time()

    # ---- checkpoint / resume (while the steps compile)
    config_dict = config.to_dict()
    try:
        if step0:
            # Falls back to an older checkpoint when the newest is unreadable (warning).
            state, step = ckpt.restore(abstract_state, replicated, step0,
                                       config_dict=config_dict, quarantine=True)
            log.info("resumed from the checkpoint at step %d in %s", step, ckpt.directory)
            if step != step0:
                batches = source.train_batches(config.batch_size, seed=config.seed,
                                               start_step=step,
                                               process_index=jax.process_index(),
                                               process_count=jax.process_count())
        else:
            state = jax.jit(init, out_shardings=replicated).lower(rng).compile(
                compiler_options(config, run_once=True,
                                 num_params=count_params(abstract_state.params)))(rng)
            step = 0
            if config.get("weights", ""):
                state = _load_weights(config.weights, model, state, replicated)
            if config.get("init_from", ""):
                state = _init_from(config.init_from, state, replicated)
        if wait_for_compile is not None:
            wait_for_compile()
    except BaseException:
        if wait_for_compile is not None:
            with contextlib.suppress(BaseException):  # the first error is the one to report
                wait_for_compile()
        ckpt.close()
        raise
    if wait_for_compile is not None:
        log.info("compiled in %.1f s (%.1f s since start)", time.time() - t_compile,
                 time.time() - t_start)
    writer.discard_after(step)  # lines a killed run logged past its checkpoint

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
    # Preemption: own SIGTERM/SIGINT handler in one process; in several, orbax's
    # sync point (JAX's preemption notifier, SIGINT passed on to it as SIGTERM) so
    # that every process stops at one step.
    multi_process = jax.process_count() > 1
    stop_requests = _StopRequests(multi_process=multi_process)

    def flush(upto_step: int) -> None:
        """Fetches pending metrics, stops on a non-finite value, updates the bar."""
        nonlocal pending
        if not pending:
            return
        fetched = jax.device_get(pending)
        first = upto_step - len(pending)
        for i, m in enumerate(fetched):
            _check_finite(m, first + i + 1, last_saved, ckpt.directory)
            for k in ("loss_sum", "correct", "count"):
                epoch_sums[k] = epoch_sums.get(k, 0.0) + float(m[k])
                interval_sums[k] = interval_sums.get(k, 0.0) + float(m[k])
        interval_sums["learning_rate"] = float(fetched[-1]["learning_rate"])
        progress.update(len(pending))
        pending = []

    prefetch = _Prefetch(mesh, batches)
    try:
        while step < stop_at:
            batch = next(prefetch)
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
            stop_signal = (((stop_requests.signal_name or "SIGTERM")
                            if ckpt.reached_preemption(step) else None)
                           if multi_process else stop_requests.signal_name)
            save_now = ((step % config.checkpoint_every_steps == 0) or step == stop_at
                        or stop_signal is not None)
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
            if stop_signal is not None:
                ckpt.wait()  # the checkpoint of this step is on disk before we exit
                log.warning("%s: saved the checkpoint at step %d in %s; rerun the same "
                            "command to resume", stop_signal, step, ckpt.directory)
                raise TrainingPreempted(step, stop_signal, ckpt.directory)
    finally:
        prefetch.close()
        stop_requests.restore()
        progress.close()
        try:
            ckpt.close()
        finally:
            writer.close()

    if evaluated_at != step:  # stopped mid-epoch, or nothing left to train
        final.update(run_eval(steps, state.params, source, mesh, config.eval_batch_size))
    final.update(step=step, epoch=step / steps_per_epoch, wall_time_s=time.time() - t_start,
                 train_step_traces=steps.traces["train"], last_checkpoint_step=last_saved)
    final["params"] = state.params
    log.info("done at step %d: %s", step, ", ".join(
        f"{k} {v:.4f}" for k, v in final.items() if k.startswith("test_")))
    return final


# --------------------------------------------------------------------------- reliability

class _StopRequests:
    """SIGTERM/SIGINT -> ``signal_name`` is set; the loop finishes the step, saves, exits.

    Installed only in the main thread. One process: cnnjax's own handler for both
    signals (without ``jax.distributed.initialize`` orbax never sees SIGTERM).
    Several processes: JAX's preemption notifier already watches SIGTERM and
    orbax's sync point stops every process at one step, so only SIGINT gets a
    handler here, which passes it on to that notifier as a SIGTERM to this
    process (Ctrl-C on one host then stops all of them at the same saved step).
    A second signal of the same kind acts as it would have without this handler
    (SIGINT: KeyboardInterrupt; SIGTERM: the process dies; the checkpoints on
    disk stay loadable either way).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, *, multi_process: bool = False):
        self.signal_name: str | None = None
        self._multi_process = multi_process
        self._previous: dict[int, Any] = {}
        if not multi_process:
            signals = self.SIGNALS
        elif jax.config.jax_enable_preemption_service:
            signals = (signal.SIGINT,)
        else:  # no preemption notifier would catch a SIGTERM passed on
            signals = ()
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None:  # asked twice: stop waiting
            self.restore()
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: finishing this step, then saving a checkpoint and exiting",
                    self.signal_name)
        if self._multi_process:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}


def _check_finite(metrics: dict, step: int, last_saved: int, checkpoint_dir: str) -> None:
    """Raises NonFiniteLossError if the loss or a parameter of ``step`` is NaN/Inf (a
    NaN/Inf gradient always makes its parameter so). Runs before every save, so no
    checkpoint holds non-finite values."""
    loss = float(metrics["loss_sum"])
    bad_params = int(metrics.get("nonfinite_params", 0))
    if math.isfinite(loss) and not bad_params:
        return
    if not math.isfinite(loss):
        what = f"the training loss became {loss}"
    else:
        what = (f"{bad_params} parameters became NaN/Inf after the update (the loss was "
                "finite: a gradient was NaN/Inf or the update overflowed)")
    kept = (f"the last checkpoint (step {last_saved}) in {checkpoint_dir} is left as it was"
            if last_saved >= 0 else "no checkpoint was written")
    raise NonFiniteLossError(f"{what} at step {step}; {kept}; lower --config.learning_rate "
                             "or check the data, then rerun.")


def _init_from(path: str, state: TrainState, sharding) -> TrainState:
    """``--config.init_from``: the fresh state with every parameter of another run's
    newest checkpoint that has the same name and shape."""
    params, loaded, skipped = load_matching_params(path, state.params, sharding)
    if not loaded:
        raise CheckpointError(f"--config.init_from={path!r}: no parameter of that checkpoint "
                              "has a name and shape of this model; pass a run of a related "
                              "model.")
    log.info("init_from %s: loaded %d parameter arrays", path, len(loaded))
    if skipped:
        log.warning("init_from %s: kept the fresh initialization of %d arrays: %s", path,
                    len(skipped), ", ".join(skipped))
    return state.replace(params=params)


# --------------------------------------------------------------------------- eval

def stored_config(workdir: str) -> ml_collections.ConfigDict:
    """The config saved beside the newest checkpoint in ``workdir``."""
    ckpt = Checkpoints(_resolve_workdir(workdir, create=False), read_only=True)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint in {ckpt.directory}; train first with "
                                  f"`cnnjax train --workdir {workdir}`.")
        return ml_collections.ConfigDict(ckpt.restore_config())  # (newest readable)
    finally:
        ckpt.close()


@dataclasses.dataclass
class RestoredRun:
    """The newest checkpoint of a run, rebuilt: what ``evaluate`` and ``cnnjax.viz`` need."""

    config: ml_collections.ConfigDict
    model: Any
    tx: Any
    schedule: Any
    state: TrainState
    step: int
    source: Any
    input_shape: tuple[int, ...]
    mesh: Any


def restore_run(workdir: str, config: ml_collections.ConfigDict | None = None) -> RestoredRun:
    """Rebuilds the model, optimizer and data source of ``workdir``'s run and restores its
    newest readable checkpoint onto the mesh. ``config=None`` uses the stored config."""
    workdir = _resolve_workdir(workdir, create=False)
    ckpt = Checkpoints(workdir, read_only=True)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint in {ckpt.directory}; train first with "
                                  f"`cnnjax train --workdir {workdir}`.")
        if config is None:
            config = ml_collections.ConfigDict(ckpt.restore_config())  # (newest readable)
        mesh = mesh_lib.make_mesh()
        source, image_shape = build_source(config)
        steps_per_epoch = source.steps_per_epoch(config.batch_size)
        model = build_model(config, source.info.num_classes)
        schedule = optim.make_schedule(config, steps_per_epoch,
                                       int(config.num_epochs) * steps_per_epoch)
        tx = optim.with_frozen(optim.make_optimizer(config, schedule), model)
        input_shape = model_input_shape(config, image_shape)
        abstract_state = jax.eval_shape(
            lambda key: create_state(model, tx, key, input_shape), jax.random.PRNGKey(0))
        state, step = ckpt.restore(abstract_state, mesh_lib.replicated(mesh), step,
                                   config_dict=config.to_dict())
    finally:
        ckpt.close()
    return RestoredRun(config=config, model=model, tx=tx, schedule=schedule, state=state,
                       step=int(step), source=source, input_shape=tuple(input_shape),
                       mesh=mesh)


def evaluate(config: ml_collections.ConfigDict | None, workdir: str,
             split: str = "test") -> dict[str, Any]:
    """Evaluates the newest checkpoint in ``workdir`` on ``split``.

    ``config=None`` uses the config stored beside the checkpoint.
    """
    maybe_initialize_distributed(config or ml_collections.ConfigDict())
    run = restore_run(workdir, config)
    config = run.config
    mesh_lib.check_batch_size(config.eval_batch_size, "eval_batch_size")
    from cnnjax.data import augment

    steps = Steps(run.model, run.tx, run.schedule, mesh=run.mesh,
                  preprocess=augment.preprocess, augment_config=config.augment,
                  **step_options(config, run.source.info))
    result = run_eval(steps, run.state.params, run.source, run.mesh, config.eval_batch_size,
                      split)
    result["step"] = run.step
    return result


__all__ = ["train_and_evaluate", "evaluate", "restore_run", "RestoredRun", "run_eval",
           "NonFiniteLossError", "TrainingPreempted", "TrainState"]
