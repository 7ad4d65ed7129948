"""A ring of a started :class:`~pyvhost.frontend.net.Frontend` driven chain by chain, as a guest driver does:
chains of device-readable and device-writable segments posted by hand, completions read back -- for devices whose
queues carry more than frames (vsock, input, blk, rng).  Split rings (:class:`RingDriver`) and packed ones
(:class:`PackedRingDriver`, the same interface); :func:`ring_driver` picks the one of the front-end's layout."""

from __future__ import annotations

import os
import time

import numpy as np

from ..ring.packed import VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED
from ..ring.split import VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from .net import Frontend
from .packed import PackedDriverRing
from .ram import BUF_SIZE


class HandDriver:
    """What both hand drivers share: waiting for completions (``used`` is the layout's)."""

    def used(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def buf(self, d: int) -> np.ndarray:
        raise NotImplementedError

    def fill(self, d: int, seg: bytes | int, fill: int) -> tuple[int, int]:
        """Buffer ``d`` as one segment of a chain: device-readable ``bytes`` copied in, or a device-writable
        length (the buffer set to ``fill``); returns the descriptor's length and flags."""
        if isinstance(seg, int):
            self.buf(d)[:] = fill
            return seg, VRING_DESC_F_WRITE
        self.buf(d)[: len(seg)] = np.frombuffer(seg, np.uint8)
        return len(seg), 0

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


class RingDriver(HandDriver):
    """One split ring of a started Frontend driven by hand: descriptor ``d`` points at buffer ``d``."""

    def __init__(self, fe: Frontend, index: int) -> None:
        self.fe, self.ring = fe, fe.rings[index]
        self.free = list(range(self.ring.size))[::-1]
        self.chains: dict[int, list[int]] = {}
        self.avail_idx = self.last_used = 0

    def buf(self, d: int) -> np.ndarray:
        off = self.ring.bufs_off + d * BUF_SIZE
        return self.fe.ram.buf[off : off + BUF_SIZE]

    def post(self, *segments: bytes | int, kick: bool = True, fill: int = 0) -> int:
        """A chain of device-readable (bytes) and device-writable (a length, the buffer filled with ``fill``)
        segments; returns its head."""
        ring = self.ring
        ds = [self.free.pop() for _ in segments]
        for k, (d, seg) in enumerate(zip(ds, segments)):
            length, flags = self.fill(d, seg, fill)
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


class PackedRingDriver(HandDriver):
    """One packed ring of a started Frontend driven by hand, as :class:`RingDriver`: each segment takes a free
    buffer ``d`` (descriptors are the ring positions, in order); a chain's buffer id is its first buffer, which
    ``post`` returns and ``used`` reports (out-of-order completions included)."""

    def __init__(self, fe: Frontend, index: int) -> None:
        self.fe = fe
        self.ring: PackedDriverRing = fe.rings[index]  # type: ignore[assignment]
        self.free = list(range(self.ring.size))[::-1]
        self.chains: dict[int, list[int]] = {}
        self.pos, self.wrap = 0, 1  # avail cursor
        self.used_pos, self.used_wrap = 0, 1

    def buf(self, d: int) -> np.ndarray:
        off = self.ring.bufs_off + d * BUF_SIZE
        return self.fe.ram.buf[off : off + BUF_SIZE]

    def avail_flags(self, wrap: int) -> int:
        """AVAIL/USED bits of a descriptor made available with wrap counter ``wrap``."""
        return VRING_PACKED_DESC_F_AVAIL if wrap else VRING_PACKED_DESC_F_USED

    def write_descs(self, descs: list[tuple[int, int, int, int]], kick: bool = True) -> None:
        """Write ``(addr, len, id, flags)`` descriptors from the avail cursor as given (flags whole: the test
        sets AVAIL/USED), the first one last; the cursor moves past them."""
        ring, size = self.ring, self.ring.size
        pos = [(self.pos + k) % size for k in range(len(descs))]
        for k in range(len(descs) - 1, -1, -1):  # the head last: one 64-bit store publishes it
            addr, length, bid, flags = descs[k]
            ring.desc[2 * pos[k]] = addr
            ring.desc[2 * pos[k] + 1] = length | (bid << 32) | (flags << 48)
        for _ in descs:
            self.pos += 1
            if self.pos == size:
                self.pos, self.wrap = 0, self.wrap ^ 1
        if kick:
            os.eventfd_write(ring.kick_fd, 1)

    def post(self, *segments: bytes | int, kick: bool = True, fill: int = 0) -> int:
        """A chain of device-readable (bytes) and device-writable (a length, the buffer filled with ``fill``)
        segments; returns its buffer id."""
        ring = self.ring
        ds = [self.free.pop() for _ in segments]
        descs = []
        wrap, pos = self.wrap, self.pos
        for k, (d, seg) in enumerate(zip(ds, segments)):
            length, flags = self.fill(d, seg, fill)
            flags |= VRING_DESC_F_NEXT if k + 1 < len(ds) else 0
            descs.append((ring.buf_gpa(d), length, ds[0], flags | self.avail_flags(wrap)))
            pos += 1
            if pos == ring.size:
                pos, wrap = 0, wrap ^ 1
        self.chains[ds[0]] = ds
        self.write_descs(descs, kick)
        return ds[0]

    def used(self) -> list[tuple[int, int]]:
        """(buffer id, length) of the chains completed since the last call; their buffers are free again."""
        ring = self.ring
        out: list[tuple[int, int]] = []
        both = VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED
        while True:
            word = int(ring.desc[2 * self.used_pos + 1])
            flags = word >> 48
            if (flags & both) != (both if self.used_wrap else 0):
                return out
            bid, n = (word >> 32) & 0xFFFF, word & 0xFFFFFFFF
            assert bid in self.chains, f"completion of buffer id {bid} that is not outstanding"
            ds = self.chains.pop(bid)
            self.free += ds
            self.used_pos += len(ds)
            if self.used_pos >= ring.size:
                self.used_pos, self.used_wrap = self.used_pos - ring.size, self.used_wrap ^ 1
            out.append((bid, n))


def ring_driver(fe: Frontend, index: int) -> RingDriver | PackedRingDriver:
    """The hand driver of ring ``index`` for the front-end's layout (split or packed)."""
    return PackedRingDriver(fe, index) if fe.want_packed else RingDriver(fe, index)
