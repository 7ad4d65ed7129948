"""Guest memory: region mapping, GPA/UVA translation (Python and compiled), generations, rejection, unmapping."""

from __future__ import annotations

import gc
import logging
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyvhost import memory
from pyvhost.jit import helper
from pyvhost.memory import SPACE_GPA, SPACE_UVA, GuestMemory, MemoryError_, translate
from pyvhost.protocol import ADDR_LIMIT, MemRegion

try:
    from .conftest import mapping_count
except ImportError:  # tests/ not a package
    from conftest import mapping_count

KiB = 1 << 10

# Several regions, GPA != UVA, different sort orders in the two spaces, non-zero (and non-page-aligned)
# mmap offsets, two regions adjacent in GPA (a range crossing them must still be refused), one ending
# exactly at ADDR_LIMIT in both spaces.
LAYOUT = [
    # guest_phys_addr,              size,       userspace_addr,               mmap_offset
    (0x1000_0000, 12 * KiB, 0x7F00_0000_0000, 0x1008),
    (0x1000_0000 + 12 * KiB, 8 * KiB, 0x1000, 0x10000),
    (0x3_0000_0000_0000, 64 * KiB, 0x3FFF_FFF0_0000, 8),
    (ADDR_LIMIT - 16 * KiB, 16 * KiB, ADDR_LIMIT - 16 * KiB, 0x2000),
]


def make_fd(size: int, name: str = "pyvhost-test") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def regions_and_fds(layout=LAYOUT, name: str = "pyvhost-test"):
    regions, fds = [], []
    for gpa, size, uva, off in layout:
        regions.append(MemRegion(gpa, size, uva, off))
        fds.append(make_fd(off + size, name))
    return regions, fds


def reference(regions: list[MemRegion], offsets: list[int], space: int, addr: int, length: int):
    """Brute force: (arena offset, bytes to the region's end) of [addr, addr+length) if whole in one region."""
    if addr < 0 or length < 0:
        return None
    for r, base in zip(regions, offsets):
        start = r.guest_phys_addr if space == SPACE_GPA else r.userspace_addr
        if start <= addr < start + r.memory_size and addr + length <= start + r.memory_size:
            return base + (addr - start), start + r.memory_size - addr
    return None


@helper
def compiled_translate(table, space, addr, length):
    return translate(table, space, addr, length)


class Mapped:
    def __init__(self) -> None:
        self.regions, self.fds = regions_and_fds()
        self.mem = GuestMemory()
        self.mem.set_table(self.regions, self.fds)
        by_desc = {m.desc: m.offset for m in self.mem.regions}
        self.offsets = [by_desc[r] for r in self.regions]

    def close(self) -> None:
        self.mem.close()
        for fd in self.fds:
            os.close(fd)


@pytest.fixture(scope="module")
def mapped():
    m = Mapped()
    yield m
    m.close()


def _boundaries(space: int) -> list[int]:
    out = [0, 1, ADDR_LIMIT - 1, ADDR_LIMIT, ADDR_LIMIT + 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
    for gpa, size, uva, _ in LAYOUT:
        start = gpa if space == SPACE_GPA else uva
        for b in (start, start + size):
            out += [b - 8, b - 1, b, b + 1, b + 8]
    return out


def addresses(space: int):
    near = st.tuples(st.sampled_from(_boundaries(space)), st.integers(-64, 64)).map(lambda t: max(0, t[0] + t[1]))
    inside = st.sampled_from(LAYOUT).flatmap(
        lambda r: st.integers(0, r[1]).map(lambda o, r=r: (r[0] if space == SPACE_GPA else r[2]) + o)
    )
    return st.one_of(near, inside, st.integers(0, (1 << 64) - 1), st.integers(1 << 62, (1 << 64) - 1))


lengths = st.one_of(
    st.integers(0, 64),
    st.sampled_from([8 * KiB - 1, 8 * KiB, 8 * KiB + 1, 12 * KiB, 16 * KiB, 64 * KiB, 64 * KiB + 1]),
    st.integers(0, 1 << 17),
    st.integers(0, (1 << 64) - 1),
    st.sampled_from([ADDR_LIMIT - 1, ADDR_LIMIT, (1 << 63) - 1]),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), space=st.sampled_from([SPACE_GPA, SPACE_UVA]))
def test_translate_matches_reference(mapped, data, space):
    addr = data.draw(addresses(space), label="addr")
    length = data.draw(lengths, label="length")
    mem = mapped.mem
    ref = reference(mapped.regions, mapped.offsets, space, addr, length)
    event("inside one region" if ref is not None else "outside")
    got = mem.translate(space, addr, length)
    assert got == (None if ref is None else ref[0])
    v = mem.view(space, addr, length)
    if got is None:
        assert v is None
    else:
        assert v is not None and v.shape == (length,)
        if length:  # NumPy gives empty slices no meaningful data pointer
            assert v.ctypes.data == mem.arena.base + got
    # The compiled twin is documented for values below ADDR_LIMIT; it must stay right up to int64 as well.
    if addr < (1 << 63) and length < (1 << 63):
        off, room = compiled_translate(mem.table, space, np.int64(addr), np.int64(length))
        if addr < ADDR_LIMIT and length < ADDR_LIMIT and ref is not None:
            assert (off, room) == ref
        else:
            assert (off, room) == (-1, 0)


def test_crossing_adjacent_regions_is_refused(mapped):
    """Regions 0 and 1 are adjacent in GPA: a range crossing the seam lies in no single region."""
    gpa0, size0 = LAYOUT[0][0], LAYOUT[0][1]
    mem = mapped.mem
    assert mem.translate(SPACE_GPA, gpa0 + size0 - 8, 8) is not None
    assert mem.translate(SPACE_GPA, gpa0 + size0, 8) is not None
    assert mem.translate(SPACE_GPA, gpa0 + size0 - 8, 9) is None
    assert compiled_translate(mem.table, SPACE_GPA, gpa0 + size0 - 8, 9) == (-1, 0)
    # the region ending at ADDR_LIMIT: its last byte translates, one past does not
    last = ADDR_LIMIT - 1
    assert mem.translate(SPACE_GPA, last, 1) is not None
    assert mem.translate(SPACE_GPA, last, 2) is None
    assert compiled_translate(mem.table, SPACE_GPA, last, 1)[1] == 1


def test_view_writes_reach_the_fd(mapped):
    mem = mapped.mem
    for r, fd in zip(mapped.regions, mapped.fds):
        for space, start in ((SPACE_GPA, r.guest_phys_addr), (SPACE_UVA, r.userspace_addr)):
            for where in (0, r.memory_size // 2, r.memory_size - 16):
                payload = os.urandom(16)
                v = mem.view(space, start + where, 16)
                assert v is not None
                v[:] = np.frombuffer(payload, np.uint8)
                assert os.pread(fd, 16, r.mmap_offset + where) == payload
                # and the other way: the fd's bytes are what the view shows (shared mapping)
                back = os.urandom(16)
                os.pwrite(fd, back, r.mmap_offset + where)
                assert bytes(v) == back
                del v
        # the byte before the region in the file is not part of it
        first = mem.view(SPACE_GPA, r.guest_phys_addr, 1)
        os.pwrite(fd, b"\xaa", r.mmap_offset - 1)
        first[0] = 0x55
        assert os.pread(fd, 1, r.mmap_offset - 1) == b"\xaa"
        del first


def test_generation_bumps():
    fds = []
    mem = GuestMemory(arena_size=1 << 30)
    try:
        g = mem.generation
        regions, fds = regions_and_fds(LAYOUT[:2])
        old = mem.set_table(regions, fds)
        assert old == [] and mem.generation == g + 1 and mem.nregions == 2
        extra = MemRegion(0x2000_0000, 4 * KiB, 0x5000_0000, 0)
        fds.append(make_fd(4 * KiB))
        mem.add_region(extra, fds[-1])
        assert mem.generation == g + 2 and mem.nregions == 3
        assert mem.translate(SPACE_GPA, 0x2000_0000, 4 * KiB) is not None
        removed = mem.remove_region(extra)
        assert mem.generation == g + 3 and mem.nregions == 2
        assert removed.desc == extra
        assert mem.translate(SPACE_GPA, 0x2000_0000, 1) is None
        mem.unmap(removed)
        assert mem.generation == g + 3  # unmapping is not a table change
        with pytest.raises(MemoryError_):
            mem.remove_region(extra)
        assert mem.generation == g + 3
        old = mem.set_table(regions, fds[:2])
        assert [r.desc for r in old] == regions and mem.generation == g + 4
        for r in old:
            mem.unmap(r)
        for r in mem.clear():
            mem.unmap(r)
        assert mem.generation == g + 5 and mem.nregions == 0
        assert mem.translate(SPACE_GPA, regions[0].guest_phys_addr, 1) is None
        assert compiled_translate(mem.table, SPACE_GPA, regions[0].guest_phys_addr, 1) == (-1, 0)
    finally:
        mem.close()
        for fd in fds:
            os.close(fd)


def test_remove_unknown_region():
    mem = GuestMemory(arena_size=1 << 30)
    regions, fds = regions_and_fds(LAYOUT[:1])
    try:
        mem.set_table(regions, fds)
        g = mem.generation
        r = regions[0]
        for bad in (
            MemRegion(r.guest_phys_addr + 8, r.memory_size, r.userspace_addr, r.mmap_offset),
            MemRegion(r.guest_phys_addr, r.memory_size - 8, r.userspace_addr, r.mmap_offset),
            MemRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr + 8, r.mmap_offset),
            MemRegion(0x9000_0000, 4096, 0x9000_0000, 0),
        ):
            with pytest.raises(MemoryError_):
                mem.remove_region(bad)
        assert mem.generation == g and mem.nregions == 1
    finally:
        mem.close()
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("how", ["set_table", "add_region"])
@pytest.mark.parametrize("space", ["gpa", "uva", "both"])
def test_overlapping_regions_rejected(how, space):
    base = MemRegion(0x1000_0000, 64 * KiB, 0x7000_0000, 0)
    gpa = base.guest_phys_addr + 32 * KiB if space in ("gpa", "both") else 0x2000_0000
    uva = base.userspace_addr + 60 * KiB if space in ("uva", "both") else 0x8000_0000
    other = MemRegion(gpa, 64 * KiB, uva, 0)
    fds = [make_fd(64 * KiB), make_fd(64 * KiB)]
    mem = GuestMemory(arena_size=1 << 30)
    try:
        if how == "set_table":
            mem.set_table([base], [fds[0]])
            g, placements = mem.generation, dict(mem.arena.placements)
            with pytest.raises(MemoryError_, match="overlap"):
                mem.set_table([base, other], fds)
        else:
            mem.set_table([base], [fds[0]])
            g, placements = mem.generation, dict(mem.arena.placements)
            with pytest.raises(MemoryError_, match="overlap"):
                mem.add_region(other, fds[1])
        # nothing changed, nothing new stays mapped
        assert mem.generation == g and [r.desc for r in mem.regions] == [base]
        assert mem.arena.placements == placements
    finally:
        mem.close()
        for fd in fds:
            os.close(fd)


def test_non_regular_fds_rejected():
    r = MemRegion(0x1000_0000, 4096, 0x7000_0000, 0)
    mem = GuestMemory(arena_size=1 << 30)
    rfd, wfd = os.pipe()
    small = make_fd(4096)
    try:
        with pytest.raises(MemoryError_, match="not a regular file"):
            mem.set_table([r], [rfd])
        with pytest.raises(MemoryError_, match="not a regular file"):
            mem.add_region(r, wfd)
        # a regular fd too small for mmap_offset + size
        with pytest.raises(MemoryError_, match="bytes"):
            mem.add_region(MemRegion(0x1000_0000, 4096, 0x7000_0000, 8), small)
        # a closed fd
        with pytest.raises(MemoryError_):
            mem.add_region(r, 1_000_000)
        assert mem.nregions == 0 and mem.arena.placements == {}
    finally:
        mem.close()
        for fd in (rfd, wfd, small):
            os.close(fd)


@pytest.mark.parametrize(
    "bad",
    [
        MemRegion(0x1000_0000, 0, 0x7000_0000, 0),  # empty
        MemRegion(0x1000_0004, 4096, 0x7000_0000, 0),  # misaligned
        MemRegion(ADDR_LIMIT, 4096, 0x7000_0000, 0),  # gpa out of range
        MemRegion(0x1000_0000, 4096, 1 << 63, 0),  # uva out of range
    ],
)
def test_bad_region_values_rejected(bad):
    fd = make_fd(8192)
    mem = GuestMemory(arena_size=1 << 30)
    try:
        with pytest.raises(MemoryError_):
            mem.add_region(bad, fd)
        assert mem.nregions == 0
    finally:
        mem.close()
        os.close(fd)


def test_close_leaves_no_mapping():
    gc.collect()
    baseline = mapping_count()
    regions, fds = regions_and_fds(name=CLOSE_NAME)
    mem = GuestMemory()
    mem.set_table(regions, fds)
    extra = MemRegion(0x2000_0000, 4 * KiB, 0x5000_0000, 0)
    fds.append(make_fd(4 * KiB, CLOSE_NAME))
    mem.add_region(extra, fds[-1])
    old = mem.set_table(regions, fds[:-1])  # the replaced mappings stay until unmapped
    assert mapping_count() > baseline
    for r in old:
        mem.unmap(r)
    v = mem.view(SPACE_GPA, regions[0].guest_phys_addr, 64)
    v[:] = 1
    del v
    lo, hi = mem.arena.base, mem.arena.base + mem.arena.size
    assert arena_mappings(lo, hi)
    mem.close()
    for fd in fds:
        os.close(fd)
    gc.collect()
    assert arena_mappings(lo, hi) == []
    assert mapping_count() == baseline


CLOSE_NAME = "pyvhost-test-close"


def arena_mappings(lo: int, hi: int) -> list[str]:
    """Lines of /proc/self/maps inside [lo, hi) or mapping one of the close test's memfds."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if (start < hi and end > lo) or f"memfd:{CLOSE_NAME} " in line:
                out.append(line.strip())
    return out


def test_failed_unmap_keeps_the_placement_reserved(monkeypatch, caplog):
    """An unmap that fails leaves the region's mapping in place: the placement is kept (and marked stuck, with
    a logged error), so the next region is never placed over it; once an unmap succeeds it is free again."""
    caplog.set_level(logging.ERROR, logger="pyvhost")
    region = MemRegion(0x1000_0000, 64 * KiB, 0x7000_0000, 0)
    other = MemRegion(0x2000_0000, 64 * KiB, 0x8000_0000, 0)
    fd, fd2 = make_fd(64 * KiB), make_fd(64 * KiB)
    os.pwrite(fd, b"\x5a" * 64, 0)
    mem = GuestMemory(arena_size=1 << 30)
    try:
        mem.add_region(region, fd)
        r = mem.remove_region(region)
        real = memory._reserve
        monkeypatch.setattr(memory, "_reserve", lambda addr, length: False)  # the kernel refuses (e.g. ENOMEM)
        assert mem.unmap(r) is False
        assert any("failed" in m.getMessage() and "stays" in m.getMessage() for m in caplog.records)
        assert r.offset in mem.arena.placements and r.offset in mem.arena.stuck
        assert bytes(mem.arena.view[r.offset : r.offset + 64]) == b"\x5a" * 64  # still the old file, still mapped
        monkeypatch.setattr(memory, "_reserve", real)
        mem.add_region(other, fd2)
        placed = mem.regions[0].offset
        assert not (r.offset <= placed < r.offset + mem.arena.placements[r.offset])  # not over the stuck one
        assert mem.arena.release(r.offset) is True  # a later unmap that works frees it
        assert r.offset not in mem.arena.placements and not mem.arena.stuck
    finally:
        mem.close()
        os.close(fd)
        os.close(fd2)


def test_closing_an_arena_with_live_views_is_reported_and_unmapped_when_they_die(caplog):
    """Arena.close with a view still alive cannot unmap (BufferError): it logs an error, counts the arena in
    pending_arenas(), and the reservation goes away when the last view dies -- never silently kept."""
    caplog.set_level(logging.INFO, logger="pyvhost")
    gc.collect()
    pending = memory.pending_arenas()
    arena = memory.Arena(64 << 20)
    lo, hi = arena.base, arena.base + arena.size
    view = arena.view[:16]
    arena.close()
    assert memory.pending_arenas() == pending + 1
    assert any("views still alive" in m.getMessage() and m.levelno == logging.ERROR for m in caplog.records)
    assert arena_mappings(lo, hi)
    del view
    gc.collect()
    assert memory.pending_arenas() == pending
    assert arena_mappings(lo, hi) == []
    assert any("last view was released" in m.getMessage() for m in caplog.records)
