"""The front-end's guest RAM: a sealed memfd shared with the back-end, a bump allocator, GPA/UVA.

The RAM may be shared as ``regions`` memory regions (slices of the one memfd, adjacent in GPA and UVA, as QEMU
shares guest RAM split in DIMMs); the allocator then spreads ring parts and buffers over them: each allocation
goes to the region after the previous one's (or the next with room), never across a seam, and one larger
than a region takes a run of untouched regions (its buffers then cross seams, as a guest's may).
"""

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

    def __init__(self, size: int, gpa_base: int = GPA_BASE, seal: bool = True, regions: int = 1) -> None:
        if regions < 1 or regions > size // PAGE:
            raise ValueError(f"{regions} regions do not fit {size} bytes of RAM (one page each at least)")
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
        self.split(regions)

    def split(self, regions: int) -> None:
        """Share the RAM as ``regions`` regions, all free (the allocator's layout)."""
        self.nregions = regions
        #: bytes per region (a whole number of pages; the last region also takes what is left over)
        self.region_size = self.size // regions // PAGE * PAGE
        #: per region (regions > 1): offset of its first free byte
        self.tops = [i * self.region_size for i in range(regions)]
        self._cursor = 0

    def _end(self, i: int) -> int:
        return self.size if i == self.nregions - 1 else (i + 1) * self.region_size

    def alloc(self, n: int, align: int = 64) -> int:
        """Offset of ``n`` fresh bytes."""
        if self.nregions > 1:
            return self._alloc_spread(n, align)
        off = -(-self.top // align) * align
        if off + n > self.size:
            raise MemoryError(f"guest RAM of {self.size} bytes exhausted")
        self.top = off + n
        return off

    def _alloc_spread(self, n: int, align: int) -> int:
        """``n`` bytes in the next region with room (never across a seam), or, larger than a region, in a run
        of untouched regions starting at a region's first byte."""
        count = self.nregions
        for k in range(count):
            i = (self._cursor + k) % count
            if n <= self.region_size:
                off = -(-self.tops[i] // align) * align
                if off + n > self._end(i):
                    continue
                self.tops[i] = off + n
            else:
                off = i * self.region_size
                last = (off + n - 1) // self.region_size if off + n <= self.size else count
                if last >= count or any(self.tops[j] != j * self.region_size for j in range(i, last + 1)):
                    continue
                for j in range(i, last + 1):
                    self.tops[j] = self._end(j)
                self.tops[last] = off + n
            self._cursor = (i + 1) % count
            self.top = max(self.top, off + n)
            return off
        raise MemoryError(f"guest RAM of {self.size} bytes in {count} regions: no room for {n} bytes")

    def gpa(self, off: int) -> int:
        return self.gpa_base + off

    def uva(self, off: int) -> int:
        return self.uva_base + off

    def region(self) -> P.MemRegion:
        """The whole RAM as one region."""
        return P.MemRegion(self.gpa_base, self.size, self.uva_base, 0)

    def regions(self) -> list[P.MemRegion]:
        """The ``nregions`` regions the RAM is shared as (slices of the memfd at their own offset)."""
        out = []
        for i in range(self.nregions):
            start = i * self.region_size
            out.append(P.MemRegion(self.gpa_base + start, self._end(i) - start, self.uva_base + start, start))
        return out

    def close(self) -> None:
        self.buf = None  # type: ignore[assignment]
        try:
            self.mm.close()
        except BufferError:
            log.warning("guest RAM still has views; left mapped")
        os.close(self.fd)
