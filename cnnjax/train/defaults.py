"""The default experiment: LeNet-5 on the embedded UCI digits, on a laptop CPU.

This file is the single source of every config field: each experiment config
in ``experiments/configs/`` starts from ``get_config()`` here and overrides a
few values, so ``--config.field=value`` type-checks the same everywhere. It
lives inside the package so that ``cnnjax train`` with no ``--config`` works
from any directory after a plain (non-editable) ``pip install``;
``experiments/configs/lenet5_digits.py`` re-exports it.

Command::

    cnnjax train                      # == --config experiments/configs/lenet5_digits.py
                                      #    --workdir runs/lenet5_digits

Expected result: 98.9% test accuracy (355/359 held-out digits; seeds 1-3
gave 99.2%, 99.4%, 98.6%) after 15 epochs (660 steps). Whole process on a
2-core CPU shared with other jobs: 11.7 s with an empty XLA compile cache and
8.3-8.7 s with a warm one (``~/.cache/cnnjax/xla``) at load average ~1.3; 23.8 s
and 19.2 s at load average ~4.5 (before the compile got cheaper).
"""

from __future__ import annotations

import ml_collections

from cnnjax.data import augment


def get_config() -> ml_collections.ConfigDict:
    """Returns the default config (LeNet-5 on digits) with every known field."""
    config = ml_collections.ConfigDict()
    config.name = "lenet5_digits"

    # Model.
    config.model = "lenet5"
    config.dtype = "float32"          # compute dtype; params stay float32. "bfloat16" on TPU.
    config.dropout_rate = -1.0        # < 0: the model's own default.
    config.image_shape = ()           # (H, W, C); () = the model's input_shape.

    # Transfer learning (cnnjax.models.TransferModel, cnnjax.weights).
    config.weights = ""               # published weights (.h5, .pth, .safetensors) loaded at step 0
    config.freeze = ""                # transfer models: "base", "none", "block1,block2" ("": model)
    config.transfer_base = ""         # transfer models: the base network; "" = the model's (vgg16)
    config.transfer_head = ()         # transfer models: hidden dense widths; () = the model's
    config.binary_labels = ""         # "lt5": label 1 for classes 0-4, else 0; "even": 1 for even

    # Data.
    config.dataset = "digits"         # "digits" | "synthetic" | "tfds:<name>[:version]"
    config.data_dir = ""              # tfds data_dir ("" = tfds default, ~/tensorflow_datasets)
    config.image_fit = "resize"       # "resize" or "pad" to image_shape (digits, tfds)
    config.data_workers = 0           # > 0: grain worker processes decode batches (tfds, ImageNet)
    config.augment = augment.default_config()
    # Small distortions (the lecture's rotation/shift/zoom) take digits from ~96.5% to ~99%.
    config.augment.rotation = 10.0    # degrees
    config.augment.shift = 0.1        # fraction of 32 px
    config.augment.zoom = 0.1

    # Optimisation.
    config.num_epochs = 15
    config.batch_size = 32            # global, over all devices and hosts
    config.eval_batch_size = 512      # global; the last batch is padded and masked
    config.optimizer = "adam"         # "sgd" | "adam" | "adamw"
    config.learning_rate = 3e-3       # peak learning rate (after warmup)
    config.momentum = 0.9             # sgd only
    config.nesterov = False           # sgd only
    config.weight_decay = 0.0         # sgd/adam: L2 added to the gradient; adamw: decoupled
    config.schedule = "cosine"        # "constant" | "step" | "cosine"
    config.warmup_epochs = 0.0
    config.decay_epochs = (30, 60, 80)  # "step" schedule: epochs at which lr *= decay_factor
    config.decay_factor = 0.1
    config.end_learning_rate_factor = 0.0  # cosine ends at learning_rate * this

    # Run.
    config.seed = 0
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    config.max_checkpoints_to_keep = 3
    config.stop_after_steps = -1      # > 0: stop (with a checkpoint) at this step; for resume tests
    config.eval_every_epochs = 1
    config.distributed = False        # True: jax.distributed.initialize() (multi-host TPU/GPU)
    # Several processes named explicitly (GPU clusters, or processes on one machine; see
    # docs/reliability.md); env CNNJAX_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID.
    config.coordinator_address = ""   # "host:port" of process 0; "" = single process or TPU
    config.num_processes = 0          # with coordinator_address: how many processes
    config.process_id = -1            # with coordinator_address: this process, 0..n-1
    config.distributed_timeout_s = 300  # fail (status 2) if the processes do not all connect
    config.init_from = ""             # a run's workdir: start from its params of same name/shape
    config.compilation_cache_dir = "~/.cache/cnnjax/xla"  # "" disables the persistent cache
    config.fast_cpu_compile = True    # CPU only: cheaper XLA compiles (see loop.compiler_options)
    config.cpu_eval_ynnpack = False   # CPU only: True keeps XLA's YNNPACK fusions in eval steps
    config.progress_bar = True        # shown only when stdout is a terminal
    return config
