"""VGG-16 (Simonyan & Zisserman 2015, configuration D) on ImageNet-1k.

The paper's recipe: SGD, batch 256, momentum 0.9, weight decay 5e-4,
learning rate 0.01 divided by 10 three times, 74 epochs, dropout 0.5 in the
first two FC layers, random 224x224 crops of rescaled images and horizontal
flips (scale jittering and RGB colour shift are left out).

Needs imagenet2012 prepared for tfds on local disk (see alexnet_imagenet.py).

Command::

    cnnjax train --config experiments/configs/vgg16_imagenet.py --workdir runs/vgg16

(one GPU: vgg16_imagenet_gpu.py; a TPU pod slice: vgg16_imagenet_tpu.py)

Expected result: the paper reports 27.0% top-1 / 8.8% top-5 error at single
scale 256 (Keras' published weights: 71.3% top-1, 90.1% top-5 accuracy);
weeks on one GPU, about a day on a v3-32/v4-32 slice.
"""

from cnnjax.data import augment
from cnnjax.train.defaults import get_config as _default


def get_config():
    config = _default()
    config.name = "vgg16_imagenet"
    config.model = "vgg16"
    config.augment = augment.default_config()  # not the digits' distortions
    config.dataset = "tfds:imagenet2012"
    config.image_shape = (256, 256, 3)
    config.augment.crop = 224
    config.augment.hflip = True
    config.data_workers = 16
    config.num_epochs = 74
    config.batch_size = 256
    config.eval_batch_size = 500
    config.optimizer = "sgd"
    config.learning_rate = 0.01
    config.momentum = 0.9
    config.weight_decay = 5e-4
    config.schedule = "step"
    config.decay_epochs = (30, 50, 65)
    config.decay_factor = 0.1
    config.dropout_rate = 0.5
    config.checkpoint_every_steps = 5000
    config.log_every_steps = 100
    return config
