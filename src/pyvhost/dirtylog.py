"""The dirty log: the bitmap in which the back-end marks every guest page it writes while a guest migrates.

With ``VHOST_F_LOG_ALL`` negotiated the front-end shares a log with SET_LOG_BASE (an fd, ``mmap_size`` and
``mmap_offset``): one bit per ``VHOST_LOG_PAGE`` (4 KiB) guest-physical page, page ``p`` at bit ``p % 8`` of
byte ``p // 8``.  After writing guest memory the back-end sets the bit of every page it touched with an atomic
OR, a release fence between the data and the bits (DPDK's ``__vhost_log_write``): the front-end reads and
clears the bitmap while we write, and must never see a bit before the data it stands for, nor lose one.  A
ring's used area is logged at the guest-physical address SET_VRING_ADDR gives (``log_guest_addr``, with
``VHOST_VRING_F_LOG``).

The log is mapped MAP_SHARED into an :class:`~pyvhost.memory.Arena` of its own: a PROT_NONE guard page
follows it, a truncated log file is a recovered SIGBUS (not a dead process), and a view still alive at close
keeps the mapping instead of leaving a dangling pointer.  The compiled :func:`log_write` never writes past the
log: pages beyond its end are counted, not logged.
"""

from __future__ import annotations

import logging
import os
import stat

import numpy as np

from .atomic import fence_release, or8
from .jit import helper, kernel
from .memory import PAGE, SPACE_ARENA, SPACE_GPA, Arena, GuestMemory, MemoryError_, translate
from .protocol import ADDR_LIMIT, VHOST_LOG_PAGE, LogBase

log = logging.getLogger(__name__)

#: log2(VHOST_LOG_PAGE): page number of a guest-physical address.
LOG_PAGE_SHIFT = VHOST_LOG_PAGE.bit_length() - 1
#: Largest log accepted (64 GiB of bitmap covers 2 PiB of guest memory); bounds the address space reserved.
MAX_LOG_SIZE = 1 << 36
#: What a kernel gets while logging is off: with ``log_len`` 0, :func:`log_write` logs nothing.
NO_LOG = np.zeros(0, dtype=np.uint8)


class DirtyLogError(MemoryError_):
    """A log that cannot be accepted (bad fd, size, offset, too small for guest memory)."""


def log_size_for(mem_end: int) -> int:
    """Bytes of log that cover guest-physical [0, mem_end): one bit per VHOST_LOG_PAGE, rounded up."""
    pages = -(-mem_end // VHOST_LOG_PAGE)
    return -(-pages // 8)


def guest_end(memory: GuestMemory) -> int:
    """Highest guest-physical address + 1 of a memory table (0 for an empty one)."""
    return max((r.gpa_end for r in memory.regions), default=0)


class DirtyLog:
    """The log of one connection, mapped from the fd SET_LOG_BASE carried.

    The fd is not kept (the mapping holds the file): the caller closes it.  ``bitmap`` is the uint8 view the
    compiled helpers take, with ``len(bitmap)`` as their ``log_len``.  ``skipped`` counts pages written past
    the log's end (by :meth:`write`), which were not logged."""

    def __init__(
        self, fd: int, mmap_size: int, mmap_offset: int = 0, notify_fd: int = -1, arena: Arena | None = None
    ) -> None:
        """Map the log; into ``arena`` if given (the connection's guest memory arena: the compiled datapath then
        reaches it through the array it already has, at :attr:`at`), else into an arena of its own."""
        if not 0 < mmap_size <= MAX_LOG_SIZE:
            raise DirtyLogError(f"log size {mmap_size:#x} out of range (1 .. {MAX_LOG_SIZE:#x})")
        if not 0 <= mmap_offset < ADDR_LIMIT:
            raise DirtyLogError(f"log offset {mmap_offset:#x} out of range (offset + size overflows)")
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise DirtyLogError(f"log fd {fd}: {e}") from e
        if not stat.S_ISREG(st.st_mode):
            raise DirtyLogError(
                f"log fd {fd} is not mappable: not a regular file or memfd (mode {stat.filemode(st.st_mode)})"
            )
        if mmap_offset + mmap_size > st.st_size:
            raise DirtyLogError(
                f"log [{mmap_offset:#x}, {mmap_offset + mmap_size:#x}) lies past the end of its fd "
                f"({st.st_size:#x} bytes)"
            )
        delta = mmap_offset % PAGE
        maplen = -(-(delta + mmap_size) // PAGE) * PAGE
        self.shared = arena is not None
        # an arena of its own: the last page stays PROT_NONE, a guard (in a shared one, placements are apart)
        self.arena = arena if arena is not None else Arena(maplen + PAGE, notify_fd)
        try:
            start = self.arena.place(fd, mmap_offset, mmap_size, PAGE)
        except MemoryError_ as e:
            if not self.shared:
                self.arena.close()
            raise DirtyLogError(f"log: {e}") from e
        #: arena offset of the bitmap's first byte
        self.at = start
        self.size = mmap_size
        self.offset = mmap_offset
        self.bitmap: np.ndarray = self.arena.view[start : start + mmap_size]
        self.skipped = 0
        log.info(
            "dirty log mapped: %d bytes at fd offset %#x (covers %d MiB)", mmap_size, mmap_offset, self.covers >> 20
        )

    @classmethod
    def from_request(cls, req: LogBase, fd: int, notify_fd: int = -1) -> DirtyLog:
        """Map the log a parsed SET_LOG_BASE (``protocol.log_base``) describes."""
        return cls(fd, req.mmap_size, req.mmap_offset, notify_fd)

    @property
    def covers(self) -> int:
        """Guest-physical bytes the log covers, from address 0."""
        return self.size * 8 * VHOST_LOG_PAGE

    def check_covers(self, mem_end: int) -> None:
        """Refuse a log too small for guest memory ending at ``mem_end`` (highest address + 1)."""
        need = log_size_for(mem_end)
        if self.size < need:
            raise DirtyLogError(
                f"log of {self.size} bytes covers {self.covers:#x} bytes of guest memory; the memory table "
                f"reaches {mem_end:#x}, which needs {need} bytes"
            )

    def write(self, gpa: int, length: int) -> int:
        """Log guest-physical [gpa, gpa+length) (after a release fence); returns the pages past the log's end,
        not logged (also added to ``skipped``)."""
        return self.write_many(np.array([[gpa, length]], dtype=np.int64))

    def write_many(self, ranges: np.ndarray) -> int:
        """Log each (gpa, length) row of an int64 array of shape (n, 2); returns the pages past the log's end."""
        if self.bitmap is None:
            raise DirtyLogError("the log is closed")
        if ranges.dtype != np.int64 or ranges.ndim != 2 or ranges.shape[1] != 2:
            raise ValueError("ranges must be an int64 array of (gpa, length) rows")
        skipped = int(log_ranges(self.bitmap, self.size, ranges))
        if skipped < 0:
            raise ValueError("a range out of bounds (negative, or at or above ADDR_LIMIT)")
        if skipped and not self.skipped:
            log.warning("dirty log: writes past the %#x bytes it covers were not logged", self.covers)
        self.skipped += skipped
        return skipped

    def dirty_pages(self) -> np.ndarray:
        """Page numbers whose bit is set (a snapshot; for tests and diagnostics)."""
        if self.bitmap is None:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(np.unpackbits(self.bitmap, bitorder="little"))

    def bus_fault(self) -> str | None:
        """What a SIGBUS recovered in the log's mapping means (its file was truncated), or None."""
        n, off = self.arena.bus_faults()
        return f"the dirty log's file was truncated under its mapping ({n} fault(s), first at {off:#x})" if n else None

    def close(self) -> None:
        """Unmap the log (idempotent).  A view still alive keeps the mapping until it dies (logged, as
        :meth:`Arena.close <pyvhost.memory.Arena.close>` does), never a dangling pointer."""
        if self.bitmap is None:
            return
        self.bitmap = None  # type: ignore[assignment]
        if self.shared:
            self.arena.release(self.at)
        else:
            self.arena.close()

    def __enter__(self) -> DirtyLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_ring_log_addr(memory: GuestMemory, log_guest_addr: int, length: int) -> None:
    """Refuse a ring's ``log_guest_addr`` (VHOST_VRING_F_LOG) whose used area of ``length`` bytes is not in
    guest memory: logging it would mark pages that are not the ring's."""
    if memory.translate(SPACE_GPA, log_guest_addr, length) is None:
        raise DirtyLogError(f"log_guest_addr {log_guest_addr:#x} (+{length:#x}) is not in guest memory")


@helper
def _set_bits(buf, base, pages, gpa, length):
    """Set the bits of guest-physical [gpa, gpa+length) in the bitmap at ``buf[base:]`` that covers ``pages``
    pages (a release fence first, then one atomic OR per byte); return the pages past its end (not logged)."""
    page = gpa >> LOG_PAGE_SHIFT
    last = (gpa + length - 1) >> LOG_PAGE_SHIFT
    skipped = 0
    if last >= pages:
        skipped = last - max(page, pages) + 1
        last = pages - 1
    if page <= last:
        fence_release()
        while page <= last:
            stop = min(last, page | 7)  # the last page of this byte in the range
            mask = ((1 << (stop - page + 1)) - 1) << (page & 7)
            or8(buf, base + (page >> 3), np.uint8(mask))
            page = stop + 1
    return skipped


@helper
def log_write(log_u8, log_len, gpa, length):
    """Set the bit of every page of guest-physical [gpa, gpa+length) in ``log_u8`` (the first ``log_len``
    bytes), each byte by one atomic OR, after one release fence (call it after writing the data).  Returns the
    number of pages past the log's end (not logged, never written out of bounds), or -1 for arguments out of
    range (negative, or at or above ADDR_LIMIT), logging nothing.  ``length`` 0 logs nothing."""
    if gpa < 0 or length < 0 or gpa >= ADDR_LIMIT or length >= ADDR_LIMIT:
        return -1
    if length == 0:
        return 0
    return _set_bits(log_u8, 0, min(log_len, log_u8.shape[0]) * 8, gpa, length)


@helper
def log_arena(mem, table, log_off, log_size, off, length):
    """Log a write of ``length`` bytes at arena offset ``off`` (inside one region) in the log that lies at
    ``mem[log_off:log_off+log_size]``: the page behind it is found by the table's ``SPACE_ARENA`` map, whatever
    address (guest-physical, front-end, IOVA) the write was reached by.  Returns the pages not logged (past the
    log's end), or -1 if ``off`` is not in a region (nothing logged)."""
    if length <= 0:
        return 0
    gpa, _room = translate(table, SPACE_ARENA, off, length)
    if gpa < 0:
        return -1
    return _set_bits(mem, log_off, log_size * 8, gpa, length)


@helper
def log_used(log_u8, log_len, log_guest_addr, offset, length):
    """Log ``length`` bytes at ``offset`` of a ring's used area, at its ``log_guest_addr`` (as DPDK's
    ``vhost_log_used_vring``); returns what :func:`log_write` returns."""
    if offset < 0 or offset >= ADDR_LIMIT:
        return -1
    return log_write(log_u8, log_len, log_guest_addr + offset, length)


@kernel
def log_ranges(log_u8, log_len, ranges):
    """Log each (gpa, length) row of ``ranges`` (int64, shape (n, 2)), without the GIL; returns the pages past
    the log's end, or -1 if a row was out of range (the other rows are logged)."""
    skipped = 0
    bad = False
    for i in range(ranges.shape[0]):
        n = log_write(log_u8, log_len, ranges[i, 0], ranges[i, 1])
        if n < 0:
            bad = True
        else:
            skipped += n
    return -1 if bad else skipped


def warm_up() -> None:
    """Compile (or load from the cache) the log's kernel now."""
    log_ranges(np.zeros(1, dtype=np.uint8), 1, np.zeros((1, 2), dtype=np.int64))
