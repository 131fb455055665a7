"""Where metrics go: JSON lines, TensorBoard event files, a progress bar.

``<workdir>/metrics.jsonl`` gets one JSON object per line with ``step``,
``epoch`` and any of ``train_loss``, ``train_accuracy``, ``test_loss``,
``test_accuracy``, ``test_top5_accuracy``, ``learning_rate``,
``images_per_sec``. The same scalars go to TensorBoard event files in
``<workdir>/tensorboard`` through tensorboardX (flax.metrics.tensorboard would
need TensorFlow). Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any


def _import_tensorboardx():
    """tensorboardX's SummaryWriter, imported without dragging in torch.

    tensorboardX imports torch when it is installed (about 1.5 s, and its
    OpenMP runtime in a JAX process); scalars need none of it, so the import
    runs with torch masked out when torch is not loaded already.
    """
    mask_torch = "torch" not in sys.modules
    if mask_torch:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # optional at run time: JSON lines still work
        return None
    finally:
        if mask_torch:
            del sys.modules["torch"]
    return SummaryWriter


def _logged_after(line: str, step: int) -> bool:
    """A metrics.jsonl line to drop on resume: torn (no newline) or logged after ``step``."""
    if not line.endswith("\n"):
        return True
    try:
        logged = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return False  # not one of ours: left alone
    return isinstance(logged, int) and logged > step


class MetricWriter:
    """Writes scalar metrics to JSON lines and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb_dir = os.path.join(workdir, "tensorboard")
        # A remote workdir (gs://...) cannot be appended to: keep the lines and
        # rewrite the (small) file through etils.epath, which orbax brings.
        self._remote = "://" in workdir
        self._lines: list[str] = []
        self._tb = None
        self._tb_enabled = enabled and tensorboard
        self._purge_step: int | None = None

    def _epath(self):
        from etils import epath

        return epath.Path(self.path)

    def _read(self) -> str | None:
        """The file's text, or None when there is no file yet."""
        if self._remote:
            path = self._epath()
            return path.read_text() if path.exists() else None
        if not os.path.exists(self.path):
            return None
        with open(self.path) as f:
            return f.read()

    def _tensorboard(self):
        if self._tb is None and self._tb_enabled:
            self._tb_enabled = False
            cls = _import_tensorboardx()
            if cls is not None:
                # purge_step: TensorBoard hides the events a killed run wrote at
                # or after this step in earlier files (the steps logged again now).
                # The suffix keeps two writers started in the same second (the file
                # name's timestamp) from overwriting each other's file, in order.
                self._tb = cls(self._tb_dir, flush_secs=30, purge_step=self._purge_step,
                               filename_suffix=f".{time.time_ns()}.{os.getpid()}")
        return self._tb

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        for key, value in metrics.items():
            value = float(value) if not isinstance(value, int) else value
            record[key] = value if not (isinstance(value, float) and math.isnan(value)) else None
        line = json.dumps(record) + "\n"
        if self._remote:
            if not self._lines:
                self._lines = [self._read() or ""]
            self._lines.append(line)
            self._epath().write_text("".join(self._lines))
        else:
            with open(self.path, "a") as f:
                f.write(line)
        tb = self._tensorboard()
        if tb is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and value is not None:
                    tb.add_scalar(key, value, global_step=int(step))

    def discard_after(self, step: int) -> None:
        """Drops the lines of steps after ``step`` (and a torn last line).

        A run killed after logging past its newest checkpoint resumes from that
        checkpoint and logs those steps again: without this, metrics.jsonl would
        hold them twice. The file is replaced atomically, and only when
        something is dropped. TensorBoard's event files are append-only: the
        next event file starts with a purge marker instead, which makes
        TensorBoard hide the older files' events after ``step``.
        """
        if self._tb is None:
            self._purge_step = int(step) + 1
        text = self._read() if self.enabled else None
        if not text:
            return
        lines = text.splitlines(keepends=True)
        keep = [line for line in lines if not _logged_after(line, step)]
        if len(keep) == len(lines):
            return
        if self._remote:
            self._lines = ["".join(keep)]
            self._epath().write_text(self._lines[0])
            return
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


class Progress:
    """A tqdm bar over steps, shown only when stdout is a terminal."""

    def __init__(self, total: int, initial: int, *, enabled: bool = True):
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            file=sys.stdout, leave=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def show(self, *, loss: float, accuracy: float, images_per_sec: float) -> None:
        if self.bar is not None:
            speed = "" if math.isnan(images_per_sec) else f" img/s={images_per_sec:,.0f}"
            self.bar.set_postfix_str(f"loss={loss:.4f} acc={accuracy:.4f}{speed}")

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
