"""virtio-rng (virtio 1.2 §5.4): the whole device is the example of a device written in plain Python."""

from __future__ import annotations

import os

from .chain_device import ChainDevice

VIRTIO_ID_RNG = 4


class RngDevice(ChainDevice):
    """One request queue; the driver posts writable buffers, the device fills them with random bytes."""

    device_id = VIRTIO_ID_RNG
    num_queues = 1
    access_platform = True  # behind a vIOMMU: every access translated, requests drained on a stop

    def __init__(self, source=os.urandom) -> None:
        self.source = source
        self.bytes_served = 0

    def handle(self, queue: int, readable: list[memoryview], writable: list[memoryview]) -> int:
        written = 0
        for buf in writable:
            buf[:] = self.source(len(buf))
            written += len(buf)
        self.bytes_served += written
        return written

    def stats(self) -> dict:
        return {"bytes": self.bytes_served}
