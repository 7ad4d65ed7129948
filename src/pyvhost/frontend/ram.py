"""The front-end's guest RAM: a sealed memfd shared with the back-end, a bump allocator, GPA/UVA."""

from __future__ import annotations

import fcntl
import logging
import mmap
import os

import numpy as np

from .. import protocol as P

log = logging.getLogger(__name__)

PAGE = 4096
#: Guest-physical address of the start of the frontend's RAM (not 0, and unlike its virtual address, so that
#: a back-end mixing the two address spaces fails at once).
GPA_BASE = 0x4000_0000
BUF_SIZE = 2048


class GuestRam:
    """A memfd shared with the back-end, with a bump allocator and GPA/UVA helpers."""

    def __init__(self, size: int, gpa_base: int = GPA_BASE, seal: bool = True) -> None:
        self.size = size
        self.fd = os.memfd_create("pyvhost-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        if seal:  # a back-end maps this memory: it must never shrink under it (that would be SIGBUS there)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        self.mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.buf = np.frombuffer(self.mm, dtype=np.uint8)
        self.uva_base = self.buf.ctypes.data
        self.gpa_base = gpa_base
        self.top = 0

    def alloc(self, n: int, align: int = 64) -> int:
        """Offset of ``n`` fresh bytes."""
        off = -(-self.top // align) * align
        if off + n > self.size:
            raise MemoryError(f"guest RAM of {self.size} bytes exhausted")
        self.top = off + n
        return off

    def gpa(self, off: int) -> int:
        return self.gpa_base + off

    def uva(self, off: int) -> int:
        return self.uva_base + off

    def region(self) -> P.MemRegion:
        return P.MemRegion(self.gpa_base, self.size, self.uva_base, 0)

    def close(self) -> None:
        self.buf = None  # type: ignore[assignment]
        try:
            self.mm.close()
        except BufferError:
            log.warning("guest RAM still has views; left mapped")
        os.close(self.fd)
