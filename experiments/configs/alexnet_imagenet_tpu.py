"""AlexNet on ImageNet-1k on a Cloud TPU slice (e.g. v4-8: 1 host, 4 chips).

Overrides alexnet_imagenet.py: global batch 1024 in bfloat16, the learning
rate scaled linearly with the batch (0.01 x 1024 / 128) after a 5-epoch
warmup, one process per host.

Command, on every host::

    cnnjax train --config experiments/configs/alexnet_imagenet_tpu.py \\
        --workdir gs://BUCKET/runs/alexnet --config.data_dir=/mnt/disks/data/tensorflow_datasets

Expected result: as alexnet_imagenet.py (about 57-59% top-1), in a few hours
on a v4-8 if the hosts can decode JPEGs fast enough (data_workers).
"""

import os

from cnnjax.train.config import load_config_file


def get_config():
    config = load_config_file(os.path.join(os.path.dirname(__file__), "alexnet_imagenet.py"))
    config.name = "alexnet_imagenet_tpu"
    config.batch_size = 1024
    config.eval_batch_size = 1024
    config.dtype = "bfloat16"
    config.learning_rate = 0.08
    config.warmup_epochs = 5.0
    config.distributed = True
    config.data_workers = 32
    return config
