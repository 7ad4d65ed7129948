"""Inflight I/O tracking for split rings (vhost-user ``VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD``).

A back-end that completes requests out of order cannot recover, after a crash, which chains it had taken and
not completed: their avail ring entries may already have been overwritten.  So it records them in a shared
memory area that the front-end keeps across back-end restarts (``GET_INFLIGHT_FD`` hands a new one to the
front-end, ``SET_INFLIGHT_FD`` gives it back, again after each reconnect).  Layout (QEMU
``docs/interop/vhost-user.rst``, "Inflight I/O tracking"), one region per queue, each 64-byte aligned::

    struct QueueRegionSplit {          // offset
        u64 features;                  //  0
        u16 version;                   //  8   1; 0 = not initialised yet
        u16 desc_num;                  // 10   the queue size
        u16 last_batch_head;           // 12   head of the list of the batch being completed
        u16 used_idx;                  // 14   used index once that batch is fully recorded
        DescStateSplit desc[desc_num]; // 16
    };
    struct DescStateSplit { u8 inflight; u8 padding[5]; u16 next; u64 counter; };   // 16 bytes

The protocol, with the order that makes a crash between any two stores recoverable:

* take a chain (head ``h``): ``desc[h].counter = counter++``, then ``desc[h].inflight = 1``, before any of its
  I/O starts; chains are marked in avail order, so the marked ones plus the completed ones are always a prefix
  of the avail ring, and the next chain to take is ``used.idx + (number marked)``;
* complete a batch: write its used entries and link them (``desc[h].next = last_batch_head;
  last_batch_head = h``); publish ``used.idx`` (release); clear ``inflight`` of each; store ``used_idx``;
* reconnect: if ``used_idx != used.idx`` the batch was published but perhaps not cleared -- clear the
  ``used.idx - used_idx`` entries listed from ``last_batch_head`` and store ``used_idx``; then the marked
  chains are the ones to resubmit, in counter order, before any new one.

Every value read from the area is bounded before use: the front-end shares it and could have changed it.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import stat

import numpy as np

from .. import protocol as P

log = logging.getLogger(__name__)

INFLIGHT_ALIGNMENT = 64
INFLIGHT_VERSION = 1
HEADER_SIZE = 16
DESC_STATE_SIZE = 16
#: Largest area accepted from a front-end (32768-entry queues, 64 of them, with room to spare).
MAX_MMAP_SIZE = 1 << 30
MAX_QUEUE_SIZE = 32768
#: SET/GET_INFLIGHT_FD payload as QEMU sends it: the 20-byte description padded to 24 (C struct alignment).
PAYLOAD_SIZE = 24

# Word positions in the typed views of one queue region.
U16_VERSION, U16_DESC_NUM, U16_LAST_BATCH_HEAD, U16_USED_IDX = 4, 5, 6, 7


def desc_inflight(i):
    """Byte offset of ``desc[i].inflight`` (uint8 view)."""
    return HEADER_SIZE + DESC_STATE_SIZE * i


def desc_next(i):
    """Index of ``desc[i].next`` in the uint16 view."""
    return (HEADER_SIZE + DESC_STATE_SIZE * i + 6) // 2


def desc_counter(i):
    """Index of ``desc[i].counter`` in the uint64 view."""
    return (HEADER_SIZE + DESC_STATE_SIZE * i + 8) // 8


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region (libvhost-user's formula, so that any front-end's sizes agree)."""
    return -(-(DESC_STATE_SIZE * queue_size + 2) // INFLIGHT_ALIGNMENT) * INFLIGHT_ALIGNMENT


def pack_description(mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int) -> bytes:
    return P.INFLIGHT.pack(mmap_size, mmap_offset, num_queues, queue_size) + bytes(PAYLOAD_SIZE - P.INFLIGHT.size)


def unpack_description(payload: bytes) -> tuple[int, int, int, int]:
    if len(payload) < P.INFLIGHT.size:
        raise P.ProtocolError(f"inflight description of {len(payload)} bytes, expected {P.INFLIGHT.size}")
    return P.INFLIGHT.unpack_from(payload)


class QueueRegion:
    """Typed views of one queue's region: ``u8`` (inflight flags), ``u16`` (header, next), ``u64`` (counters)."""

    def __init__(self, buf: np.ndarray, size: int) -> None:
        self.size = size
        self.u8 = buf
        self.u16 = buf.view(np.uint16)
        self.u64 = buf.view(np.uint64)

    @property
    def version(self) -> int:
        return int(self.u16[U16_VERSION])

    def inflight_heads(self) -> np.ndarray:
        """Heads marked in flight, in counter order."""
        flags = self.u8[HEADER_SIZE : HEADER_SIZE + DESC_STATE_SIZE * self.size : DESC_STATE_SIZE]
        heads = np.flatnonzero(flags).astype(np.int64)
        counters = self.u64[desc_counter(0) : desc_counter(self.size) : 2][heads]
        return heads[np.argsort(counters, kind="stable")]

    def recover(self, used_idx: int) -> tuple[list[int], int]:
        """Make the region consistent with the used ring's index (which the driver has seen) and return the
        heads to resubmit in counter order and the next counter value.  A fresh region is initialised."""
        size = self.size
        if self.u16[U16_VERSION] == 0:
            self.u8[:] = 0
            self.u16[U16_VERSION] = INFLIGHT_VERSION
            self.u16[U16_DESC_NUM] = size
            self.u16[U16_USED_IDX] = used_idx
            return [], 0
        self.u16[U16_DESC_NUM] = size
        recorded = int(self.u16[U16_USED_IDX])
        if recorded != used_idx:
            # the last batch was published, perhaps not cleared: clear it (bounded by the queue size)
            batch = (used_idx - recorded) & 0xFFFF
            if batch > size:
                log.error(
                    "inflight area: used index %d is %d ahead of the recorded %d (queue size %d); "
                    "clearing at most %d entries",
                    used_idx,
                    batch,
                    recorded,
                    size,
                    size,
                )
                batch = size
            h = int(self.u16[U16_LAST_BATCH_HEAD])
            for _ in range(batch):
                if h >= size:
                    log.error("inflight area: last batch list leads to %d, beyond the queue size %d", h, size)
                    break
                self.u8[desc_inflight(h)] = 0
                h = int(self.u16[desc_next(h)])
            self.u16[U16_USED_IDX] = used_idx
        heads = self.inflight_heads()
        for h in heads:
            self.u8[desc_inflight(int(h))] = 1  # any non-zero value counts; store the canonical one
        counter = int(self.u64[desc_counter(0) : desc_counter(size) : 2].max()) + 1 if len(heads) else 0
        return [int(h) for h in heads], counter


class InflightArea:
    """The area a front-end gave with SET_INFLIGHT_FD, mapped; ``queue(i, size)`` gives a queue's region."""

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int) -> None:
        if not 1 <= num_queues <= 0xFFFF or not 1 <= queue_size <= MAX_QUEUE_SIZE:
            raise ValueError(f"inflight area: {num_queues} queues of size {queue_size}")
        need = num_queues * queue_region_size(queue_size)
        if not need <= mmap_size <= MAX_MMAP_SIZE:
            raise ValueError(
                f"inflight area: mmap_size {mmap_size}, {num_queues} queues of {queue_size} "
                f"need {need} (at most {MAX_MMAP_SIZE})"
            )
        if mmap_offset % mmap.PAGESIZE or mmap_offset >= P.ADDR_LIMIT:
            raise ValueError(f"inflight area: mmap_offset {mmap_offset:#x} not page-aligned or out of range")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"inflight fd is not a regular file or memfd (mode {stat.filemode(st.st_mode)})")
        if st.st_size < mmap_offset + mmap_size:
            raise ValueError(f"inflight fd has {st.st_size} bytes, the area needs {mmap_offset + mmap_size}")
        self.mm = mmap.mmap(
            fd, mmap_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=mmap_offset
        )
        self.buf = np.frombuffer(self.mm, dtype=np.uint8)
        self.mmap_size, self.num_queues, self.queue_size = mmap_size, num_queues, queue_size

    def queue(self, index: int, ring_size: int) -> QueueRegion | None:
        """The region of queue ``index`` for a ring of ``ring_size``, or None if the area has no room for it."""
        if index >= self.num_queues or ring_size > self.queue_size:
            log.error(
                "inflight area (%d queues of %d) has no room for queue %d of size %d: not tracked",
                self.num_queues,
                self.queue_size,
                index,
                ring_size,
            )
            return None
        rsize = queue_region_size(self.queue_size)
        return QueueRegion(self.buf[index * rsize : (index + 1) * rsize], ring_size)

    def close(self) -> None:
        self.buf = None  # type: ignore[assignment]
        try:
            self.mm.close()
        except BufferError:
            log.warning("inflight area still has views; left mapped")


def new_area_fd(num_queues: int, queue_size: int) -> tuple[int, int]:
    """GET_INFLIGHT_FD: a zeroed, sealed memfd for ``num_queues`` queues of ``queue_size``; (fd, mmap_size)."""
    if not 1 <= num_queues <= 0xFFFF or not 1 <= queue_size <= MAX_QUEUE_SIZE:
        raise ValueError(f"GET_INFLIGHT_FD: {num_queues} queues of size {queue_size}")
    size = num_queues * queue_region_size(queue_size)
    if size > MAX_MMAP_SIZE:
        raise ValueError(f"GET_INFLIGHT_FD: {size} bytes is over {MAX_MMAP_SIZE}")
    fd = os.memfd_create("pyvhost-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd, size
