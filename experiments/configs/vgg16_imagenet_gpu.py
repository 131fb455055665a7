"""VGG-16 on ImageNet-1k on one NVIDIA GPU (A100/H100, 40-80 GB).

Overrides vgg16_imagenet.py: bfloat16 compute (float32 parameters) and the
paper's batch of 256 in one device's memory.

Command::

    cnnjax train --config experiments/configs/vgg16_imagenet_gpu.py --workdir runs/vgg16_gpu

Expected result: as vgg16_imagenet.py (about 71% top-1, 90% top-5 accuracy);
roughly a week of one H100.
"""

import os

from cnnjax.train.config import load_config_file


def get_config():
    config = load_config_file(os.path.join(os.path.dirname(__file__), "vgg16_imagenet.py"))
    config.name = "vgg16_imagenet_gpu"
    config.dtype = "bfloat16"
    config.data_workers = 12
    return config
