"""LeNet-5 on MNIST (28x28 digits zero-padded to 32x32, as in LeCun et al. 1998).

Needs MNIST prepared for tfds (reading needs no TensorFlow, preparing does)::

    pip install tensorflow && tfds build mnist      # once, writes ~/tensorflow_datasets

Command::

    cnnjax train --config experiments/configs/lenet5_mnist.py --workdir runs/lenet5_mnist

Expected result: about 99.0% test accuracy after 10 epochs (the paper's
LeNet-5 reached 0.95% error, 0.8% with distortions); about 1-2 min per epoch
on a 2-core CPU, seconds on a GPU.
"""

from cnnjax.data import augment
from cnnjax.train.defaults import get_config as _default


def get_config():
    config = _default()
    config.name = "lenet5_mnist"
    config.augment = augment.default_config()  # not the digits' distortions
    config.dataset = "tfds:mnist"
    config.image_fit = "pad"          # 28x28 -> 32x32 with a 2-pixel zero border
    config.num_epochs = 10
    config.batch_size = 128
    config.learning_rate = 1e-3
    config.eval_batch_size = 1000
    config.checkpoint_every_steps = 2000
    config.log_every_steps = 100
    return config
