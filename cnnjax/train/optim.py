"""Optimizers and learning-rate schedules from a config, through optax.

Weight decay
    ``sgd`` and ``adam`` add ``weight_decay * w`` to the gradient before the
    update (coupled L2, as in the AlexNet and VGG papers and Caffe:
    ``v <- m v - lr (g + wd w)``; AlexNet: wd 5e-4, VGG: 5e-4, momentum 0.9).
    ``adamw`` applies the decay decoupled from the gradient statistics
    (Loshchilov & Hutter), scaled by the learning rate. In every case only
    kernels (arrays with ndim > 1) are decayed, never biases or norm scales.

Schedules (steps are optimizer updates; epochs convert through steps_per_epoch)
    ``constant``  learning_rate throughout.
    ``step``      learning_rate * decay_factor**k after the k-th of ``decay_epochs``.
    ``cosine``    cosine decay from learning_rate to
                  learning_rate * end_learning_rate_factor over the run.
    ``warmup_epochs > 0`` prepends a linear ramp from 0 to learning_rate to any
    of them.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")


def _kernel_mask(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int,
                  total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the step, from the config."""
    lr = float(config.learning_rate)
    if lr <= 0:
        raise ValueError(f"learning_rate must be > 0, got {lr}; e.g. --config.learning_rate=1e-3.")
    warmup = int(round(float(config.warmup_epochs) * steps_per_epoch))
    name = config.schedule
    if name == "constant":
        base = optax.constant_schedule(lr)
    elif name == "step":
        boundaries = {int(round(e * steps_per_epoch)) - warmup: float(config.decay_factor)
                      for e in config.decay_epochs}
        base = optax.piecewise_constant_schedule(lr, {b: s for b, s in boundaries.items()
                                                      if b > 0})
    elif name == "cosine":
        base = optax.cosine_decay_schedule(
            lr, decay_steps=max(total_steps - warmup, 1),
            alpha=float(config.end_learning_rate_factor))
    else:
        raise ValueError(f"schedule {name!r} is unknown; use one of {', '.join(SCHEDULES)}.")
    if warmup <= 0:
        return base
    ramp = optax.linear_schedule(0.0, lr, warmup)
    return optax.join_schedules([ramp, base], [warmup])


def make_optimizer(config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
    """The optax transformation named by ``config.optimizer``."""
    name = config.optimizer
    wd = float(config.weight_decay)
    if wd < 0:
        raise ValueError(f"weight_decay must be >= 0, got {wd}.")
    decay = [optax.add_decayed_weights(wd, mask=_kernel_mask)] if wd > 0 else []
    if name == "sgd":
        return optax.chain(*decay, optax.sgd(schedule, momentum=float(config.momentum) or None,
                                             nesterov=bool(config.nesterov)))
    if name == "adam":
        return optax.chain(*decay, optax.adam(schedule))
    if name == "adamw":
        return optax.adamw(schedule, weight_decay=wd, mask=_kernel_mask)
    raise ValueError(f"optimizer {name!r} is unknown; use one of {', '.join(OPTIMIZERS)}.")


def with_frozen(tx: optax.GradientTransformation, model) -> optax.GradientTransformation:
    """``tx`` for the trainable parameters only, when ``model`` freezes some.

    The labels come from :func:`cnnjax.models.trainable_mask` (the model's
    ``is_trainable``, the same spec :func:`cnnjax.summary` reports): frozen
    leaves get ``optax.set_to_zero()`` under ``optax.multi_transform``, so ``tx``
    keeps no state for them (Adam's moments cover the trainable leaves only).
    Models without ``is_trainable`` get ``tx`` unchanged.
    """
    if getattr(model, "is_trainable", None) is None:
        return tx
    from cnnjax.models import trainable_mask

    def labels(params):
        return jax.tree.map(lambda t: "trainable" if t else "frozen",
                            trainable_mask(model, params))

    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
