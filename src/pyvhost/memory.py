"""Guest memory: the regions a front-end shares, their mappings, and address translation.

A region is mmapped from its fd (checked to be a regular file or memfd of sufficient size) and exposed as a
NumPy uint8 view.  Two address spaces translate to (region, offset): guest-physical addresses (descriptor
buffers) and front-end virtual addresses (ring addresses in SET_VRING_ADDR).  Translation is a binary search in
a sorted table, O(log n) in the region count, done both in Python (validation) and in compiled code
(``translate``) over the same table.  Every change bumps ``generation``.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import os
import stat
from dataclasses import dataclass

import numpy as np
from numba import njit, types
from numba.typed import List

from .protocol import ADDR_LIMIT, MAX_MEM_SLOTS, MemRegion

log = logging.getLogger(__name__)

#: Address spaces of the translation table (first index of ``table``).
SPACE_GPA = 0
SPACE_UVA = 1

U8_ARRAY = types.Array(types.uint8, 1, "C")


class MemoryError_(Exception):
    """A region that cannot be accepted (bad fd, size, overlap, address)."""


@dataclass
class MappedRegion:
    desc: MemRegion
    mm: mmap.mmap
    view: np.ndarray  # uint8, exactly desc.memory_size bytes starting at the region's guest address

    @property
    def gpa_end(self) -> int:
        return self.desc.guest_phys_addr + self.desc.memory_size

    @property
    def uva_end(self) -> int:
        return self.desc.userspace_addr + self.desc.memory_size


def _check_fd(fd: int, need: int) -> None:
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise MemoryError_(f"region fd {fd}: {e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise MemoryError_(f"region fd {fd} is not a regular file or memfd (mode {stat.filemode(st.st_mode)})")
    if st.st_size < need:
        raise MemoryError_(f"region fd {fd} has {st.st_size} bytes, the region needs {need}")


def map_region(region: MemRegion, fd: int) -> MappedRegion:
    """mmap one region from its fd; the fd itself is not kept (the mapping holds the memory)."""
    size, off = region.memory_size, region.mmap_offset
    for name, v in (("guest_phys_addr", region.guest_phys_addr), ("userspace_addr", region.userspace_addr),
                    ("memory_size", size), ("mmap_offset", off)):
        if v >= ADDR_LIMIT:
            raise MemoryError_(f"region {name} {v:#x} out of range")
    if size == 0:
        raise MemoryError_("region of size 0")
    _check_fd(fd, off + size)
    try:
        mm = mmap.mmap(fd, off + size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError) as e:
        raise MemoryError_(f"mmap of region fd {fd} ({off + size} bytes) failed: {e}") from e
    view = np.frombuffer(mm, dtype=np.uint8, count=size, offset=off)
    return MappedRegion(region, mm, view)


def unmap_region(r: MappedRegion) -> None:
    """Release a mapping.  Every view of it must be gone first (invariant: no stale view)."""
    r.view = None  # type: ignore[assignment]
    try:
        r.mm.close()
    except BufferError:
        # A view outlived its generation: that is a bug in the caller, never a reason to unmap under it.
        log.error("mapping of region gpa=%#x still has views; it stays mapped until they are released",
                  r.desc.guest_phys_addr)


class GuestMemory:
    """The current memory table of one connection."""

    def __init__(self) -> None:
        self.regions: list[MappedRegion] = []
        self.generation = 0
        self._rebuild()

    # -- changes ---------------------------------------------------------------------------------------
    def set_table(self, regions: list[MemRegion], fds: list[int]) -> list[MappedRegion]:
        """Map a whole new table; on success return the old regions (the caller unmaps them after it has
        dropped every view).  On failure nothing changes and nothing new stays mapped."""
        new: list[MappedRegion] = []
        try:
            for reg, fd in zip(regions, fds):
                new.append(map_region(reg, fd))
            self._check_overlaps(new)
        except Exception:
            for r in new:
                unmap_region(r)
            raise
        old, self.regions = self.regions, new
        self._rebuild()
        return old

    def add_region(self, region: MemRegion, fd: int) -> None:
        if len(self.regions) >= MAX_MEM_SLOTS:
            raise MemoryError_(f"already {len(self.regions)} regions, at most {MAX_MEM_SLOTS}")
        r = map_region(region, fd)
        try:
            self._check_overlaps(self.regions + [r])
        except Exception:
            unmap_region(r)
            raise
        self.regions.append(r)
        self._rebuild()

    def remove_region(self, region: MemRegion) -> MappedRegion:
        """Remove the region matching gpa/size/uva; returns it for the caller to unmap after dropping views."""
        for i, r in enumerate(self.regions):
            d = r.desc
            if (d.guest_phys_addr, d.memory_size, d.userspace_addr) == (
                    region.guest_phys_addr, region.memory_size, region.userspace_addr):
                del self.regions[i]
                self._rebuild()
                return r
        raise MemoryError_(f"REM_MEM_REG: no region at gpa={region.guest_phys_addr:#x} size={region.memory_size:#x}")

    def clear(self) -> list[MappedRegion]:
        old, self.regions = self.regions, []
        self._rebuild()
        return old

    @staticmethod
    def _check_overlaps(regions: list[MappedRegion]) -> None:
        for key, end in ((lambda r: r.desc.guest_phys_addr, lambda r: r.gpa_end),
                         (lambda r: r.desc.userspace_addr, lambda r: r.uva_end)):
            srt = sorted(regions, key=key)
            for a, b in zip(srt, srt[1:]):
                if end(a) > key(b):
                    raise MemoryError_(f"regions overlap at {key(b):#x}")

    def _rebuild(self) -> None:
        """Recompute the sorted translation tables and the compiled-code region list; bump the generation."""
        n = len(self.regions)
        table = np.zeros((2, max(n, 1), 3), dtype=np.int64)
        table[:, :, 0] = ADDR_LIMIT  # an empty table translates nothing
        for space, key in ((SPACE_GPA, lambda i: self.regions[i].desc.guest_phys_addr),
                           (SPACE_UVA, lambda i: self.regions[i].desc.userspace_addr)):
            for row, i in enumerate(sorted(range(n), key=key)):
                table[space, row] = (key(i), self.regions[i].desc.memory_size, i)
        self.table = table
        self.nregions = n
        self._starts = [list(table[s, :n, 0]) for s in (SPACE_GPA, SPACE_UVA)]
        views = List.empty_list(U8_ARRAY)
        for r in self.regions:
            views.append(r.view)
        if n == 0:
            views.append(np.zeros(8, dtype=np.uint8))  # keeps the list typed; never reachable by translate
        self.views = views
        self.generation += 1

    # -- translation (Python side) ----------------------------------------------------------------------
    def translate(self, space: int, addr: int, length: int) -> tuple[int, int] | None:
        """(region index, offset) of [addr, addr+length) if it lies whole in one region, else None."""
        if addr < 0 or length < 0 or addr >= ADDR_LIMIT or length >= ADDR_LIMIT:
            return None
        starts = self._starts[space]
        row = bisect.bisect_right(starts, addr) - 1
        if row < 0:
            return None
        start, size, idx = (int(x) for x in self.table[space, row])
        off = addr - start
        if off >= size or length > size - off:
            return None
        return idx, off

    def close(self) -> None:
        for r in self.clear():
            unmap_region(r)


@njit(inline="always")
def translate(table: np.ndarray, space: int, addr: np.int64, length: np.int64) -> tuple[np.int64, np.int64]:
    """Compiled twin of GuestMemory.translate: (region, offset) or (-1, 0).  ``addr`` and ``length`` must
    already be below ADDR_LIMIT (callers check values read from the guest before calling)."""
    lo = 0
    hi = table.shape[1]
    while lo < hi:
        mid = (lo + hi) >> 1
        if table[space, mid, 0] <= addr:
            lo = mid + 1
        else:
            hi = mid
    row = lo - 1
    if row < 0:
        return np.int64(-1), np.int64(0)
    off = addr - table[space, row, 0]
    size = table[space, row, 1]
    if off >= size or length > size - off:
        return np.int64(-1), np.int64(0)
    return table[space, row, 2], off
