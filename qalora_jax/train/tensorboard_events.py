"""TensorBoard event files of scalars, written directly (no TensorFlow, tensorboardX or PyTorch import).

An event file is a sequence of TFRecords, each holding one `Event` protocol buffer:

    record = length (uint64) | masked_crc(length) (uint32) | data | masked_crc(data) (uint32)    little-endian
    masked_crc(b) = ((c >> 15) | (c << 17)) + 0xA282EAD8 (mod 2^32),  c = CRC-32C of b (Castagnoli)

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }      Value { string tag = 1; float simple_value = 2; }

The file's first event holds file_version "brain.Event:2". (TensorFlow's event.proto and summary.proto and
its TFRecord format; TensorBoard reads files whose name holds "tfevents".)
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path


def _crc_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (reflected polynomial 0x82F63B78) of `data`."""
  c = 0xFFFFFFFF
  for b in data:
    c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
  """One TFRecord holding `data`."""
  length = struct.pack("<Q", len(data))
  return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited field (wire type 2)."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event(wall_time: float, step: int = 0, *, file_version: str | None = None,
          scalars: dict[str, float] | None = None) -> bytes:
  """An Event's bytes: its time and step, and either the file's version or scalar values (tag -> value)."""
  if step < 0:
    raise ValueError(f"step={step}: an event's step must be >= 0")
  out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
  if file_version is not None:
    out += _field(3, file_version.encode())
  if scalars:
    values = b"".join(_field(1, _field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value))
                      for tag, value in scalars.items())
    out += _field(5, values)
  return out


class EventWriter:
  """Appends scalar events to a new event file in `directory`, each written and flushed as it comes."""

  def __init__(self, directory: str | Path):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    self.path = directory / f"events.out.tfevents.{int(now)}.{socket.gethostname()}"
    self.file = open(self.path, "ab")
    self._write(event(now, file_version="brain.Event:2"))

  def _write(self, data: bytes) -> None:
    self.file.write(record(data))
    self.file.flush()

  def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
    self._write(event(time.time(), step, scalars={tag: float(v) for tag, v in scalars.items()}))

  def close(self) -> None:
    self.file.close()
