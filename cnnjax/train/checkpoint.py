"""Orbax checkpoints of a run: ``<workdir>/checkpoints/<step>/{state,meta}``.

``state`` is the TrainState pytree (StandardSave), ``meta`` the run's config
as JSON, so ``cnnjax eval --workdir`` can rebuild the model without the
config file and a restore that does not fit can say which config fields
changed. Saves are asynchronous; ``wait()``/``close()`` wait for them.
Restores go straight onto the mesh: the abstract state carries the target
shardings.

What can go wrong, and what this module does about it:

* **Killed mid-save.** Orbax writes a step into ``<step>.orbax-checkpoint-tmp*``
  and renames it when complete, so ``latest_step()`` only sees complete
  checkpoints and a later save of the same step succeeds.
* **Corrupt checkpoint** (truncated or garbled files). ``restore`` logs a
  warning naming the step and path, and falls back to the newest older
  checkpoint that reads; in a training run the unreadable step directory is
  renamed ``<step>.corrupt`` (kept for inspection, ignored by orbax) so the
  run can save that step again.
* **Checkpoint that does not fit** the config (other model, optimizer or
  shapes): ``CheckpointError`` naming the config fields that differ from the
  stored config, and how to proceed (new ``--workdir``, or
  ``--config.init_from`` to start from the parameters that match).
* **Disk full** during a save: ``DiskFullError`` saying so; the checkpoints
  saved before are untouched.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from cnnjax._tree import path_names

if TYPE_CHECKING:
    import orbax.checkpoint as ocp


def _orbax():
    """orbax.checkpoint, imported on first use: 0.2 s that importing cnnjax.train skips."""
    import orbax.checkpoint as ocp

    return ocp


def _manager(directory: str, **options: Any) -> ocp.CheckpointManager:
    """A CheckpointManager over ``directory`` with a run's two items, state and meta."""
    ocp = _orbax()
    return ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(**options),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

log = logging.getLogger("cnnjax.train")

# Config fields that do not change what a checkpoint holds: left out of the
# "which fields differ" report of a checkpoint that does not fit.
RUN_ONLY_FIELDS = frozenset({
    "name", "num_epochs", "stop_after_steps", "log_every_steps", "checkpoint_every_steps",
    "max_checkpoints_to_keep", "eval_every_epochs", "eval_batch_size", "progress_bar",
    "compilation_cache_dir", "fast_cpu_compile", "cpu_eval_ynnpack", "data_dir", "data_workers",
    "distributed", "coordinator_address", "num_processes", "process_id", "distributed_timeout_s",
    "init_from", "seed", "learning_rate", "schedule", "warmup_epochs", "decay_epochs",
    "decay_factor", "end_learning_rate_factor",
})

# Orbax's words for a restore target that does not fit the stored tree (matched
# against the first line of the error only: tensorstore errors quote whole specs).
_MISMATCH_MARKERS = ("not compatible with the stored shape", "tree structures do not match",
                     "requested shape", "partial_restore", "missing key", "unexpected key")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the run that restores it."""


class DiskFullError(CheckpointError):
    """A save failed because the disk is full; earlier checkpoints are intact."""


def _error_chain(err: BaseException):
    seen = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend([e.__cause__, e.__context__, *getattr(e, "exceptions", ())])


def is_disk_full(err: BaseException) -> bool:
    """True when ``err`` (or anything it was raised from) is ENOSPC / EDQUOT."""
    for e in _error_chain(err):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "ENOSPC" in text or "Disk quota" in text:
            return True
    return False


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text[:limit]


def config_differences(stored: dict, current: dict, *, skip=RUN_ONLY_FIELDS,
                       prefix: str = "") -> list[str]:
    """``["model 'lenet5' -> 'allconv'", ...]``: fields whose values differ."""
    out = []
    for key in sorted(set(stored) | set(current)):
        name = prefix + key
        if key in skip and not prefix:
            continue
        a, b = stored.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_differences(a, b, skip=(), prefix=name + "."))
        else:
            # JSON stores tuples as lists: compare (and show) both as tuples.
            a = tuple(a) if isinstance(a, (list, tuple)) else a
            b = tuple(b) if isinstance(b, (list, tuple)) else b
            if a != b:
                out.append(f"{name} {a!r} -> {b!r}")
    return out


def _path_name(path) -> str:
    return "/".join(path_names(path))


def _stored_state(manager: ocp.CheckpointManager, step: int) -> Any:
    """The state item's metadata tree at ``step`` (shapes and dtypes; no array read)."""
    stored = manager.item_metadata(step)["state"]
    return getattr(stored, "tree", stored)


class Checkpoints:
    """A thin wrapper over ``ocp.CheckpointManager`` with the two items of a run."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, read_only: bool = False):
        self.directory = (workdir.rstrip("/") + "/checkpoints" if "://" in workdir
                          else os.path.join(os.path.abspath(workdir), "checkpoints"))
        self.read_only = read_only
        self._pending_step: int | None = None   # an async save not yet known to be done
        self._failed = False
        if read_only:  # evaluation: the directory must exist; nothing is written
            if "://" not in self.directory and not os.path.isdir(self.directory):
                workdir = os.path.dirname(self.directory)
                raise CheckpointError(f"no checkpoint in {self.directory}; train first with "
                                      f"`cnnjax train --workdir {workdir}`.")
            # (orbax's read_only mode warns on every use; create=False is enough.)
            self.manager = _manager(self.directory, create=False, max_to_keep=None)
        else:
            self.manager = _manager(self.directory,
                                    max_to_keep=max_to_keep if max_to_keep > 0 else None)

    # ------------------------------------------------------------------ queries

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_path(self, step: int) -> str:
        return f"{self.directory}/{step}"

    def reached_preemption(self, step: int) -> bool:
        """Orbax's preemption sync point (multi-process runs): True on every process
        at the same step once any of them got SIGTERM."""
        return self.manager.reached_preemption(step)

    # ------------------------------------------------------------------ save

    def _disk_full(self, step: int | None, err: BaseException) -> DiskFullError:
        self._failed = True
        saved = [s for s in self.all_steps() if s != step]
        kept = (f"the checkpoints saved before (newest: step {saved[-1]}) are intact"
                if saved else "no earlier checkpoint existed")
        where = f"at step {step} " if step is not None else ""
        return DiskFullError(
            f"the disk is full: saving the checkpoint {where}to {self.directory} failed "
            f"({_first_line(err, 120)}); {kept}; free some space (or lower "
            "--config.max_checkpoints_to_keep, or move --workdir to a bigger disk) and rerun "
            "the same command to resume.")

    def save(self, step: int, state: Any, config_dict: dict) -> bool:
        """Starts an async save of ``state`` at ``step`` (no-op if that step exists)."""
        if step in self.manager.all_steps():
            return False
        # Orbax finishes the previous async save first anyway; waiting here makes a
        # failure of that one report its own step.
        self.wait()
        ocp = _orbax()
        try:
            started = self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(config_dict)),
                force=True)
        except BaseException as err:
            if is_disk_full(err):
                raise self._disk_full(step, err) from None
            raise
        self._pending_step = step
        return started

    def wait(self) -> None:
        """Blocks until the pending async save is on disk (raises DiskFullError)."""
        try:
            self.manager.wait_until_finished()
        except BaseException as err:
            if is_disk_full(err):
                raise self._disk_full(self._pending_step, err) from None
            raise
        self._pending_step = None

    def close(self) -> None:
        try:
            if not self._failed:
                self.wait()
        finally:
            try:
                self.manager.close()
            except Exception as err:  # already reported by wait()
                if not self._failed:
                    raise
                log.debug("closing the checkpoint manager after a failed save: %s", err)

    # ------------------------------------------------------------------ restore

    def restore_config(self, step: int | None = None) -> dict:
        """The config stored at ``step``; default: the newest one that reads (warning
        for each unreadable newer one)."""
        candidates = [step] if step is not None else list(reversed(self.all_steps()))
        failure = "there is no checkpoint"
        ocp = _orbax()
        for candidate in candidates:
            try:
                restored = self.manager.restore(
                    candidate, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
                return dict(restored["meta"])
            except Exception as err:
                failure = (f"the config stored with the checkpoint at step {candidate} "
                           f"({self.step_path(candidate)}/meta) cannot be read "
                           f"({_first_line(err)})")
                if step is None:
                    log.warning("%s; trying the next older one", failure)
        raise CheckpointError(f"{failure}; pass --config FILE to `cnnjax eval`, or use "
                              "another workdir.")

    def _mismatch(self, step: int, err: BaseException, config_dict: dict | None):
        detail = _first_line(err)
        changed: list[str] = []
        if config_dict is not None:
            try:
                changed = config_differences(self.restore_config(step), config_dict)
            except CheckpointError:
                changed = []
        fields = ("config fields that differ from the run that wrote it: "
                  + "; ".join(changed[:6]) + (" ..." if len(changed) > 6 else "")
                  if changed else f"{detail}")
        return CheckpointError(
            f"the checkpoint at step {step} in {self.directory} does not fit this config's "
            f"model/optimizer/shapes ({fields}); use a new --workdir, or start a new run "
            f"from its matching parameters with --config.init_from={self.directory}, or "
            "rerun with the original config.")

    def _quarantine(self, step: int) -> None:
        """Renames an unreadable step so it is kept for inspection but never read again."""
        if "://" in self.directory or jax.process_index() != 0:
            return
        source = self.step_path(step)
        target = source + ".corrupt"
        i = 1
        while os.path.exists(target):
            target, i = f"{source}.corrupt{i}", i + 1
        try:
            os.rename(source, target)
            log.warning("moved the unreadable checkpoint to %s", target)
        except OSError as err:
            log.warning("could not move the unreadable checkpoint %s aside (%s)", source, err)
        self.manager.reload()

    def restore(self, abstract_state: Any, sharding: jax.sharding.Sharding,
                step: int | None = None, *, config_dict: dict | None = None,
                fallback: bool = True, quarantine: bool = False) -> tuple[Any, int]:
        """Restores the state at ``step`` (default: newest) onto ``sharding``.

        A checkpoint that cannot be read (truncated or garbled files) is
        reported with a warning and the newest older one is used instead
        (``fallback``); ``quarantine`` also renames the unreadable step
        directory to ``<step>.corrupt``. A checkpoint that does not fit the
        abstract state raises ``CheckpointError`` naming the config fields
        that differ from ``config_dict``. Returns ``(state, step)``.
        """
        steps = self.all_steps()
        if step is not None:
            steps = [s for s in steps if s <= step]
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}; train first with "
                                  "`cnnjax train --workdir ...`.")
        target = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract_state)
        unreadable: list[str] = []
        ocp = _orbax()
        for candidate in reversed(steps):
            try:
                self._check_stored(candidate, target)
                restored = self.manager.restore(candidate, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target)))
                state = restored["state"]
                self._check_restored(state, target)
                if unreadable:
                    log.warning("resuming from the older checkpoint at step %d", candidate)
                return state, candidate
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as err:
                text = _first_line(err, 400).lower()
                if isinstance(err, (ValueError, KeyError)) and any(
                        marker in text for marker in _MISMATCH_MARKERS) and not unreadable:
                    raise self._mismatch(candidate, err, config_dict) from None
                unreadable.append(f"step {candidate} ({self.step_path(candidate)}: "
                                  f"{_first_line(err, 120)})")
                log.warning("the checkpoint at step %d in %s cannot be read (%s)%s",
                            candidate, self.step_path(candidate), _first_line(err, 160),
                            "; trying the next older one" if fallback else "")
                if quarantine:
                    self._quarantine(candidate)
                if not fallback:
                    break
        raise CheckpointError(
            "no readable checkpoint: " + "; ".join(unreadable) + "; move the damaged step "
            "directories away (or use a new --workdir) and rerun.")

    def _check_stored(self, step: int, target: Any) -> None:
        """Compares the stored arrays' shapes with ``target``'s before reading any
        array: a shape mismatch found by orbax's restore itself leaves its reads half
        done. Arrays by the same name are compared; the tree's structure, and
        metadata that cannot be read, are left for the restore to judge."""
        try:
            have = {_path_name(p): tuple(m.shape) for p, m in
                    jax.tree_util.tree_leaves_with_path(_stored_state(self.manager, step))}
        except Exception:  # unreadable metadata: the restore will say what is wrong
            return
        for p, t in jax.tree_util.tree_leaves_with_path(target):
            name = _path_name(p)
            if name in have and have[name] != tuple(t.shape):
                raise ValueError(f"{name}: Requested shape {tuple(t.shape)} not compatible "
                                 f"with the stored shape {have[name]}")

    @staticmethod
    def _check_restored(state: Any, target: Any) -> None:
        for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(target), strict=True):
            if tuple(got.shape) != tuple(want.shape):
                raise ValueError(f"Requested shape {want.shape} not compatible with the "
                                 f"stored shape {got.shape}")


# ---------------------------------------------------------------------- init_from

def _checkpoint_dir(path: str) -> str:
    """``path`` as a checkpoints directory: a run's workdir or its checkpoints/."""
    if "://" in path:
        return path.rstrip("/")
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints")
    return path


def load_matching_params(path: str, params: Any, sharding: jax.sharding.Sharding
                         ) -> tuple[Any, list[str], list[str]]:
    """Copies into ``params`` every array of another run's newest checkpoint with the
    same name and shape (``--config.init_from``).

    ``path`` is that run's workdir (or its ``checkpoints`` directory). Returns
    ``(params, loaded, skipped)``; ``skipped`` says why each array of ``params``
    kept its fresh initialization (missing in the checkpoint or another shape).
    """
    directory = _checkpoint_dir(path)
    if "://" not in directory and not os.path.isdir(directory):
        raise CheckpointError(f"init_from={path!r}: no such directory; pass the workdir of "
                              "an earlier run, e.g. --config.init_from=runs/lenet5_digits.")
    manager = _manager(directory, create=False, max_to_keep=None)
    ocp = _orbax()
    try:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"init_from={path!r}: no checkpoint in {directory}; pass "
                                  "the workdir of a run that saved one.")
        try:
            stored = _stored_state(manager, step)
            # The whole state (a partial restore needs the exact tree); params are kept.
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding),
                dict(stored))
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target)))["state"]["params"]
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(
                f"init_from={path!r}: the checkpoint at step {step} in {directory} cannot be "
                f"read ({_first_line(err)}); pass another run's workdir.") from None
    finally:
        manager.close()

    source = {_path_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(restored)}
    loaded: list[str] = []
    skipped: list[str] = []

    def pick(path, leaf):
        name = _path_name(path)
        found = source.get(name)
        if found is None:
            skipped.append(f"{name} (not in the checkpoint)")
            return leaf
        if tuple(found.shape) != tuple(leaf.shape):
            skipped.append(f"{name} (shape {tuple(found.shape)} there, {tuple(leaf.shape)} here)")
            return leaf
        loaded.append(name)
        return jax.device_put(np.asarray(found).astype(leaf.dtype), leaf.sharding)

    new_params = jax.tree_util.tree_map_with_path(pick, params)
    return new_params, loaded, skipped
