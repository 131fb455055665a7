"""VGG19 on ImageNet-1k on a Cloud TPU pod slice (e.g. v4-32: 4 hosts, 16 chips).

Overrides vgg16_imagenet_tpu.py with the 19-layer net; the same pod recipe:
a global batch of 2048 (128 per chip on 16 chips), bfloat16 compute with
float32 parameters, the learning rate
scaled linearly with the batch (0.01 x 2048 / 256) after a 5-epoch warmup,
and one process per host (`jax.distributed.initialize()`).

Command, on every host at once (see tpu/launch.sh)::

    cnnjax train --config experiments/configs/vgg19_imagenet_tpu.py \\
        --workdir gs://BUCKET/runs/vgg19 --config.data_dir=/mnt/disks/data/tensorflow_datasets

Expected result: as vgg19_imagenet.py (about 71% top-1, 90% top-5), bfloat16
within a few tenths of a percent of float32, in about a day on a v4-32.
"""

import os

from cnnjax.train.config import load_config_file


def get_config():
    # The pod recipe is VGG-16's (vgg16_imagenet_tpu.py) with the 19-layer net.
    config = load_config_file(os.path.join(os.path.dirname(__file__), "vgg16_imagenet_tpu.py"))
    config.name = "vgg19_imagenet_tpu"
    config.model = "vgg19"
    return config
