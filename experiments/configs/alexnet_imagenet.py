"""AlexNet (Krizhevsky, Sutskever & Hinton 2012) on ImageNet-1k (ILSVRC-2012).

The paper's recipe: SGD, batch 128, momentum 0.9, weight decay 5e-4
(coupled L2, see cnnjax/train/optim.py), learning rate 0.01 divided by 10
three times (here at fixed epochs 30, 60, 80 instead of "when the validation
error stopped improving"), 90 epochs, dropout 0.5 in fc6/fc7, random 227x227
crops of 256x256 images and horizontal flips (PCA colour noise is left out).

Needs imagenet2012 prepared for tfds on local disk (array_record cannot read
gs://; on a TPU VM copy it to each host)::

    tfds build imagenet2012 --manual_dir=DIR_WITH_THE_TARS

Command::

    cnnjax train --config experiments/configs/alexnet_imagenet.py --workdir runs/alexnet \\
        --config.data_dir=~/tensorflow_datasets

Expected result: the paper reports 40.7% top-1 and 18.2% top-5 error for one
net with single-crop evaluation close to it (~57-59% top-1, ~80% top-5
accuracy); about 90 epochs x 10k steps.
"""

from cnnjax.data import augment
from cnnjax.train.defaults import get_config as _default


def get_config():
    config = _default()
    config.name = "alexnet_imagenet"
    config.model = "alexnet"
    config.augment = augment.default_config()  # not the digits' distortions
    config.dataset = "tfds:imagenet2012"
    config.image_shape = (256, 256, 3)  # decoded and resized on the host ...
    config.augment.crop = 227           # ... randomly cropped on device (center crop in eval)
    config.augment.hflip = True
    config.data_workers = 8
    config.num_epochs = 90
    config.batch_size = 128
    config.eval_batch_size = 500
    config.optimizer = "sgd"
    config.learning_rate = 0.01
    config.momentum = 0.9
    config.weight_decay = 5e-4
    config.schedule = "step"
    config.decay_epochs = (30, 60, 80)
    config.decay_factor = 0.1
    config.dropout_rate = 0.5
    config.checkpoint_every_steps = 5000
    config.log_every_steps = 100
    return config
