"""Reads TensorBoard event files back as TensorBoard shows them (for the tests)."""

from __future__ import annotations

import os
import struct


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard shows them: files in name order, and a
    session start at step s hides the events of earlier files at steps >= s. A
    record cut short (a process killed while writing) ends its file."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    shown: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(os.listdir(logdir)):
        with open(os.path.join(logdir, name), "rb") as f:
            data = f.read()
        at = 0
        while at + 12 <= len(data):  # TFRecord: length, its crc, payload, payload crc
            (length,) = struct.unpack("<Q", data[at:at + 8])
            if at + 16 + length > len(data):
                break
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 16 + length
            if event.session_log.status == SessionLog.START:
                shown = {tag: [(s, v) for s, v in points if s < event.step]
                         for tag, points in shown.items()}
            for value in event.summary.value:
                shown.setdefault(value.tag, []).append((event.step, value.simple_value))
    return shown
