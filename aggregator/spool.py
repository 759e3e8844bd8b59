"""The spool: the open round's accepted updates, appended to a log before they are acknowledged.

One append-only file per writer and round (`spool/round-NNNNN/<writer>.log`); a record is a
header (magic, length of the client id, length of the payload, CRC-32 of both), the client id
and the payload. Each record goes to the OS in one unbuffered write before the broker gets its
ack, so a killed process loses nothing it acknowledged. A torn last record (a crash or a full
disk mid-write, never acknowledged) fails its length or CRC check: reading stops there, and the
writer cuts it off before appending again. One file per update, as before, cost 0.25 ms per
update in file creation under load; an append costs about 0.01 ms.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

MAGIC = b"FSBU"
HEADER = struct.Struct("<4sIII")  # magic, client id bytes, payload bytes, crc32(client + payload)


def encode_record(client: str, payload: bytes) -> list[bytes]:
    """One spool record as its parts (header, client id in UTF-8, payload): one `writev`."""
    name = client.encode()
    crc = zlib.crc32(payload, zlib.crc32(name))
    return [HEADER.pack(MAGIC, len(name), len(payload), crc), name, payload]


def read_records(path: Path) -> Iterator[tuple[str, bytes, int]]:
    """(client, payload, end offset) of each intact record, stopping at the first torn one."""
    with open(path, "rb") as f:
        offset = 0
        while header := f.read(HEADER.size):
            if len(header) < HEADER.size:
                break
            magic, name_len, payload_len, crc = HEADER.unpack(header)
            if magic != MAGIC:
                break
            name, payload = f.read(name_len), f.read(payload_len)
            if len(payload) < payload_len or zlib.crc32(payload, zlib.crc32(name)) != crc:
                break
            offset += HEADER.size + name_len + payload_len
            yield name.decode(), payload, offset
        else:
            return
    log.warning("%s: torn record at byte %d ignored (it was never acknowledged)", path, offset)


class SpoolLog:
    """Appends one writer's accepted updates to `<folder>/<writer>.log` (opened on first use)."""

    def __init__(self, folder: Path, writer: str) -> None:
        self.path = folder / f"{writer}.log"
        self.file: BinaryIO | None = None

    def append(self, client: str, payload: bytes) -> None:
        """Write one record to the OS (no fsync: survives a killed process, not a power cut)."""
        if self.file is None:
            self.file = self.open()
        parts = encode_record(client, payload)
        if os.writev(self.file.fileno(), parts) != sum(map(len, parts)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open(self) -> BinaryIO:
        """Open for appending, after cutting off a torn record a crash may have left."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        intact = 0
        if self.path.is_file() and self.path.stat().st_size > 0:
            intact = max((end for _, _, end in read_records(self.path)), default=0)
            if intact < self.path.stat().st_size:
                os.truncate(self.path, intact)
        return open(self.path, "ab", buffering=0)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def read_spool(folder: Path) -> list[tuple[str, bytes]]:
    """(client, payload) of every intact record in every writer's log of a round folder."""
    logs = sorted(folder.glob("*.log")) if folder.exists() else []
    return [(client, payload) for path in logs for client, payload, _ in read_records(path)]
