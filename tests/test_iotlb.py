"""The IOTLB (iotlb.py) and the parsing of VHOST_USER_IOTLB_MSG payloads (protocol.IotlbMsg).

The interval map is checked against a plain reference model (a list of intervals, changed by brute force)
over random sequences of UPDATE / INVALIDATE / translate with overlaps, splits, permissions, ranges near
ADDR_LIMIT and 2^64 and huge sizes; the compiled ``iotlb_translate`` is checked against the Python API on
every translation; the entry bound is checked under a storm of 100,000 updates; malformed messages are refused
with a ProtocolError naming the fault.
"""

from __future__ import annotations

import random
import re
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyvhost import protocol as P
from pyvhost.iotlb import (
    COL_END,
    COL_START,
    IOTLB_BAD,
    IOTLB_DENIED,
    IOTLB_MISS,
    IOTLB_OK,
    MAX_ENTRIES,
    Iotlb,
    IotlbEntry,
    IotlbError,
    Translation,
    iotlb_translate,
    overlaps,
)
from pyvhost.jit import kernel
from pyvhost.memory import MemoryError_
from pyvhost.protocol import (
    ADDR_LIMIT,
    IOTLB,
    VHOST_ACCESS_RO,
    VHOST_ACCESS_RW,
    VHOST_ACCESS_WO,
    VHOST_IOTLB_ACCESS_FAIL,
    VHOST_IOTLB_INVALIDATE,
    VHOST_IOTLB_MISS,
    VHOST_IOTLB_UPDATE,
    IotlbMsg,
    Message,
    ProtocolError,
)
from pyvhost.protocol import Request as R

RO, WO, RW = VHOST_ACCESS_RO, VHOST_ACCESS_WO, VHOST_ACCESS_RW
TOP = 1 << 64
PG = 0x1000


# =========================================================================================================
# the reference model: a list of (start, end, uaddr, perm) intervals, changed by brute force
class Model:
    def __init__(self) -> None:
        self.iv: list[tuple[int, int, int, int]] = []

    @staticmethod
    def valid_range(start: int, size: int) -> bool:
        return size > 0 and start >= 0 and start + size <= ADDR_LIMIT

    def cut(self, s: int, e: int) -> int:
        out, touched = [], 0
        for a, b, u, p in self.iv:
            if b <= s or e <= a:
                out.append((a, b, u, p))
                continue
            touched += 1
            if a < s:
                out.append((a, s, u, p))
            if e < b:
                out.append((e, b, u + (e - a), p))
        self.iv = out
        return touched

    def update(self, iova: int, size: int, uaddr: int, perm: int) -> bool:
        if not (self.valid_range(iova, size) and self.valid_range(uaddr, size) and perm in (RO, WO, RW)):
            return False
        self.cut(iova, iova + size)
        self.iv.append((iova, iova + size, uaddr, perm))
        return True

    def invalidate(self, iova: int, size: int) -> int | None:
        if size <= 0 or iova < 0 or iova + size > TOP:
            return None
        return self.cut(iova, iova + size)

    def entries(self) -> list[IotlbEntry]:
        return sorted(IotlbEntry(a, b - a, u, p) for a, b, u, p in self.iv)

    def translate(self, iova: int, length: int, perm: int) -> Translation:
        if length <= 0 or iova < 0 or iova + length > ADDR_LIMIT or perm not in (RO, WO, RW):
            return Translation(IOTLB_BAD, [], iova)
        segs: list[tuple[int, int]] = []
        at, end = iova, iova + length
        while at < end:
            hit = [(a, b, u, p) for a, b, u, p in self.iv if a <= at < b]
            if not hit:
                return Translation(IOTLB_MISS, segs, at)
            a, b, u, p = hit[0]
            if p & perm != perm:
                return Translation(IOTLB_DENIED, segs, at)
            n = min(b, end) - at
            ua = u + (at - a)
            if segs and sum(segs[-1]) == ua:
                segs[-1] = (segs[-1][0], segs[-1][1] + n)
            else:
                segs.append((ua, n))
            at += n
        return Translation(IOTLB_OK, segs, end)


def compiled_segments(tlb: Iotlb, iova: int, length: int, perm: int) -> Translation:
    """Translate by calling the compiled helper segment by segment, as the datapath will."""
    table = tlb.table
    segs: list[tuple[int, int]] = []
    at, end = iova, iova + length
    first = True
    while first or at < end:
        first = False
        uaddr, n = iotlb_translate(table, at, end - at, perm)
        if n < 0:
            return Translation(int(n), segs, at)
        segs.append((int(uaddr), int(n)))
        at += int(n)
    return Translation(IOTLB_OK, segs, end)


def check_translate(tlb: Iotlb, iova: int, length: int, perm: int, model: Model | None = None) -> Translation:
    got = tlb.translate(iova, length, perm)
    if -(1 << 63) <= iova < (1 << 63) and -(1 << 63) <= length < (1 << 63):  # what an int64 can carry
        assert compiled_segments(tlb, iova, length, perm) == got
    if model is not None:
        assert got == model.translate(iova, length, perm)
    assert tlb.covers(iova, length, perm) == (got.status == IOTLB_OK)
    return got


# =========================================================================================================
# unit tests of the map
def test_update_lookup_translate():
    tlb = Iotlb()
    assert len(tlb) == 0 and tlb.lookup(0) is None
    g = tlb.generation
    tlb.update(0x10000, 0x3000, 0x7F00_0000_0000, RW)
    assert tlb.generation == g + 1
    assert tlb.entries() == [IotlbEntry(0x10000, 0x3000, 0x7F00_0000_0000, RW)]
    assert tlb.lookup(0x10000) == tlb.lookup(0x12FFF) == tlb.entries()[0]
    assert tlb.lookup(0xFFFF) is None and tlb.lookup(0x13000) is None
    assert check_translate(tlb, 0x10010, 0x100, RO) == Translation(IOTLB_OK, [(0x7F00_0000_0010, 0x100)], 0x10110)
    assert check_translate(tlb, 0x12F00, 0x100, WO).status == IOTLB_OK
    assert check_translate(tlb, 0x12F00, 0x101, RO) == Translation(IOTLB_MISS, [(0x7F00_0000_2F00, 0x100)], 0x13000)
    assert check_translate(tlb, 0xFFFF, 2, RO) == Translation(IOTLB_MISS, [], 0xFFFF)


def test_permissions():
    tlb = Iotlb()
    tlb.update(0, PG, 0x100000, RO)
    tlb.update(PG, PG, 0x100000 + PG, WO)
    tlb.update(2 * PG, PG, 0x100000 + 2 * PG, RW)
    assert check_translate(tlb, 0, PG, RO).status == IOTLB_OK
    assert check_translate(tlb, 0, 8, WO) == Translation(IOTLB_DENIED, [], 0)  # a write to a read-only page
    assert check_translate(tlb, PG, 8, RO) == Translation(IOTLB_DENIED, [], PG)  # a read of a write-only one
    assert check_translate(tlb, 2 * PG, PG, RW).status == IOTLB_OK
    # the write-only page stops a read crossing into it, after the readable prefix
    assert check_translate(tlb, PG - 8, 16, RO) == Translation(IOTLB_DENIED, [(0x100000 + PG - 8, 8)], PG)
    # contiguous in uaddr and writable: pages 1 and 2 merge for a write
    assert check_translate(tlb, PG, 2 * PG, WO) == Translation(IOTLB_OK, [(0x100000 + PG, 2 * PG)], 3 * PG)
    for bad in (0, 4, 7, 0xFF, -1):
        assert check_translate(tlb, 0, 8, bad).status == IOTLB_BAD


def test_translate_spanning_entries_merges_contiguous_ones():
    tlb = Iotlb()
    # IOVA pages 0..3 map to front-end pages 10, 11, 5, 6: two runs
    for i, page in enumerate((10, 11, 5, 6)):
        tlb.update(i * PG, PG, page * PG, RW)
    got = check_translate(tlb, 0x800, 4 * PG - 0x1000, RO)
    assert got == Translation(IOTLB_OK, [(10 * PG + 0x800, 2 * PG - 0x800), (5 * PG, PG + 0x800)], 0x800 + 3 * PG)
    # the compiled helper returns the merged first run in one call
    assert tuple(map(int, iotlb_translate(tlb.table, 0, 4 * PG, RO))) == (10 * PG, 2 * PG)
    assert len(tlb) == 4  # entries stay as given; only translations merge


def test_overlapping_update_newer_wins_older_pieces_kept():
    tlb = Iotlb()
    tlb.update(0x10000, 0x10000, 0x500000, RO)
    tlb.update(0x14000, 0x2000, 0x900000, RW)  # in the middle: three entries
    assert tlb.entries() == [
        IotlbEntry(0x10000, 0x4000, 0x500000, RO),
        IotlbEntry(0x14000, 0x2000, 0x900000, RW),
        IotlbEntry(0x16000, 0xA000, 0x506000, RO),
    ]
    tlb.update(0xF000, 0x2000, 0x200000, WO)  # over the left edge
    tlb.update(0x1F000, 0x3000, 0x300000, RW)  # over the right edge, past the end
    assert tlb.entries() == [
        IotlbEntry(0xF000, 0x2000, 0x200000, WO),
        IotlbEntry(0x11000, 0x3000, 0x501000, RO),
        IotlbEntry(0x14000, 0x2000, 0x900000, RW),
        IotlbEntry(0x16000, 0x9000, 0x506000, RO),
        IotlbEntry(0x1F000, 0x3000, 0x300000, RW),
    ]
    tlb.update(0x0, 0x100000, 0x0, RO)  # over everything
    assert tlb.entries() == [IotlbEntry(0, 0x100000, 0, RO)]
    tlb.update(0x0, 0x100000, 0x40000, RW)  # the same range again: replaced
    assert tlb.entries() == [IotlbEntry(0, 0x100000, 0x40000, RW)]


def test_partial_invalidate_splits():
    tlb = Iotlb()
    tlb.update(0, 0x10000, 0x100000, RW)
    tlb.update(0x20000, 0x1000, 0x200000, RO)
    g = tlb.generation
    assert tlb.invalidate(0x4000, 0x1000) == 1
    assert tlb.generation == g + 1
    assert tlb.entries() == [
        IotlbEntry(0, 0x4000, 0x100000, RW),
        IotlbEntry(0x5000, 0xB000, 0x105000, RW),
        IotlbEntry(0x20000, 0x1000, 0x200000, RO),
    ]
    assert check_translate(tlb, 0x3000, 0x2000, RO) == Translation(IOTLB_MISS, [(0x103000, 0x1000)], 0x4000)
    assert tlb.invalidate(0x8000, 0x18800) == 2  # the tail of one, the head of the next
    assert tlb.entries() == [
        IotlbEntry(0, 0x4000, 0x100000, RW),
        IotlbEntry(0x5000, 0x3000, 0x105000, RW),
        IotlbEntry(0x20800, 0x800, 0x200800, RO),
    ]
    g = tlb.generation
    assert tlb.invalidate(0x30000, 0x1000) == 0  # never mapped: no error, no change
    assert tlb.invalidate(0x4000, 0x1000) == 0  # already invalidated
    assert tlb.generation == g
    assert tlb.invalidate(0, TOP) == 3  # everything, up to 2^64
    assert len(tlb) == 0


@pytest.mark.parametrize(
    "iova, size, uaddr, perm, why",
    [
        (0x1000, 0, 0x1000, RW, "size 0"),
        (TOP - 0x1000, 0x2000, 0x1000, RW, "wraps past 2\\^64"),
        (0x1000, TOP, 0x1000, RW, "wraps past 2\\^64"),
        (ADDR_LIMIT - 0x1000, 0x2000, 0x1000, RW, "past"),
        (ADDR_LIMIT, 0x1000, 0x1000, RW, "past"),
        (0x1000, 0x1000, ADDR_LIMIT - 0x800, RW, "uaddr"),
        (0x1000, 0x1000, TOP - 0x800, RW, "uaddr"),
        (0x1000, 0x1000, 0x1000, 0, "permission 0x0"),
        (0x1000, 0x1000, 0x1000, 4, "permission 0x4"),
        (0x1000, 0x1000, 0x1000, 0xFF, "permission 0xff"),
        (-0x1000, 0x1000, 0x1000, RW, "negative"),
        (0x1000, -0x1000, 0x1000, RW, "negative"),
    ],
)
def test_update_refuses_bad_ranges_and_permissions(iova, size, uaddr, perm, why):
    tlb = Iotlb()
    tlb.update(0x1000, 0x1000, 0x9000, RO)
    before, g = tlb.entries(), tlb.generation
    with pytest.raises(IotlbError, match=why) as e:
        tlb.update(iova, size, uaddr, perm)
    assert isinstance(e.value, MemoryError_)  # the memory layer's error: handlers catch one class
    assert tlb.entries() == before and tlb.generation == g  # nothing changed


def test_ranges_up_to_addr_limit():
    tlb = Iotlb()
    tlb.update(ADDR_LIMIT - PG, PG, ADDR_LIMIT - PG, RW)  # ends exactly at ADDR_LIMIT: accepted
    assert check_translate(tlb, ADDR_LIMIT - 8, 8, RW) == Translation(IOTLB_OK, [(ADDR_LIMIT - 8, 8)], ADDR_LIMIT)
    for iova, length in ((ADDR_LIMIT - 8, 9), (ADDR_LIMIT, 1), (TOP - 1, 1), (0, TOP), (-1, 2), (0, 0), (0, -1)):
        assert check_translate(tlb, iova, length, RO).status == IOTLB_BAD
    # an invalidation reaching past ADDR_LIMIT is clipped, not refused; one wrapping past 2^64 is refused
    assert tlb.invalidate(ADDR_LIMIT - 4, TOP - ADDR_LIMIT + 4) == 1
    assert tlb.entries() == [IotlbEntry(ADDR_LIMIT - PG, PG - 4, ADDR_LIMIT - PG, RW)]
    assert tlb.invalidate(ADDR_LIMIT + PG, PG) == 0
    for iova, size, why in ((0, 0, "size 0"), (TOP - 4, 8, "wraps"), (1, TOP, "wraps"), (-4, 8, "negative")):
        with pytest.raises(IotlbError, match=why):
            tlb.invalidate(iova, size)
    assert len(tlb) == 1


def test_overlaps():
    assert overlaps(0, 10, 9, 1) and overlaps(9, 1, 0, 10) and overlaps(0, 10, 0, 10) and overlaps(2, 2, 0, 10)
    assert not overlaps(0, 10, 10, 5) and not overlaps(10, 5, 0, 10)
    assert not overlaps(0, 0, 0, 10) and not overlaps(5, 10, 7, 0)  # empty ranges overlap nothing
    assert overlaps(0, TOP, ADDR_LIMIT - 1, 1)
    assert overlaps(TOP - 1, 1, TOP - 8, 8)


def test_table_is_a_snapshot():
    tlb = Iotlb()
    empty = tlb.table
    assert empty.shape == (1, 4) and empty[0, COL_START] == empty[0, COL_END] == ADDR_LIMIT
    assert tuple(iotlb_translate(empty, 0, 1, RO)) == (0, IOTLB_MISS)
    assert tuple(iotlb_translate(empty, ADDR_LIMIT - 1, 1, RO)) == (0, IOTLB_MISS)
    tlb.update(0, PG, 0x5000, RO)
    t1 = tlb.table
    assert t1 is tlb.table  # cached until the next change
    assert not t1.flags.writeable
    with pytest.raises(ValueError):
        t1[0, 0] = 1
    tlb.invalidate(0, PG)
    t2 = tlb.table
    assert t2 is not t1
    assert tuple(iotlb_translate(t1, 0, 8, RO)) == (0x5000, 8)  # the old snapshot still says what it said
    assert tuple(iotlb_translate(t2, 0, 8, RO)) == (0, IOTLB_MISS)
    for iova, length, perm in ((0, 0, RO), (0, -1, RO), (-1, 1, RO), (ADDR_LIMIT, 1, RO), (0, 8, 0), (0, 8, 5)):
        assert tuple(iotlb_translate(t1, iova, length, perm)) == (0, IOTLB_BAD)


@kernel
def _translate_all(table, iovas, lengths, perm, out):
    """A compiled caller: translate each range segment by segment into out[i] = (segments, bytes, status)."""
    for i in range(iovas.shape[0]):
        at = iovas[i]
        left = lengths[i]
        nseg = 0
        done = 0
        status = 0
        while left > 0:
            uaddr, n = iotlb_translate(table, at, left, perm)
            if n < 0:
                status = n
                break
            nseg += 1
            done += n
            at += n
            left -= n
        out[i, 0] = nseg
        out[i, 1] = done
        out[i, 2] = status


def test_usable_from_compiled_code():
    tlb = Iotlb()
    for i, page in enumerate((10, 11, 5, 6, 7)):
        tlb.update(i * PG, PG, page * PG, RO if i == 4 else RW)
    iovas = np.array([0, 0, 3 * PG, 4 * PG, 6 * PG], dtype=np.int64)
    lengths = np.array([2 * PG, 4 * PG, 2 * PG, 8, 8], dtype=np.int64)
    out = np.zeros((5, 3), dtype=np.int64)
    _translate_all(tlb.table, iovas, lengths, RW, out)
    assert out.tolist() == [[1, 2 * PG, 0], [2, 4 * PG, 0], [1, PG, IOTLB_DENIED], [0, 0, IOTLB_DENIED], [0, 0, -1]]


# =========================================================================================================
# eviction and the bound
def test_eviction_removes_the_oldest():
    tlb = Iotlb(max_entries=3)
    for i in range(3):
        tlb.update(i * PG, PG, 0x100000 + i * PG, RW)
    tlb.update(10 * PG, PG, 0, RO)
    assert [e.iova for e in tlb.entries()] == [PG, 2 * PG, 10 * PG] and tlb.evictions == 1
    # a trimmed entry keeps its age: page 1 (now cut in half) is still the oldest
    tlb.update(PG + 0x800, 0x800, 0x900000, RO)
    assert [e.iova for e in tlb.entries()] == [PG + 0x800, 2 * PG, 10 * PG] and tlb.evictions == 2
    assert tlb.lookup(PG) is None  # the oldest (the remaining half of page 1) went
    assert tlb.lookup(PG + 0x800) == IotlbEntry(PG + 0x800, 0x800, 0x900000, RO)
    # an invalidation splitting an entry can pass the bound too: the oldest goes
    tlb = Iotlb(max_entries=2)
    tlb.update(0, 4 * PG, 0, RW)
    tlb.update(8 * PG, PG, 0, RW)
    assert tlb.invalidate(PG, PG) == 1
    # three pieces: the lower piece of the oldest update goes
    assert [e.iova for e in tlb.entries()] == [2 * PG, 8 * PG] and tlb.evictions == 1
    # the evicted range just misses now
    assert check_translate(tlb, 0, 8, RO) == Translation(IOTLB_MISS, [], 0)


def test_bad_bound():
    with pytest.raises(ValueError):
        Iotlb(max_entries=0)


@pytest.mark.parametrize("pattern", ["disjoint", "overlapping"])
def test_storm_of_updates_stays_bounded(pattern):
    """100,000 updates: the entry count never passes MAX_ENTRIES and memory stays flat."""
    rng = random.Random(11)
    tlb = Iotlb()
    n = 100_000

    def storm(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            if pattern == "disjoint":
                tlb.update(i * PG, PG, (n - i) * PG, RO)
            else:  # random ranges over 16 MiB: constant cutting and splitting, and past the bound
                iova = rng.randrange(0, 1 << 16) * 0x100
                tlb.update(iova, rng.randrange(1, 64) * 0x80, rng.randrange(0, 1 << 40), rng.choice((RO, WO, RW)))
            assert len(tlb) <= MAX_ENTRIES

    tracemalloc.start()
    try:
        storm(0, n // 5)  # well past the bound: the footprint is at its steady size
        tlb.table  # noqa: B018  (the table's array is part of the footprint)
        base = tracemalloc.get_traced_memory()[0]
        storm(n // 5, n)
        tlb.table  # noqa: B018
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 64 << 10, f"{grown} bytes more after 80,000 more updates"
    entries = tlb.entries()
    assert len(entries) <= MAX_ENTRIES
    assert all(a.iova + a.size <= b.iova for a, b in zip(entries, entries[1:]))
    assert tlb.evictions > n // 2
    if pattern == "disjoint":
        assert len(entries) == MAX_ENTRIES and tlb.evictions == n - MAX_ENTRIES
        assert entries[0].iova == (n - MAX_ENTRIES) * PG  # the newest MAX_ENTRIES stay


# =========================================================================================================
# hypothesis: random sequences against the model
#: Where a sequence's ranges lie: low, middle, straddling ADDR_LIMIT, just below 2^64 (every UPDATE refused).
BASES = (0, 0, 1 << 40, 1 << 40, ADDR_LIMIT - 0x2000, TOP - 0x2000)
UNIT = 0x100


@st.composite
def sizes(draw):
    """Mostly a few UNITs (so ranges overlap and abut), some odd byte counts, some 0 or huge."""
    kind = draw(st.integers(0, 19))
    if kind < 14:
        return draw(st.integers(1, 0x10)) * UNIT
    if kind < 17:
        return draw(st.integers(1, 0x1000))
    if kind < 18:
        return 0
    return draw(st.sampled_from((ADDR_LIMIT, TOP - 0x100, TOP, TOP + 1, 1 << 63)))


@st.composite
def sequences(draw, max_size=40):
    """Operations on ranges around one base (sometimes two), front-end addresses often iova + a constant (so
    adjacent entries are contiguous and translations merge), permissions mostly valid."""
    bases = draw(st.lists(st.sampled_from(BASES), min_size=1, max_size=2))
    perms = st.sampled_from((RW, RO, WO) * 5 + (0, 4, 7))

    def address():
        return draw(st.sampled_from(bases)) + draw(st.integers(0, 0x40)) * UNIT + draw(st.sampled_from((0, 0, 0, 1)))

    seq = []
    for _ in range(draw(st.integers(1, max_size))):
        kind = draw(st.integers(0, 9))
        iova, size = address(), draw(sizes())
        if kind < 4:
            shift = draw(st.sampled_from((0x10000, 0x10000, 0x20000, None)))
            uaddr = iova + shift if shift is not None else draw(st.integers(0, 0x40)) * UNIT
            seq.append(("update", iova, size, uaddr, draw(perms)))
        elif kind < 6:
            seq.append(("invalidate", iova, size))
        else:
            seq.append(("translate", iova, size, draw(perms)))
    return seq


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(sequences())
def test_random_sequences_match_the_model(seq):
    tlb, model = Iotlb(), Model()
    for op in seq:
        if op[0] == "update":
            _, iova, size, uaddr, perm = op
            if model.update(iova, size, uaddr, perm):
                tlb.update(iova, size, uaddr, perm)
            else:
                event("update refused")
                with pytest.raises(IotlbError):
                    tlb.update(iova, size, uaddr, perm)
        elif op[0] == "invalidate":
            _, iova, size = op
            want = model.invalidate(iova, size)
            if want is None:
                event("invalidate refused")
                with pytest.raises(IotlbError):
                    tlb.invalidate(iova, size)
            else:
                assert tlb.invalidate(iova, size) == want
        else:
            _, iova, length, perm = op
            got = check_translate(tlb, iova, length, perm, model)
            event(f"translate: status {got.status}, {min(len(got.segments), 3)}+ segment(s)")
        assert tlb.entries() == model.entries()
    # every entry boundary and a byte on either side translate alike in the model, Python and compiled code,
    # and so does the whole span of the map
    entries = tlb.entries()
    event(f"{min(len(entries), 5)}+ entries at the end")
    for e in entries:
        for at in (e.iova - 1, e.iova, e.iova + e.size - 1, e.iova + e.size):
            for perm in (RO, WO, RW):
                check_translate(tlb, at, 1, perm, model)
                check_translate(tlb, at, 0x300, perm, model)
    for a, b in zip(entries, entries[1:]):
        if a.iova + a.size == b.iova and a.perm & b.perm:  # a translation across two abutting entries
            got = check_translate(tlb, a.iova, a.size + b.size, a.perm & b.perm, model)
            event(f"across two entries: {len(got.segments)} segment(s)")
    if entries:
        span = entries[-1].iova + entries[-1].size - entries[0].iova
        for perm in (RO, WO):
            check_translate(tlb, entries[0].iova, span, perm, model)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(sequences(max_size=60), st.integers(1, 6))
def test_eviction_never_invents_a_translation(seq, bound):
    """With a small bound, the IOTLB holds a subset of the model: anything it translates, the model
    translates the same way; the rest misses."""
    tlb, model = Iotlb(max_entries=bound), Model()
    for op in seq:
        if op[0] == "update" and model.update(*op[1:]):
            tlb.update(*op[1:])
        elif op[0] == "invalidate" and model.invalidate(*op[1:]) is not None:
            tlb.invalidate(*op[1:])
        assert len(tlb) <= bound
    for e in tlb.entries():
        got = check_translate(tlb, e.iova, e.size, e.perm)
        assert got.status == IOTLB_OK
        assert got == model.translate(e.iova, e.size, e.perm)


# =========================================================================================================
# parsing VHOST_USER_IOTLB_MSG
def iotlb_message(iova: int, size: int, uaddr: int, perm: int, kind: int, extra: bytes = b"") -> Message:
    return Message(R.IOTLB_MSG, P.VHOST_USER_VERSION, IOTLB.pack(iova, size, uaddr, perm, kind) + extra)


def test_iotlb_payload_layout():
    assert IOTLB.size == 32  # struct vhost_iotlb_msg: three u64, two u8, padded to 8 (QEMU and DPDK send 32)
    m = IotlbMsg(0x1000, 0x2000, 0x7F00_0000_0000, RW, VHOST_IOTLB_UPDATE)
    assert len(m.pack()) == 32 and IotlbMsg.unpack(m.pack()) == m and m.end == 0x3000
    raw = struct.pack("<QQQBB", 0x1000, 0x2000, 0x7F00_0000_0000, RW, VHOST_IOTLB_UPDATE) + b"\xaa" * 6
    assert Message(R.IOTLB_MSG, 1, raw).iotlb() == m  # padding is ignored, whatever it holds
    miss = IotlbMsg(0x7000, 0, 0, WO, VHOST_IOTLB_MISS)  # what a back-end sends on its channel
    assert Message(R.IOTLB_MSG, 1, miss.pack()).iotlb() == miss


def test_iotlb_messages_accepted():
    assert iotlb_message(0x1000, 0x1000, 0x5000, RO, VHOST_IOTLB_UPDATE).iotlb().perm == RO
    up = iotlb_message(ADDR_LIMIT - 0x1000, 0x1000, ADDR_LIMIT - 0x1000, WO, VHOST_IOTLB_UPDATE).iotlb()
    assert up.end == ADDR_LIMIT
    # QEMU leaves perm and uaddr of an INVALIDATE uninitialised: they are not checked
    inv = iotlb_message(0x1000, 0x1000, 0xDEAD_BEEF_DEAD_BEEF, 0xC5, VHOST_IOTLB_INVALIDATE).iotlb()
    assert (inv.iova, inv.size, inv.type) == (0x1000, 0x1000, VHOST_IOTLB_INVALIDATE)
    # an invalidation above ADDR_LIMIT, up to 2^64 exactly, is a well-formed (if useless) range
    assert iotlb_message(ADDR_LIMIT, TOP - ADDR_LIMIT, 0, 0, VHOST_IOTLB_INVALIDATE).iotlb().end == TOP
    # a MISS carries no size (QEMU, DPDK and the kernel leave it 0); ACCESS_FAIL names the access
    assert iotlb_message(0x1000, 0, 0, WO, VHOST_IOTLB_MISS).iotlb().size == 0
    assert iotlb_message(0x1000, 8, 0, RO, VHOST_IOTLB_ACCESS_FAIL).iotlb().type == VHOST_IOTLB_ACCESS_FAIL
    assert iotlb_message(0x1000, 0x1000, 0x5000, RW, VHOST_IOTLB_UPDATE, b"\0" * 8).iotlb().size == 0x1000


@pytest.mark.parametrize(
    "fields, why",
    [
        ((0x1000, 0x1000, 0x5000, RW, 0), "unknown IOTLB message type 0"),
        ((0x1000, 0x1000, 0x5000, RW, 5), "unknown IOTLB message type 5"),
        ((0x1000, 0x1000, 0x5000, RW, 0xFF), "unknown IOTLB message type 255"),
        ((0x1000, 0, 0x5000, RW, VHOST_IOTLB_UPDATE), "UPDATE of size 0"),
        ((0x1000, 0, 0, 0, VHOST_IOTLB_INVALIDATE), "INVALIDATE of size 0"),
        ((0x1000, 0x1000, 0x5000, 0, VHOST_IOTLB_UPDATE), "permission 0x0"),
        ((0x1000, 0x1000, 0x5000, 4, VHOST_IOTLB_UPDATE), "permission 0x4"),
        ((0x1000, 0x1000, 0x5000, 0xFF, VHOST_IOTLB_UPDATE), "permission 0xff"),
        ((0x1000, 0, 0, 0, VHOST_IOTLB_MISS), "MISS with permission 0x0"),
        ((0x1000, 0, 0, 8, VHOST_IOTLB_ACCESS_FAIL), "ACCESS_FAIL with permission 0x8"),
        ((TOP - 0x1000, 0x2000, 0x5000, RW, VHOST_IOTLB_UPDATE), "wraps past 2\\^64"),
        ((0x1000, TOP - 1, 0x5000, RW, VHOST_IOTLB_UPDATE), "wraps past 2\\^64"),
        ((TOP - 0x1000, 0x2000, 0, 0, VHOST_IOTLB_INVALIDATE), "INVALIDATE iova .* wraps past 2\\^64"),
        ((ADDR_LIMIT - 0x800, 0x1000, 0x5000, RW, VHOST_IOTLB_UPDATE), "UPDATE iova .* beyond"),
        ((0x1000, 0x1000, ADDR_LIMIT - 0x800, RW, VHOST_IOTLB_UPDATE), "UPDATE uaddr .* beyond"),
        ((0x1000, ADDR_LIMIT, 0x5000, RW, VHOST_IOTLB_UPDATE), "beyond"),
    ],
)
def test_iotlb_messages_refused(fields, why):
    with pytest.raises(ProtocolError, match="IOTLB_MSG: .*" + why):
        iotlb_message(*fields).iotlb()


@pytest.mark.parametrize("n", [0, 1, 8, 26, 31])
def test_short_iotlb_payload_refused(n):
    payload = IOTLB.pack(0x1000, 0x1000, 0x5000, RW, VHOST_IOTLB_UPDATE)[:n]
    with pytest.raises(ProtocolError, match=f"payload of {n} bytes, expected 32"):
        Message(R.IOTLB_MSG, 1, payload).iotlb()


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.binary(min_size=0, max_size=40),
        st.tuples(
            st.integers(0, TOP - 1) | st.sampled_from((0, ADDR_LIMIT - 1, TOP - 1)),
            st.integers(0, TOP - 1) | st.integers(0, 0x10000),
            st.integers(0, TOP - 1) | st.sampled_from((0, ADDR_LIMIT - 0x1000)),
            st.integers(0, 255) | st.sampled_from((RO, WO, RW)),
            st.integers(0, 255) | st.integers(1, 4),
        ).map(lambda f: IOTLB.pack(*f)),
    )
)
def test_any_payload_parses_or_is_refused_and_the_iotlb_agrees(payload):
    """Any bytes: a ProtocolError or a message; an UPDATE or INVALIDATE the parser accepts the IOTLB accepts
    too (the two check the same ranges), so a handler never meets a second, different refusal."""
    try:
        msg = Message(R.IOTLB_MSG, 1, payload).iotlb()
    except ProtocolError as e:
        event(re.sub(r"0x[0-9a-f]+|\d+", "N", str(e)))
        return
    event(f"type {msg.type}")
    tlb = Iotlb()
    if msg.type == VHOST_IOTLB_UPDATE:
        tlb.update(msg.iova, msg.size, msg.uaddr, msg.perm)
        assert tlb.entries() == [IotlbEntry(msg.iova, msg.size, msg.uaddr, msg.perm)]
        assert tlb.invalidate(msg.iova, msg.size) == 1 and len(tlb) == 0
    elif msg.type == VHOST_IOTLB_INVALIDATE:
        assert tlb.invalidate(msg.iova, msg.size) == 0
