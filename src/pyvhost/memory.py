"""Guest memory: the regions a front-end shares, their mappings, and address translation.

A region is mmapped from its fd (checked to be a regular file or memfd of sufficient size) and exposed as a
NumPy uint8 view.  Two address spaces translate to (region, offset): guest-physical addresses (descriptor
buffers) and front-end virtual addresses (ring addresses in SET_VRING_ADDR).  Translation is a binary search in
a sorted table, O(log n) in the region count, done both in Python (validation) and in compiled code
(``translate``) over the same table.  Every change bumps ``generation``.

The table has one sorted list of rows (start, size, arena offset) per *space*: buffer and ring addresses for
reads (``SPACE_GPA``, ``SPACE_UVA``) and for writes (``SPACE_GPA_W``, ``SPACE_UVA_W``), and the reverse map
``SPACE_ARENA`` (arena offset -> guest-physical address) by which a write is logged in the dirty log, whatever
address space it was reached through.  Without an IOMMU the write spaces are the read ones.  Once the front-end
plays a vIOMMU (``VIRTIO_F_ACCESS_PLATFORM``) ring and buffer addresses are IOVAs: :meth:`GuestMemory.set_iova_map`
composes the IOTLB's entries with the regions, so that the read spaces hold what is mapped readable and the write
spaces what is mapped writable -- the compiled datapath checks permissions by the space it translates in, at no
extra cost per access.
"""

from __future__ import annotations

import bisect
import ctypes
import fcntl
import logging
import mmap
import os
import stat
import weakref
from dataclasses import dataclass

import numpy as np

from . import sigbus
from .jit import helper
from .protocol import ADDR_LIMIT, MAX_MEM_SLOTS, MemRegion

log = logging.getLogger(__name__)

#: Address spaces of the translation table (first index of ``table``).
SPACE_GPA = 0  # buffer addresses, for reading (guest-physical; IOVAs behind a vIOMMU)
SPACE_UVA = 1  # ring addresses, for reading (front-end virtual; IOVAs behind a vIOMMU)
SPACE_GPA_W = 2  # buffer addresses, for writing
SPACE_UVA_W = 3  # ring addresses, for writing
SPACE_ARENA = 4  # arena offset -> guest-physical address (the dirty log's map)
NSPACES = 5
#: ``VHOST_ACCESS_*`` bits (protocol) an IOVA mapping needs for the read and the write spaces.
_ACCESS_READ, _ACCESS_WRITE = 1, 2


class MemoryError_(Exception):
    """A region that cannot be accepted (bad fd, size, overlap, address)."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10  # Linux <sys/mman.h>; the mmap module exports neither of these two
_MAP_NORESERVE = 0x4000
_PROT_NONE = 0
PAGE = mmap.PAGESIZE
#: Alignment of region placements inside the arena (covers 2 MiB huge pages; larger blksize is honoured).
ARENA_ALIGN = 2 << 20
#: Virtual address space reserved per connection for its regions (PROT_NONE, not backed, not accounted).
ARENA_SIZE = 1 << 40

#: Closed arenas whose mapping waits for its last exported view to die (see :meth:`Arena.close`).
_pending_arenas: set[int] = set()


def pending_arenas() -> int:
    """How many closed arenas are still mapped because views into them are alive."""
    return len(_pending_arenas)


def _arena_released(base: int, size: int) -> None:
    _pending_arenas.discard(base)
    log.info("arena at %#x (%d MiB) unmapped: its last view was released", base, size >> 20)


def _reserve(addr: int, length: int) -> bool:
    """Replace [addr, addr+length) by PROT_NONE reserved space (dropping whatever was mapped there)."""
    got = _libc.mmap(
        addr, length, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED, -1, 0
    )
    return got == addr


class Arena:
    """One reserved stretch of virtual address space into which every region is mapped (MAP_FIXED).

    Compiled code then reaches all of guest memory through one NumPy uint8 array and translation yields an
    offset into it -- the user-space analogue of vhost's vmap() of the rings.  Space between regions stays
    PROT_NONE, so only a translated, bounds-checked offset is ever a valid place to touch.
    """

    def __init__(self, size: int = ARENA_SIZE, notify_fd: int = -1) -> None:
        self.size = size
        # Created writable (so NumPy views are writable), then made PROT_NONE until regions are placed.
        self.mm = mmap.mmap(
            -1,
            size,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        self.view = np.frombuffer(self.mm, dtype=np.uint8)
        self.base = self.view.ctypes.data
        if _libc.mprotect(ctypes.c_void_p(self.base), ctypes.c_size_t(size), _PROT_NONE) != 0:
            raise MemoryError_(f"mprotect of the arena failed: {os.strerror(ctypes.get_errno())}")
        self.placements: dict[int, int] = {}  # offset -> length of each mapped stretch
        #: placements whose unmap failed: still mapped, kept reserved so that nothing is placed over them
        self.stuck: set[int] = set()
        #: the SIGBUS guard's slot for this arena (a truncated region file faults in here, see sigbus.py);
        #: given back by close(), or when the arena is collected unclosed
        self.guard = sigbus.guard(self.base, size, notify_fd)
        self._unguard = weakref.finalize(self, sigbus.unguard, self.guard)

    def bus_faults(self) -> tuple[int, int]:
        """(SIGBUS faults recovered in this arena, arena offset of the first, or -1)."""
        if self.guard < 0:
            return 0, -1
        n, first = sigbus.faults(self.guard)
        return n, (first - self.base if n else -1)

    def _find(self, length: int, align: int) -> int:
        off = 0
        for o, n in sorted(self.placements.items()):
            if o - off >= length:
                return off
            off = -(-(o + n) // align) * align
        if off + length > self.size:
            raise MemoryError_(f"no room for {length} bytes in the {self.size >> 30} GiB arena")
        return off

    def place(self, fd: int, file_offset: int, length: int, align: int) -> int:
        """Map [file_offset, file_offset+length) of ``fd``; return the arena offset of its first byte."""
        if self.view is None:
            raise MemoryError_("the arena is closed")  # never MAP_FIXED into address space we gave back
        align = max(align, ARENA_ALIGN)
        foff = file_offset - file_offset % PAGE
        delta = file_offset - foff
        maplen = -(-(length + delta) // PAGE) * PAGE
        off = self._find(maplen, align)
        addr = _libc.mmap(
            self.base + off, maplen, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED, fd, foff
        )
        if addr == _MAP_FAILED or addr != self.base + off:
            err = ctypes.get_errno()
            raise MemoryError_(f"mmap of fd {fd} ({maplen} bytes at file offset {foff}) failed: {os.strerror(err)}")
        self.placements[off] = maplen
        return off + delta

    def release(self, data_off: int) -> bool:
        """Unmap the stretch holding ``data_off``, leaving PROT_NONE reserved space; False if that failed, in
        which case the stretch stays mapped and stays placed (in ``stuck``), so it is never reused."""
        for off, n in self.placements.items():
            if off <= data_off < off + n:
                if not _reserve(self.base + off, n):
                    err = ctypes.get_errno()
                    self.stuck.add(off)
                    log.error(
                        "unmapping %d bytes at arena offset %#x failed (%s): the old mapping stays, "
                        "reserved, and nothing is placed there again",
                        n,
                        off,
                        os.strerror(err),
                    )
                    return False
                del self.placements[off]
                self.stuck.discard(off)
                return True
        return True

    def close(self) -> None:
        """Give the address space back.  If views into it are still alive (a bug elsewhere), it cannot be
        unmapped now: that is logged, counted in :func:`pending_arenas`, and the mapping goes when the last
        view dies (the mmap object's own release)."""
        self._unguard()
        self.guard = -1
        self.view = None  # type: ignore[assignment]
        mm, self.mm = self.mm, None  # type: ignore[assignment]
        if mm is None:
            return
        try:
            mm.close()
        except BufferError:
            _pending_arenas.add(self.base)
            weakref.finalize(mm, _arena_released, self.base, self.size)
            if self.stuck:
                log.error("arena at %#x: %d placement(s) could not be unmapped", self.base, len(self.stuck))
            log.error(
                "arena at %#x closed with views still alive: it stays mapped (%d such arena(s)) until the "
                "last view is released",
                self.base,
                len(_pending_arenas),
            )


@dataclass
class MappedRegion:
    desc: MemRegion
    offset: int  # arena offset of the region's first byte
    view: np.ndarray  # uint8 view of exactly memory_size bytes

    @property
    def gpa_end(self) -> int:
        return self.desc.guest_phys_addr + self.desc.memory_size

    @property
    def uva_end(self) -> int:
        return self.desc.userspace_addr + self.desc.memory_size


def _check_fd(fd: int, need: int) -> int:
    """Check ``fd`` can back a region of ``need`` bytes; return its block size (mapping alignment)."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise MemoryError_(f"region fd {fd}: {e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise MemoryError_(f"region fd {fd} is not a regular file or memfd (mode {stat.filemode(st.st_mode)})")
    if st.st_size < need:
        raise MemoryError_(f"region fd {fd} has {st.st_size} bytes, the region needs {need}")
    return st.st_blksize


def sealed_against_shrinking(fd: int) -> bool:
    """Whether the file behind ``fd`` is a memfd sealed with F_SEAL_SHRINK (as QEMU's memory-backend-memfd
    seals guest RAM by default).  Any other file can be truncated by the front-end under our mapping; an
    access to a truncated page then raises SIGBUS, which the guard (sigbus.py) turns into a broken connection."""
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK)
    except OSError:  # not a memfd/shmem file: no seals
        return False


def map_region(arena: Arena, region: MemRegion, fd: int) -> MappedRegion:
    """Map one region from its fd into the arena; the fd itself is not kept (the mapping holds the file)."""
    size, off = region.memory_size, region.mmap_offset
    for name, v in (
        ("guest_phys_addr", region.guest_phys_addr),
        ("userspace_addr", region.userspace_addr),
        ("memory_size", size),
        ("mmap_offset", off),
    ):
        if v >= ADDR_LIMIT:
            raise MemoryError_(f"region {name} {v:#x} out of range")
    if size == 0:
        raise MemoryError_("region of size 0")
    if region.userspace_addr % 8 or region.guest_phys_addr % 8 or off % 8:
        raise MemoryError_(f"region addresses/offset not 8-byte aligned: {region}")
    blksize = _check_fd(fd, off + size)
    start = arena.place(fd, off, size, blksize)
    return MappedRegion(region, start, arena.view[start : start + size])


def unmap_region(arena: Arena, r: MappedRegion) -> bool:
    """Release a region's mapping (False if the unmap failed: logged, the stretch stays reserved).  Every
    worker using it must have been stopped first (no stale view)."""
    r.view = None  # type: ignore[assignment]
    return arena.release(r.offset)


class GuestMemory:
    """The current memory table of one connection, mapped into its own arena."""

    def __init__(self, arena_size: int = ARENA_SIZE, notify_fd: int = -1) -> None:
        self.arena = Arena(arena_size, notify_fd)
        self.regions: list[MappedRegion] = []
        #: the IOTLB's entries (iova, size, uaddr, perm) sorted by IOVA, or None: no vIOMMU (see set_iova_map)
        self.iova_map: list[tuple[int, int, int, int]] | None = None
        self.generation = 0
        self.warned_unsealed = False
        self._rebuild()

    def _check_seals(self, fds: list[int]) -> None:
        """Warn (once per connection) about region files the front-end could truncate under us."""
        unsealed = [fd for fd in fds if not sealed_against_shrinking(fd)]
        if unsealed and not self.warned_unsealed:
            self.warned_unsealed = True
            log.warning(
                "%d region fd(s) not sealed against shrinking (F_SEAL_SHRINK): a front-end that truncates "
                "its memory file makes the next access to it fault (SIGBUS) and ends its connection",
                len(unsealed),
            )

    # -- changes ---------------------------------------------------------------------------------------
    def set_table(self, regions: list[MemRegion], fds: list[int]) -> list[MappedRegion]:
        """Map a whole new table; on success return the old regions (the caller unmaps them, with
        :meth:`unmap`, after it has stopped every user).  On failure nothing changes and nothing new stays
        mapped."""
        new: list[MappedRegion] = []
        try:
            for reg, fd in zip(regions, fds):
                new.append(map_region(self.arena, reg, fd))
            self._check_overlaps(new)
        except Exception:
            for r in new:
                self.unmap(r)
            raise
        old, self.regions = self.regions, new
        self._rebuild()
        self._check_seals(fds[: len(regions)])
        return old

    def add_region(self, region: MemRegion, fd: int) -> None:
        if len(self.regions) >= MAX_MEM_SLOTS:
            raise MemoryError_(f"already {len(self.regions)} regions, at most {MAX_MEM_SLOTS}")
        r = map_region(self.arena, region, fd)
        try:
            self._check_overlaps(self.regions + [r])
        except Exception:
            self.unmap(r)
            raise
        self.regions.append(r)
        self._rebuild()
        self._check_seals([fd])

    def remove_region(self, region: MemRegion) -> MappedRegion:
        """Remove the region matching gpa/size/uva; returns it for the caller to unmap after stopping users."""
        for i, r in enumerate(self.regions):
            d = r.desc
            if (d.guest_phys_addr, d.memory_size, d.userspace_addr) == (
                region.guest_phys_addr,
                region.memory_size,
                region.userspace_addr,
            ):
                del self.regions[i]
                self._rebuild()
                return r
        raise MemoryError_(f"REM_MEM_REG: no region at gpa={region.guest_phys_addr:#x} size={region.memory_size:#x}")

    def clear(self) -> list[MappedRegion]:
        old, self.regions = self.regions, []
        self._rebuild()
        return old

    def unmap(self, r: MappedRegion) -> bool:
        return unmap_region(self.arena, r)

    def bus_fault(self) -> str | None:
        """What a SIGBUS recovered in this memory's arena hit ("region N backing file truncated ..."), or None."""
        n, off = self.arena.bus_faults()
        if not n:
            return None
        for i, r in enumerate(self.regions):
            if r.offset - PAGE < off < r.offset + r.desc.memory_size:
                where = (
                    f"region {i} backing file truncated (guest-physical {r.desc.guest_phys_addr:#x}, "
                    f"{r.desc.memory_size} bytes; first fault at byte {off - r.offset} of it"
                )
                break
        else:
            where = f"a region's backing file truncated (first fault at arena offset {off:#x}, no longer mapped"
        return f"{where}; {n} fault(s) recovered with zero pages)"

    @staticmethod
    def _check_overlaps(regions: list[MappedRegion]) -> None:
        for key, end in (
            (lambda r: r.desc.guest_phys_addr, lambda r: r.gpa_end),
            (lambda r: r.desc.userspace_addr, lambda r: r.uva_end),
        ):
            srt = sorted(regions, key=key)
            for a, b in zip(srt, srt[1:]):
                if end(a) > key(b):
                    raise MemoryError_(f"regions overlap at {key(b):#x}")

    def set_iova_map(self, entries: list[tuple[int, int, int, int]] | None) -> None:
        """Translate ring and buffer addresses as IOVAs through ``entries`` -- (iova, size, uaddr, perm) rows
        sorted by IOVA, not overlapping (an IOTLB's) -- then through the regions by front-end address; None:
        they are guest-physical and front-end addresses again.  Parts of an entry outside every region map
        nothing.  Bumps the generation (the caller has stopped every user of the old translation)."""
        self.iova_map = None if entries is None else list(entries)
        self._rebuild()

    def _rebuild(self) -> None:
        """Recompute the sorted translation tables; bump the generation."""
        by_uva = sorted((r.desc.userspace_addr, r.desc.memory_size, r.offset) for r in self.regions)
        by_gpa = sorted((r.desc.guest_phys_addr, r.desc.memory_size, r.offset) for r in self.regions)
        by_arena = sorted((r.offset, r.desc.memory_size, r.desc.guest_phys_addr) for r in self.regions)
        if self.iova_map is None:
            spaces = [by_gpa, by_uva, by_gpa, by_uva, by_arena]
        else:
            readable = _compose(self.iova_map, by_uva, _ACCESS_READ)
            writable = _compose(self.iova_map, by_uva, _ACCESS_WRITE)
            spaces = [readable, readable, writable, writable, by_arena]
        width = max(1, max(len(rows) for rows in spaces))
        table = np.zeros((NSPACES, width, 3), dtype=np.int64)
        table[:, :, 0] = ADDR_LIMIT  # rows past a space's last map nothing (an empty table translates nothing)
        for space, rows in enumerate(spaces):
            if rows:
                table[space, : len(rows)] = rows
        self.table = table
        self.nregions = len(self.regions)
        self._starts = [[row[0] for row in rows] for rows in spaces]
        self.generation += 1

    # -- translation (Python side) ----------------------------------------------------------------------
    def translate(self, space: int, addr: int, length: int) -> int | None:
        """Arena offset of [addr, addr+length) if it lies whole in one region, else None."""
        if addr < 0 or length < 0 or addr >= ADDR_LIMIT or length >= ADDR_LIMIT:
            return None
        row = bisect.bisect_right(self._starts[space], addr) - 1
        if row < 0:
            return None
        start, size, base = (int(x) for x in self.table[space, row])
        off = addr - start
        if off >= size or length > size - off:
            return None
        return base + off

    def view(self, space: int, addr: int, length: int) -> np.ndarray | None:
        """uint8 view of [addr, addr+length) if it lies whole in one region."""
        at = self.translate(space, addr, length)
        return None if at is None else self.arena.view[at : at + length]

    def close(self) -> None:
        for r in self.clear():
            self.unmap(r)
        self.arena.close()


def _compose(
    entries: list[tuple[int, int, int, int]], by_uva: list[tuple[int, int, int]], perm: int
) -> list[tuple[int, int, int]]:
    """Rows (iova, size, arena offset) of the parts of ``entries`` granting ``perm`` that lie in a region
    (``by_uva``: rows sorted by front-end address), sorted by IOVA; rows contiguous in IOVA and in the arena are
    merged (adjacent IOTLB pages of one guest buffer are usually adjacent in memory too)."""
    starts = [row[0] for row in by_uva]
    out: list[tuple[int, int, int]] = []
    for iova, size, uaddr, p in entries:
        if p & perm != perm:
            continue
        ustop = uaddr + size
        i = max(bisect.bisect_right(starts, uaddr) - 1, 0)
        while i < len(by_uva) and by_uva[i][0] < ustop:
            rstart, rsize, roff = by_uva[i]
            lo, hi = max(uaddr, rstart), min(ustop, rstart + rsize)
            if lo < hi:
                at, n, off = iova + (lo - uaddr), hi - lo, roff + (lo - rstart)
                if out and out[-1][0] + out[-1][1] == at and out[-1][2] + out[-1][1] == off:
                    out[-1] = (out[-1][0], out[-1][1] + n, out[-1][2])
                else:
                    out.append((at, n, off))
            i += 1
    return out


@helper
def translate(table: np.ndarray, space: int, addr: np.int64, length: np.int64) -> tuple[np.int64, np.int64]:
    """Compiled twin of GuestMemory.translate: (arena offset, bytes from there to the region's end), or
    (-1, 0) if [addr, addr+length) is not inside one region.  ``addr`` and ``length`` must already be below
    ADDR_LIMIT (callers check values read from the guest first)."""
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
    return table[space, row, 2] + off, size - off
