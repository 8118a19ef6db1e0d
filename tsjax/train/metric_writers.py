"""Metric writers: JSON lines and TensorBoard event files (no TensorFlow).

``TensorBoardWriter`` writes scalar summaries in the TFRecord-framed
``Event`` protobuf format TensorBoard reads (``events.out.tfevents.*``). The
few protobuf fields needed are encoded by hand, and records are framed with
masked CRC-32C checksums, so no TensorFlow or tensorboardX is required.
``TextLog`` appends human-readable lines (the per-epoch summary) to a file
and echoes them to stdout. ``MultiWriter`` fans scalars and lines out to
several writers. Writers are created on the main process only (see
``tsjax.train.distributed.is_main_process``); an empty ``MultiWriter`` is the
silent writer of the other processes.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from typing import Mapping


# ---------------------------------------------------------------- CRC-32C
def _crc_table():
  poly = 0x82F63B78
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ poly if c & 1 else c >> 1
    table.append(c)
  return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------- protobuf
def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _key(field: int, wire: int) -> bytes:
  return _varint((field << 3) | wire)


def _len_field(field: int, payload: bytes) -> bytes:
  return _key(field, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
  """Serialises ``tensorflow.Event`` (wall_time=1, step=2, file_version=3,
  summary=5 with Summary.Value{tag=1, simple_value=2})."""
  msg = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(
      int(step) & 0xFFFFFFFFFFFFFFFF)
  if file_version is not None:
    msg += _len_field(3, file_version.encode())
  if scalars:
    values = b"".join(
        _len_field(1, _len_field(1, tag.encode()) + _key(2, 5) +
                   struct.pack("<f", float(v)))
        for tag, v in scalars.items())
    msg += _len_field(5, values)
  return msg


def frame_record(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data +
          struct.pack("<I", masked_crc32c(data)))


def read_records(path: str):
  """Yields the payloads of a TFRecord file, checking every CRC."""
  with open(path, "rb") as f:
    while True:
      header = f.read(8)
      if not header:
        return
      (length,) = struct.unpack("<Q", header)
      (hcrc,) = struct.unpack("<I", f.read(4))
      if hcrc != masked_crc32c(header):
        raise ValueError(f"corrupt record header in {path}")
      data = f.read(length)
      (dcrc,) = struct.unpack("<I", f.read(4))
      if dcrc != masked_crc32c(data):
        raise ValueError(f"corrupt record data in {path}")
      yield data


# ---------------------------------------------------------------- writers
class TensorBoardWriter:
  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = (f"events.out.tfevents.{int(time.time())}."
            f"{socket.gethostname()}.{os.getpid()}")
    self.path = os.path.join(logdir, name)
    self._f = open(self.path, "ab")
    self._f.write(frame_record(encode_event(time.time(), 0,
                                            file_version="brain.Event:2")))
    self._f.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    finite = {k: float(v) for k, v in scalars.items()
              if isinstance(v, (int, float)) and math.isfinite(float(v))}
    if finite:
      self._f.write(frame_record(encode_event(time.time(), step,
                                              scalars=finite)))
      self._f.flush()

  def close(self) -> None:
    self._f.close()


class JsonlWriter:
  """Appends one JSON object per call: ``{"step": ..., **scalars}``."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.path = path
    self._f = open(path, "a")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    self._f.write(json.dumps({"step": int(step), **{
        k: float(v) for k, v in scalars.items()}}) + "\n")
    self._f.flush()

  def close(self) -> None:
    self._f.close()


class TextLog:
  """Appends lines to a text file (flushed at once, so a cluster's log shows
  them as they come) and, with ``echo``, prints them to stdout."""

  def __init__(self, path: str, echo: bool = True):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.path, self.echo = path, echo
    self._f = open(path, "a")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    pass

  def write_text(self, line: str) -> None:
    self._f.write(line + "\n")
    self._f.flush()
    if self.echo:
      print(line, flush=True)

  def close(self) -> None:
    self._f.close()


class MultiWriter:
  def __init__(self, writers):
    self.writers = list(writers)

  def write_scalars(self, step, scalars):
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_text(self, line: str) -> None:
    """Sends a line to the writers that keep text (``TextLog``)."""
    for w in self.writers:
      if hasattr(w, "write_text"):
        w.write_text(line)

  def close(self):
    for w in self.writers:
      w.close()
