"""LeNet-5 on the embedded UCI digits (1,797 8x8 images resized to 32x32): the default.

The config itself lives in the package (``cnnjax/train/defaults.py``)
so that ``cnnjax train`` without ``--config`` works after any install; this
file re-exports it so every experiment sits in one folder.

Command (either line)::

    cnnjax train
    cnnjax train --config experiments/configs/lenet5_digits.py --workdir runs/lenet5_digits

Expected result: 98.9% test accuracy (355 of 359 held-out digits) after
15 epochs; about 12 s for the whole process on a 2-core CPU (24 s when the
CPU is shared with other jobs); see cnnjax/train/defaults.py.
"""

from cnnjax.train.defaults import get_config

__all__ = ["get_config"]
