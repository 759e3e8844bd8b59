"""Spooling accepted updates on a writer thread, so the disk write overlaps the next decode.

Each message is acknowledged to the broker only after its update's spool file is written
(a rejected one, with nothing to write, in arrival order after the writes before it), so a
killed aggregator loses nothing it acknowledged. `drain` waits for every write, as a round
commit must, and re-raises the writer's first failure (e.g. a full disk) in the caller's
thread; after a failure nothing more is written or acknowledged.
"""

from __future__ import annotations

import queue
import threading
from typing import Protocol

from fedsb.mqtt import Message, MqttConnection

MAX_PENDING = 64  # messages handed to the writer and not yet written (bounds memory)


class Spool(Protocol):
    def save_update(self, round_no: int, client: str, payload: bytes) -> None: ...


_Job = tuple[int, str | None, Message]


class SpoolWriter:
    """A thread that writes accepted updates to the spool and then acknowledges them."""

    def __init__(self, spool: Spool, connection: MqttConnection) -> None:
        self.spool, self.connection = spool, connection
        self.jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=MAX_PENDING)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="spool-writer", daemon=True)
        self.thread.start()

    def keep(self, message: Message, round_no: int, client: str | None) -> None:
        """Spool `message` as `client`'s update of `round_no` (None: rejected), then ack it."""
        self.check()
        self.jobs.put((round_no, client, message))

    def drain(self) -> None:
        """Wait until everything handed over is written and acknowledged (or failed)."""
        self.jobs.join()
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Finish what was handed over, then stop the thread."""
        self.jobs.put(None)
        self.thread.join(timeout=60)

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                round_no, client, message = job
                if self.error is None:
                    if client is not None:
                        self.spool.save_update(round_no, client, message.payload)
                    self.connection.ack(message)
            except BaseException as err:  # noqa: BLE001 - re-raised in the service's thread
                self.error = err
            finally:
                self.jobs.task_done()
