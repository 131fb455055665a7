"""The lecture's transfer learning: frozen ImageNet VGG-16, new dense head, cats vs dogs.

Model ``vgg16_transfer``: VGG-16 without its top (224x224x3 -> 7x7x512,
frozen), Flatten, Dense(4096, relu), Dense(4096, relu), Dense(1) -> one logit,
trained with binary cross-entropy from the logit and Adam(learning_rate=1e-3)
as in the lecture. 134,264,641 parameters: 119,549,953 trainable, 14,714,688
frozen (the run's parameter table takes its split from the same freeze spec
the optimizer uses; frozen parameters get no optimizer state and no backward pass).

Needs, on local disk (nothing downloads):

* tfds ``cats_vs_dogs`` prepared (``tfds build cats_vs_dogs``, needs TensorFlow
  and network access once); its labels are 0 = cat, 1 = dog, and it has only a
  train split, of which cnnjax carves a held-out test part.
* the ImageNet weights of the base, either Keras'
  ``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5`` (keras-applications
  release files) or torchvision's ``vgg16-397923af.pth`` / a ``.safetensors``
  conversion of it; see ``cnnjax.weights`` for the URLs. The input normalization
  follows the file (Keras: caffe mean subtraction; torchvision: mean/std).

Command::

    cnnjax train --config experiments/configs/vgg16_transfer_cats_vs_dogs.py \\
        --config.weights=~/.keras/models/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 \\
        --workdir runs/vgg16_transfer_cats_vs_dogs

Fine-tune block5 as well: ``--config.freeze=block1,block2,block3,block4``
(with a smaller ``--config.learning_rate=1e-5``).

Expected result: not measured in this repository (neither the dataset nor the
weights are available on the machines it was developed on). Without
``--config.weights`` the frozen base keeps its random initialization, which
trains only the head on random features.
"""

from cnnjax.data import augment
from cnnjax.train.defaults import get_config as _default


def get_config():
    config = _default()
    config.name = "vgg16_transfer_cats_vs_dogs"
    config.model = "vgg16_transfer"
    config.freeze = "base"
    config.weights = ""               # --config.weights=PATH (.h5 notop, .pth, .safetensors)
    config.dataset = "tfds:cats_vs_dogs"
    config.image_shape = (224, 224, 3)
    config.image_fit = "resize"
    config.augment = augment.default_config()  # not the digits' distortions
    config.augment.hflip = True
    config.data_workers = 4
    config.num_epochs = 3
    config.batch_size = 32
    config.eval_batch_size = 128
    config.optimizer = "adam"
    config.learning_rate = 1e-3       # the lecture's Adam(lr=0.001)
    config.schedule = "constant"
    config.log_every_steps = 50
    config.checkpoint_every_steps = 500
    return config
