"""Orbax checkpoints of a run: ``<workdir>/checkpoints/<step>/{state,meta}``.

``state`` is the TrainState pytree (StandardSave), ``meta`` the run's config
as JSON, so ``cnnjax eval --workdir`` can rebuild the model without the
config file. Saves are asynchronous; ``close()`` waits for them. Restores go
straight onto the mesh: the abstract state carries the target shardings.
Orbax writes a step into a temporary directory and renames it when complete,
so ``latest_step()`` only ever sees complete checkpoints.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint that does not match the run that tries to restore it."""


class Checkpoints:
    """A thin wrapper over ``ocp.CheckpointManager`` with the two items of a run."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, read_only: bool = False):
        self.directory = (workdir.rstrip("/") + "/checkpoints" if "://" in workdir
                          else os.path.join(os.path.abspath(workdir), "checkpoints"))
        if read_only:  # evaluation: the directory must exist; nothing is written
            if "://" not in self.directory and not os.path.isdir(self.directory):
                workdir = os.path.dirname(self.directory)
                raise CheckpointError(f"no checkpoint in {self.directory}; train first with "
                                      f"`cnnjax train --workdir {workdir}`.")
            # (orbax's read_only mode warns on every use; create=False is enough.)
            options = ocp.CheckpointManagerOptions(create=False, max_to_keep=None)
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep if max_to_keep > 0 else None)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, config_dict: dict) -> bool:
        """Starts an async save of ``state`` at ``step`` (no-op if that step exists)."""
        if step in self.manager.all_steps():
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(config_dict)), force=True)

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore(self, abstract_state: Any, sharding: jax.sharding.Sharding,
                step: int | None = None) -> tuple[Any, int]:
        """Restores the state at ``step`` (default: newest) onto ``sharding``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}; train first with "
                                  "`cnnjax train --workdir ...`.")
        target = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract_state)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target)))
        except (ValueError, KeyError) as err:
            raise CheckpointError(
                f"the checkpoint at step {step} in {self.directory} does not fit this "
                f"config's model/optimizer ({str(err).splitlines()[0][:200]}); use a new "
                "--workdir or the config the run was started with.") from None
        return restored["state"], step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
