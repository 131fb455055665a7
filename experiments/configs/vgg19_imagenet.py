"""VGG-19 (Simonyan & Zisserman 2015, configuration E) on ImageNet-1k.

Same recipe as vgg16_imagenet.py (SGD 0.01, momentum 0.9, weight decay 5e-4,
dropout 0.5, 74 epochs, random 224 crops and flips) with the 19-layer net.

Command::

    cnnjax train --config experiments/configs/vgg19_imagenet.py --workdir runs/vgg19

Expected result: the paper reports 27.3% top-1 / 9.0% top-5 error at single
scale 256 (Keras' published weights: 71.3% top-1, 90.0% top-5 accuracy).
"""

import os

from cnnjax.train.config import load_config_file


def get_config():
    config = load_config_file(os.path.join(os.path.dirname(__file__), "vgg16_imagenet.py"))
    config.name = "vgg19_imagenet"
    config.model = "vgg19"
    return config
