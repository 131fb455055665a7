"""The jitted train and eval steps: pure functions of (state, batch).

Both are compiled once per run with explicit shardings (state replicated,
batch split over the ``data`` axis) and the train step donates its input
state. Augmentation runs inside the step, on device, so the host only ships
uint8 images. The loss is softmax cross-entropy computed in float32 on the
model's logits whatever the compute dtype (binary cross-entropy from the logit,
``optax.sigmoid_binary_cross_entropy``, for a model with one output and labels
0/1); every metric is a masked *sum* (loss_sum, correct, top5_correct, count)
so padded eval rows count for nothing and sums over batches and devices stay
exact; divide at the end.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from cnnjax.models.transfer import trainable_mask
from cnnjax.train import mesh as mesh_lib
from cnnjax.train.state import TrainState, step_keys

Metrics = dict[str, jax.Array]


def masked_metrics(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                   with_top5: bool) -> tuple[jax.Array, Metrics]:
    """Mean loss over unmasked rows, and the summed metrics of the batch."""
    logits = logits.astype(jnp.float32)
    weights = mask.astype(jnp.float32)
    count = jnp.sum(weights)
    if logits.shape[-1] == 1:  # one logit: binary cross-entropy on labels 0/1
        per_example = optax.sigmoid_binary_cross_entropy(logits[:, 0],
                                                         labels.astype(jnp.float32))
        predicted = (logits[:, 0] > 0).astype(labels.dtype)
        with_top5 = False
    else:
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        predicted = jnp.argmax(logits, axis=-1)
    loss_sum = jnp.sum(per_example * weights)
    correct = jnp.sum((predicted == labels) * weights)
    metrics = {"loss_sum": loss_sum, "correct": correct, "count": count}
    if with_top5:
        _, top5 = jax.lax.top_k(logits, 5)
        metrics["top5_correct"] = jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * weights)
    return loss_sum / jnp.maximum(count, 1.0), metrics


def count_nonfinite(tree: Any) -> jax.Array:
    """The number of NaN/Inf values in a pytree of arrays (an int32 scalar)."""
    counts = [jnp.sum(~jnp.isfinite(x)).astype(jnp.int32) for x in jax.tree.leaves(tree)]
    return sum(counts, jnp.zeros((), jnp.int32))


def has_nonfinite(tree: Any) -> jax.Array:
    """True if a value of the pytree may be NaN or +-Inf (a bool scalar), in one cheap pass.

    A sum is NaN or +-Inf whenever one of its terms is, so one float sum per
    array flags every non-finite value without materialising a mask (counting
    writes an int32 copy of each array: 10x slower on XLA:CPU). The only false
    alarm is a finite array whose sum overflows; :func:`count_nonfinite_if`
    then counts exactly.
    """
    flags = [~jnp.isfinite(jnp.sum(x)) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.any(jnp.stack(flags)) if flags else jnp.zeros((), bool)


def count_nonfinite_if(flag: jax.Array, tree: Any) -> jax.Array:
    """count_nonfinite(tree) when ``flag`` (a bool scalar) is set, else 0; the tree is
    only read in the first case (a lax.cond)."""
    return jax.lax.cond(flag, count_nonfinite, lambda t: jnp.zeros((), jnp.int32), tree)


class Steps:
    """Builds and holds the jitted ``train_step`` and ``eval_step`` of one run.

    ``train_step(state, batch) -> (state, metrics)``; ``eval_step(params, batch)
    -> metrics``. ``batch`` is ``{"image": uint8 (B,H,W,C), "label": int32 (B,),
    "mask": bool (B,)}`` sharded over the mesh. ``traces`` counts how often
    each Python function was traced (it must stay 1: a second trace means a
    silent recompile). ``label_map`` (jittable) maps the batch's labels before
    the loss, e.g. 10 digit classes to 0/1 (``loop.LABEL_MAPS``).
    ``compiler_options`` / ``eval_compiler_options``: XLA options the train /
    eval step are compiled with, whether by :meth:`compile` or on first call
    (``loop.compiler_options``).
    """

    def __init__(self, model, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                 mesh: Mesh, num_classes: int, preprocess: Callable[..., jax.Array],
                 augment_config: ml_collections.ConfigDict, mean: Any, std: Any,
                 label_map: Callable[[jax.Array], jax.Array] | None = None,
                 compiler_options: dict[str, Any] | None = None,
                 eval_compiler_options: dict[str, Any] | None = None):
        self.traces = {"train": 0, "eval": 0}
        with_top5 = num_classes > 5
        relabel = label_map or (lambda labels: labels)

        def train_step(state: TrainState, batch: dict[str, jax.Array]):
            self.traces["train"] += 1
            augment_key, dropout_key = step_keys(state.rng, state.step)
            images = preprocess(batch["image"], augment_key, train=True,
                                config=augment_config, mean=mean, std=std)

            def loss_fn(params):
                logits = model.apply({"params": params}, images, train=True,
                                     rngs={"dropout": dropout_key})
                return masked_metrics(logits, relabel(batch["label"]), batch["mask"], with_top5)

            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            # Frozen parameters (the model's is_trainable) stay bit-for-bit: p + 0 is not
            # always p (-0.0 + 0.0 == +0.0). Decided at trace time, so it costs nothing.
            params = jax.tree.map(lambda t, new, old: new if t else old,
                                  trainable_mask(model, params), params, state.params)
            # Checked every step so that no non-finite state is ever checkpointed. A
            # NaN/Inf gradient of a trained parameter always reaches it through the update
            # (sgd, momentum, nesterov, adam and adamw alike, even at a learning rate of 0:
            # 0 * Inf is NaN), and frozen parameters get exact zeros (stop_gradient), so
            # one pass over the updated parameters flags both (NOTES.md attempt 55). The
            # gradients are not read at all: a lax.cond that took them to count their
            # non-finite values when this trips kept every gradient alive to the end of
            # the program, 100 MB more of temporaries for VGG-16 and its train step 4-7%
            # slower on the CPU (attempt 75).
            bad = has_nonfinite(params)
            metrics["nonfinite_params"] = count_nonfinite_if(bad, params)
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
            new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
            return new_state, metrics

        def eval_step(params, batch: dict[str, jax.Array]) -> Metrics:
            self.traces["eval"] += 1
            images = preprocess(batch["image"], jax.random.PRNGKey(0), train=False,
                                config=augment_config, mean=mean, std=std)
            logits = model.apply({"params": params}, images, train=False)
            _, metrics = masked_metrics(logits, relabel(batch["label"]), batch["mask"], with_top5)
            return metrics

        replicated = mesh_lib.replicated(mesh)
        batch = mesh_lib.batch_sharding(mesh)
        self._replicated, self._batch = replicated, batch
        self.train_step = jax.jit(train_step, in_shardings=(replicated, batch),
                                  out_shardings=(replicated, replicated), donate_argnums=(0,),
                                  compiler_options=compiler_options)
        self.eval_step = jax.jit(eval_step, in_shardings=(replicated, batch),
                                 out_shardings=replicated, compiler_options=eval_compiler_options)

    def compile(self, abstract_state: TrainState, example_batch: dict[str, Any],
                eval_batch_size: int | None = None) -> None:
        """Compiles both steps ahead of time for these shapes (may run in a thread).

        Replaces ``train_step``/``eval_step`` by the compiled executables, which
        can never recompile: a batch of another shape or dtype is an error.
        ``example_batch`` is one process-local batch (numpy); its global shape
        is this batch times the process count. The XLA options are those given
        at construction.
        """
        processes = jax.process_count()

        def spec(value, batch_size=None):
            shape = (batch_size or value.shape[0] * processes, *value.shape[1:])
            return jax.ShapeDtypeStruct(shape, value.dtype, sharding=self._batch)

        state = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self._replicated),
            abstract_state)
        train_batch = {k: spec(v) for k, v in example_batch.items()}
        self.train_step = self.train_step.lower(state, train_batch).compile()
        if eval_batch_size:
            eval_batch = {k: spec(v, eval_batch_size) for k, v in example_batch.items()}
            self.eval_step = self.eval_step.lower(state.params, eval_batch).compile()

    def compile_in_background(self, *args: Any, **kwargs: Any) -> Callable[[], None]:
        """Starts :meth:`compile` (same arguments) in a daemon thread; returns ``wait``.

        XLA compiles without holding the GIL, so the caller can initialize or
        restore the parameters meanwhile. ``wait()`` blocks until the steps are
        compiled and re-raises the compile's error, if any, in the caller's thread.
        """
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.compile(*args, **kwargs)
            except BaseException as err:  # re-raised by wait()
                errors.append(err)

        thread = threading.Thread(target=run, name="cnnjax-compile", daemon=True)
        thread.start()

        def wait() -> None:
            thread.join()
            if errors:
                raise errors[0]

        return wait
