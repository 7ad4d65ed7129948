"""The driver side of a packed ring (virtio 1.2 §2.8) for pyvhost's front-end: layout and compiled loops.

Each buffer is one descriptor whose buffer id is its index in the buffer area.  A batch of buffers is made
available by writing every descriptor but the first whole (one 64-bit store of len | id | flags), then the
first one's flags by a release store, so the device never sees part of a batch.  The driver polls as it goes:
its own event suppression area (the driver area, read by the device) says DISABLE, and it kicks only when the
device area asks for it (ENABLE, or DESC with the descriptor the device waits for made available).
Used descriptors are taken back from the used cursor while their AVAIL and USED bits both equal the used
wrap counter; a buffer id out of range (a broken device) stops the reclaiming and is counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .. import protocol as P
from ..atomic import eventfd_write, fence_full, ld16_acquire, ld32, st16, st16_release, st32
from ..jit import helper, kernel
from ..ring.packed import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED,
    encode_base,
    linear,
    need_event,
    ring_bytes,
)
from ..ring.split import VRING_DESC_F_WRITE

# driver ring state: the split driver's fields (frontend.D_*) and these
from .ram import BUF_SIZE, PAGE, GuestRam
from .split import (
    D_AVAIL_IDX,
    D_BATCH,
    D_BUFLEN,
    D_BYTES,
    D_DONE,
    D_EVENT_IDX,
    D_FREE_TOP,
    D_HDR,
    D_KICKFD,
    D_KICKS,
    D_LAST_USED,
    D_LEN_ERRORS,
    D_LIMIT,
    D_MASK,
    D_POSTED,
    D_SIZE,
)

D_AVAIL_WRAP, D_USED_WRAP, D_BAD_IDS = 16, 17, 18
PD_FIELDS = 20
#: SET_VRING_BASE of a fresh packed ring: both cursors at 0 with wrap counter 1
INITIAL_BASE = encode_base(0, 1, 0, 1)


@dataclass
class PackedDriverRing:
    """One packed ring laid out in guest RAM, seen by the driver through NumPy views."""

    index: int
    size: int
    desc_off: int
    driver_off: int  # driver event suppression area (we write it)
    device_off: int  # device event suppression area (the device writes it)
    bufs_off: int
    ram: GuestRam
    kick_fd: int
    call_fd: int

    def __post_init__(self) -> None:
        b = self.ram.buf
        n = self.size
        self.desc = b[self.desc_off : self.desc_off + ring_bytes(n)].view(np.uint64)
        self.driver = b[self.driver_off : self.driver_off + 4].view(np.uint16)
        self.device = b[self.device_off : self.device_off + 4].view(np.uint16)
        self.d = np.zeros(PD_FIELDS, dtype=np.int64)
        self.d[D_SIZE], self.d[D_MASK], self.d[D_KICKFD] = n, n - 1, self.kick_fd
        self.d[D_LIMIT] = -1
        self.d[D_BUFLEN] = BUF_SIZE
        self.d[D_BATCH] = 64
        self.d[D_AVAIL_WRAP] = self.d[D_USED_WRAP] = 1
        self.free = np.arange(n, dtype=np.int64)[::-1].copy()
        self.d[D_FREE_TOP] = n
        self.driver[1] = RING_EVENT_FLAGS_DISABLE  # a polling driver
        self.stopped = False

    def addr(self) -> P.VringAddr:
        r = self.ram
        return P.VringAddr(self.index, 0, r.uva(self.desc_off), r.uva(self.device_off), r.uva(self.driver_off), 0)

    def buf_gpa(self, i: int) -> int:
        return self.ram.gpa(self.bufs_off + i * BUF_SIZE)

    def views(self):
        return self.d, self.desc, self.driver, self.device, self.free

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            os.close(fd)
        self.desc = self.driver = self.device = None  # type: ignore[assignment]


def new_ring(ram: GuestRam, index: int, size: int) -> PackedDriverRing:
    """Lay a packed ring of ``size`` one-buffer descriptors out in ``ram``."""
    desc = ram.alloc(ring_bytes(size), PAGE)
    driver = ram.alloc(4, 64)
    device = ram.alloc(4, 64)
    bufs = ram.alloc(size * BUF_SIZE, PAGE)
    return PackedDriverRing(
        index,
        size,
        desc,
        driver,
        device,
        bufs,
        ram,
        os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
        os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
    )


# ---------------------------------------------------------------------------------------------------------
@helper
def _reclaim(d, desc, free, count_bytes):
    """Take back used buffers (one descriptor each); count them (and their bytes for RX)."""
    size = d[D_SIZE]
    pos = d[D_LAST_USED]
    wrap = d[D_USED_WRAP]
    held = size - d[D_FREE_TOP]
    n = 0
    while n < held:
        f = np.int64(ld16_acquire(desc, 16 * pos + 14))
        if ((f & VRING_PACKED_DESC_F_AVAIL) != 0) != (wrap != 0) or ((f & VRING_PACKED_DESC_F_USED) != 0) != (
            wrap != 0
        ):
            break
        word = desc[2 * pos + 1]
        bid = np.int64((word >> np.uint64(32)) & np.uint64(0xFFFF))
        if bid >= size:
            d[D_BAD_IDS] += 1
            break
        if count_bytes:
            ln = np.int64(word & np.uint64(0xFFFFFFFF))
            if ln < d[D_HDR]:
                d[D_LEN_ERRORS] += 1
            else:
                d[D_BYTES] += ln - d[D_HDR]
        free[d[D_FREE_TOP]] = bid
        d[D_FREE_TOP] += 1
        pos += 1
        if pos >= size:
            pos = 0
            wrap ^= 1
        n += 1
    d[D_LAST_USED] = pos
    d[D_USED_WRAP] = wrap
    d[D_DONE] += n
    return n


@helper
def _post(d, desc, dev, free, bufs_gpa, length, flags):
    """Make up to a batch of free buffers available (respecting D_LIMIT), first flags last; kick if asked."""
    n = min(d[D_FREE_TOP], d[D_BATCH])
    if d[D_LIMIT] >= 0:
        n = min(n, d[D_LIMIT] - d[D_POSTED])
    if n <= 0:
        return 0
    size = d[D_SIZE]
    pos = d[D_AVAIL_IDX]
    wrap = d[D_AVAIL_WRAP]
    old = linear(pos, wrap, size)
    head = pos
    head_flags = 0
    for k in range(n):
        d[D_FREE_TOP] -= 1
        bid = free[d[D_FREE_TOP]]
        fl = flags | (VRING_PACKED_DESC_F_AVAIL if wrap else VRING_PACKED_DESC_F_USED)
        desc[2 * pos] = np.uint64(bufs_gpa + bid * d[D_BUFLEN])
        if k == 0:
            head_flags = fl
            st32(desc, 16 * pos + 8, np.uint32(length))
            st16(desc, 16 * pos + 12, np.uint16(bid))
        else:
            desc[2 * pos + 1] = np.uint64(length) | (np.uint64(bid) << np.uint64(32)) | (np.uint64(fl) << np.uint64(48))
        pos += 1
        if pos >= size:
            pos = 0
            wrap ^= 1
    st16_release(desc, 16 * head + 14, np.uint16(head_flags))
    d[D_AVAIL_IDX] = pos
    d[D_AVAIL_WRAP] = wrap
    d[D_POSTED] += n
    fence_full()  # our flags must be visible before we read whether the device wants a kick
    ev = np.int64(ld32(dev, 0))
    evflags = (ev >> 16) & 0x3
    if evflags == RING_EVENT_FLAGS_DISABLE:
        kick = False
    elif evflags == RING_EVENT_FLAGS_DESC and d[D_EVENT_IDX]:
        off = ev & 0x7FFF
        event = off if (ev >> 15) & 1 else off + size
        kick = need_event(event, linear(pos, wrap, size), old, 2 * size)
    else:
        kick = True
    if kick:
        d[D_KICKS] += 1
        eventfd_write(d[D_KICKFD], 1)
    return n


@kernel
def drive_tx(d, desc, driver, dev, free, bufs_gpa, length, passes):
    """Transmit: keep the ring full of frames; return completions seen."""
    done = 0
    for _ in range(passes):
        done += _reclaim(d, desc, free, False)
        _post(d, desc, dev, free, bufs_gpa, length, 0)
    return done


@kernel
def drive_rx(d, desc, driver, dev, free, bufs_gpa, passes):
    """Receive: keep the ring full of empty buffers; count what comes back."""
    done = 0
    for _ in range(passes):
        done += _reclaim(d, desc, free, True)
        _post(d, desc, dev, free, bufs_gpa, d[D_BUFLEN], VRING_DESC_F_WRITE)
    return done


def warm_up() -> None:
    """Compile (or load from cache) the packed driver kernels."""
    ram = GuestRam(1 << 20)
    try:
        ring = new_ring(ram, 0, 4)
        drive_tx(*ring.views(), ring.buf_gpa(0), 64, 0)
        drive_rx(*ring.views(), ring.buf_gpa(0), 0)
        ring.close()
    finally:
        ram.close()
