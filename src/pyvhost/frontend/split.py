"""The driver side of a split ring (virtio 1.2 §2.7) for pyvhost's front-end: layout and compiled loops."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .. import protocol as P
from ..atomic import eventfd_write, fence_full, load_acquire, store_release
from ..jit import helper, kernel
from ..ring.split import (
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    avail_bytes,
    desc_bytes,
    need_event,
    used_bytes,
)
from .ram import BUF_SIZE, GuestRam

# driver ring state fields
D_SIZE, D_MASK, D_AVAIL_IDX, D_LAST_USED, D_FREE_TOP, D_EVENT_IDX, D_KICKFD = 0, 1, 2, 3, 4, 5, 6
D_POSTED, D_DONE, D_BYTES, D_KICKS, D_LIMIT, D_HDR, D_BUFLEN, D_BATCH, D_LEN_ERRORS = 7, 8, 9, 10, 11, 12, 13, 14, 15
D_FIELDS = 16


@dataclass
class DriverRing:
    """One split ring laid out in guest RAM, seen by the driver through NumPy views."""

    index: int
    size: int
    desc_off: int
    avail_off: int
    used_off: int
    bufs_off: int
    ram: GuestRam
    kick_fd: int
    call_fd: int

    def __post_init__(self) -> None:
        b = self.ram.buf
        n = self.size
        self.desc = b[self.desc_off : self.desc_off + desc_bytes(n)].view(np.uint64)
        self.avail = b[self.avail_off : self.avail_off + avail_bytes(n)].view(np.uint16)
        self.used16 = b[self.used_off : self.used_off + used_bytes(n)].view(np.uint16)
        self.used32 = b[self.used_off : self.used_off + used_bytes(n) - 2].view(np.uint32)
        self.d = np.zeros(D_FIELDS, dtype=np.int64)
        self.d[D_SIZE], self.d[D_MASK], self.d[D_KICKFD] = n, n - 1, self.kick_fd
        self.d[D_LIMIT] = -1
        self.d[D_BUFLEN] = BUF_SIZE
        self.d[D_BATCH] = 64
        self.free = np.arange(n, dtype=np.int64)[::-1].copy()
        self.d[D_FREE_TOP] = n
        self.stopped = False

    def addr(self) -> P.VringAddr:
        r = self.ram
        return P.VringAddr(self.index, 0, r.uva(self.desc_off), r.uva(self.used_off), r.uva(self.avail_off), 0)

    def buf_gpa(self, i: int) -> int:
        return self.ram.gpa(self.bufs_off + i * BUF_SIZE)

    def views(self):
        return self.d, self.desc, self.avail, self.used16, self.used32, self.free

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            os.close(fd)
        self.desc = self.avail = self.used16 = self.used32 = None  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------------------
@helper
def _reclaim(d, used16, used32, free, count_bytes):
    """Take back completed buffers; count them (and their bytes for RX)."""
    used_idx = np.int64(load_acquire(used16, 1))
    n = (used_idx - d[D_LAST_USED]) & 0xFFFF
    last = d[D_LAST_USED]
    for k in range(n):
        slot = (last + k) & d[D_MASK]
        head = np.int64(used32[1 + 2 * slot])
        if count_bytes:
            ln = np.int64(used32[2 + 2 * slot])
            if ln < d[D_HDR]:
                d[D_LEN_ERRORS] += 1
            else:
                d[D_BYTES] += ln - d[D_HDR]
        free[d[D_FREE_TOP]] = head & d[D_MASK]
        d[D_FREE_TOP] += 1
    d[D_LAST_USED] = used_idx
    d[D_DONE] += n
    return n


@helper
def _post(d, desc, avail, used16, free, bufs_gpa, length, flags):
    """Post up to a batch of free buffers (respecting D_LIMIT) and kick if the device asked for it."""
    n = min(d[D_FREE_TOP], d[D_BATCH])
    if d[D_LIMIT] >= 0:
        n = min(n, d[D_LIMIT] - d[D_POSTED])
    if n <= 0:
        return 0
    old = d[D_AVAIL_IDX]
    for k in range(n):
        d[D_FREE_TOP] -= 1
        i = free[d[D_FREE_TOP]]
        desc[2 * i] = np.uint64(bufs_gpa + i * d[D_BUFLEN])
        desc[2 * i + 1] = np.uint64(length) | (np.uint64(flags) << np.uint64(32))
        avail[2 + ((old + k) & d[D_MASK])] = np.uint16(i)
    new = (old + n) & 0xFFFF
    store_release(avail, 1, np.uint16(new))
    d[D_AVAIL_IDX] = new
    d[D_POSTED] += n
    fence_full()
    if d[D_EVENT_IDX]:
        kick = need_event(np.int64(used16[2 + 4 * d[D_SIZE]]), new, old)
    else:
        kick = (used16[0] & VRING_USED_F_NO_NOTIFY) == 0
    if kick:
        d[D_KICKS] += 1
        eventfd_write(d[D_KICKFD], 1)
    return n


@kernel
def drive_tx(d, desc, avail, used16, used32, free, bufs_gpa, length, passes):
    """Transmit: keep the ring full of frames; return completions seen."""
    done = 0
    for _ in range(passes):
        done += _reclaim(d, used16, used32, free, False)
        _post(d, desc, avail, used16, free, bufs_gpa, length, 0)
    return done


@kernel
def drive_rx(d, desc, avail, used16, used32, free, bufs_gpa, passes):
    """Receive: keep the ring full of empty buffers; count what comes back."""
    done = 0
    for _ in range(passes):
        done += _reclaim(d, used16, used32, free, True)
        _post(d, desc, avail, used16, free, bufs_gpa, d[D_BUFLEN], VRING_DESC_F_WRITE)
    return done
