"""Transfer-learning mechanics end to end on the embedded digits, no downloads.

A :class:`cnnjax.models.TransferModel` with a LeNet-5 base without top
(32x32x1 -> 1x1x120, frozen at its random initialization), Flatten,
Dense(64, relu) and one logit, trained on "is the digit 0-4?"
(``binary_labels="lt5"`` maps the ten digit classes to 1 for 0-4, 0 for 5-9)
with binary cross-entropy from the logit and Adam(1e-3), as the lecture's
cats-vs-dogs model. It shows the whole path of
``vgg16_transfer_cats_vs_dogs.py`` on a CPU in seconds: the frozen base gets no
gradient, no optimizer state and stays bit-for-bit as initialized; only the
head's 7,809 parameters train (the run's parameter table prints the split).

Command::

    cnnjax train --config experiments/configs/transfer_digits_demo.py \\
        --workdir runs/transfer_digits_demo

Expected result: 93.0% test accuracy on "0-4 vs 5-9" (334/359 held-out digits;
seeds 1 and 2 gave 93.3% and 92.5%) after 10 epochs (440 steps), from a base
that never trains; whole process about 15 s on a 2-core CPU. A pretrained base
(--config.weights) is what makes transfer learning pay off; LeNet-5 trained end
to end on the 10 classes reaches 98.9% (lenet5_digits.py).
"""

from cnnjax.train.defaults import get_config as _default


def get_config():
    config = _default()
    config.name = "transfer_digits_demo"
    config.model = "transfer"
    config.transfer_base = "lenet5"
    config.transfer_head = (64,)
    config.freeze = "base"
    config.binary_labels = "lt5"
    config.image_shape = (32, 32, 1)
    config.num_epochs = 10
    config.optimizer = "adam"
    config.learning_rate = 1e-3       # the lecture's Adam(lr=0.001)
    config.schedule = "constant"
    return config
