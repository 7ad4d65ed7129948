"""A split ring of a started :class:`~pyvhost.frontend.net.Frontend` driven chain by chain, as a guest driver does:
chains of device-readable and device-writable segments posted by hand, completions read back -- for devices whose
queues carry more than frames (vsock, input)."""

from __future__ import annotations

import os
import time

import numpy as np

from ..ring.split import VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from .net import Frontend
from .ram import BUF_SIZE


class RingDriver:
    """One split ring of a started Frontend driven by hand: descriptor ``d`` points at buffer ``d``."""

    def __init__(self, fe: Frontend, index: int) -> None:
        self.fe, self.ring = fe, fe.rings[index]
        self.free = list(range(self.ring.size))[::-1]
        self.chains: dict[int, list[int]] = {}
        self.avail_idx = self.last_used = 0

    def buf(self, d: int) -> np.ndarray:
        off = self.ring.bufs_off + d * BUF_SIZE
        return self.fe.ram.buf[off : off + BUF_SIZE]

    def post(self, *segments: bytes | int, kick: bool = True) -> int:
        """A chain of device-readable (bytes) and device-writable (a length) segments; returns its head."""
        ring = self.ring
        ds = [self.free.pop() for _ in segments]
        for k, (d, seg) in enumerate(zip(ds, segments)):
            if isinstance(seg, int):
                length, flags = seg, VRING_DESC_F_WRITE
                self.buf(d)[:] = 0
            else:
                length, flags = len(seg), 0
                self.buf(d)[: len(seg)] = np.frombuffer(seg, np.uint8)
            more = k + 1 < len(ds)
            flags |= VRING_DESC_F_NEXT if more else 0
            ring.desc[2 * d] = ring.buf_gpa(d)
            ring.desc[2 * d + 1] = length | (flags << 32) | ((ds[k + 1] if more else 0) << 48)
        self.chains[ds[0]] = ds
        ring.avail[2 + self.avail_idx % ring.size] = ds[0]
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        ring.avail[1] = self.avail_idx
        if kick:
            os.eventfd_write(ring.kick_fd, 1)
        return ds[0]

    def used(self) -> list[tuple[int, int]]:
        """(head, length) of the chains completed since the last call; their descriptors are free again."""
        ring, out = self.ring, []
        while self.last_used != int(ring.used16[1]):
            e = self.last_used % ring.size
            head, n = int(ring.used32[1 + 2 * e]), int(ring.used32[2 + 2 * e])
            self.last_used = (self.last_used + 1) & 0xFFFF
            assert head in self.chains, f"completion of head {head} that is not outstanding"
            self.free += self.chains.pop(head)
            out.append((head, n))
        return out

    def wait(self, n: int, timeout: float = 10.0) -> list[tuple[int, int]]:
        """The next ``n`` completions, polled; TimeoutError after ``timeout`` s (a lost completion, not a slow one)."""
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            got += self.used()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(got)} of {n} completions within {timeout} s")
            time.sleep(0.001)
        return got
