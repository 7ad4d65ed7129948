"""The IOTLB: what a front-end playing a virtual IOMMU has told us about IOVA -> front-end address mappings.

Once ``VIRTIO_F_ACCESS_PLATFORM`` is negotiated, ring and buffer addresses are IOVAs.  The front-end sends
UPDATE (iova, size, uaddr, perm) and INVALIDATE (iova, size) messages; this module keeps them as an interval
map of non-overlapping entries sorted by IOVA, each with read/write permission bits (``VHOST_ACCESS_*``):

* an UPDATE wins over older entries on its overlap; the parts of older entries outside it are kept;
* an INVALIDATE removes exactly its range, splitting the entries it cuts;
* every range is checked: size 0, a range past 2^64 or past ``protocol.ADDR_LIMIT``, permission 0 or
  unknown bits are an :class:`IotlbError`;
* at most ``max_entries`` (:data:`MAX_ENTRIES`) entries: past it the oldest entry goes (the kernel's
  ``vhost_iotlb`` with ``VHOST_IOTLB_FLAG_RETIRE`` does the same; DPDK evicts at random).  That is safe
  because an IOTLB is a cache: a later access to the evicted range misses and asks the front-end again.

Lookups are O(log n) (bisect in Python, a binary search in compiled code); a change costs O(n) list moves
at worst.  :attr:`Iotlb.table` is the same map as an int64 NumPy array for :func:`iotlb_translate`, the
compiled twin of :meth:`Iotlb.translate` that the datapath calls.  Every change bumps :attr:`Iotlb.generation`
and makes a new array: an array once handed out is never written, so a worker holding it sees a consistent
(possibly old) snapshot until it picks up the new generation.

Whether an INVALIDATE forces a queue to stop must be decided with :func:`overlaps` against the ranges the
queue uses (its rings, its buffers in flight), never by whether the invalidation removed an entry: the
entry a queue's translation came from may have been evicted since, and the invalidation still applies to it.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

import numpy as np

from .jit import helper
from .memory import MemoryError_
from .protocol import ADDR_LIMIT, VHOST_ACCESS_RO, VHOST_ACCESS_RW, VHOST_ACCESS_WO

#: Entries an IOTLB holds at most (DPDK's IOTLB_CACHE_SIZE, the kernel's vhost max_iotlb_entries default).
MAX_ENTRIES = 2048

#: Outcome of a translation (:class:`Translation` ``status``; negative lengths of :func:`iotlb_translate`).
IOTLB_OK = 0
#: No entry maps the IOVA: send a MISS for it and wait for the UPDATE.
IOTLB_MISS = -1
#: An entry maps the IOVA without the permission asked for (e.g. a write to a read-only page).
IOTLB_DENIED = -2
#: The request itself is out of range (length <= 0, past ADDR_LIMIT, permission not RO/WO/RW): the guest's
#: address or length is bad, no front-end answer can make it valid.
IOTLB_BAD = -3

#: Columns of :attr:`Iotlb.table`, one row per entry sorted by IOVA.
COL_START = 0  # first IOVA
COL_END = 1  # one past the last IOVA
COL_UADDR = 2  # front-end address of the first IOVA
COL_PERM = 3  # VHOST_ACCESS_* bits
NCOLS = 4

_PERMS = (VHOST_ACCESS_RO, VHOST_ACCESS_WO, VHOST_ACCESS_RW)
_ADDR_SPACE = 1 << 64


class IotlbError(MemoryError_):
    """An IOTLB change that cannot be accepted (size 0, range overflow, bad permission)."""


class IotlbEntry(NamedTuple):
    """One mapping: [iova, iova+size) -> [uaddr, uaddr+size) with ``perm``."""

    iova: int
    size: int
    uaddr: int
    perm: int


class Translation(NamedTuple):
    """Result of :meth:`Iotlb.translate`.

    ``segments`` are (uaddr, length) pieces of the range in order, pieces contiguous in both IOVA and
    front-end address merged; when ``status`` is not IOTLB_OK they cover only the prefix before ``at``, the
    first IOVA that could not be translated (the address a MISS or ACCESS_FAIL names).  With IOTLB_OK, ``at``
    is the end of the range."""

    status: int
    segments: list[tuple[int, int]]
    at: int


def overlaps(iova: int, size: int, other_iova: int, other_size: int) -> bool:
    """Whether [iova, iova+size) and [other_iova, other_iova+size) share a byte (e.g. does an INVALIDATE
    touch a ring part); empty ranges overlap nothing."""
    if size <= 0 or other_size <= 0:
        return False
    return iova < other_iova + other_size and other_iova < iova + size


def check_perm(perm: int, what: str = "permission") -> None:
    """Refuse a permission that is not exactly RO, WO or RW (0 grants nothing; other bits are unknown)."""
    if perm not in _PERMS:
        raise IotlbError(f"{what} {perm:#x} is not VHOST_ACCESS_RO, _WO or _RW")


def check_range(iova: int, size: int, what: str = "iova") -> None:
    """Refuse an empty range, a negative value, one wrapping past 2^64 or one reaching past ADDR_LIMIT."""
    if size == 0:
        raise IotlbError(f"{what} {iova:#x}: range of size 0")
    if iova < 0 or size < 0:
        raise IotlbError(f"{what} {iova:#x} size {size:#x}: negative")
    if iova + size > _ADDR_SPACE:
        raise IotlbError(f"{what} {iova:#x} + size {size:#x} wraps past 2^64")
    if iova + size > ADDR_LIMIT:
        raise IotlbError(f"{what} {iova:#x} + size {size:#x} reaches past {ADDR_LIMIT:#x}")


class Iotlb:
    """The IOTLB of one connection: a bounded interval map IOVA -> front-end address with permissions."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries {max_entries} < 1")
        self.max_entries = max_entries
        # parallel lists sorted by start; entries never overlap
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._uaddrs: list[int] = []
        self._perms: list[int] = []
        self._stamps: list[int] = []  # the UPDATE an entry (or the piece of one) came from: eviction order
        #: starts of the entries of each stamp still present, oldest stamp first (dicts keep insertion order)
        self._by_stamp: dict[int, set[int]] = {}
        self._next_stamp = 0
        self._table: np.ndarray | None = None
        #: bumped by every change (update, invalidate, eviction, clear)
        self.generation = 0
        #: entries evicted to keep the bound, since creation
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._starts)

    def entries(self) -> list[IotlbEntry]:
        """Every entry, sorted by IOVA."""
        return [IotlbEntry(s, e - s, u, p) for s, e, u, p in zip(self._starts, self._ends, self._uaddrs, self._perms)]

    # -- changes ---------------------------------------------------------------------------------------
    def update(self, iova: int, size: int, uaddr: int, perm: int) -> None:
        """Map [iova, iova+size) to [uaddr, uaddr+size) with ``perm``; the new entry wins where it overlaps
        older ones, which keep their parts outside it.  If the bound is passed, the oldest entries go."""
        check_range(iova, size)
        check_range(uaddr, size, "uaddr")
        check_perm(perm)
        end = iova + size
        self._cut(iova, end)
        i = bisect.bisect_left(self._starts, iova)
        stamp = self._next_stamp
        self._next_stamp += 1
        self._insert(i, iova, end, uaddr, perm, stamp)
        self._bound()
        self._changed()

    def invalidate(self, iova: int, size: int) -> int:
        """Remove every mapping of [iova, iova+size), splitting entries it cuts; return how many entries it
        touched (0: nothing was mapped there -- no error, the front-end may invalidate what it never sent or
        what was evicted).  The range may reach past ADDR_LIMIT (nothing is mapped there) but not past 2^64.
        A split that passes the bound evicts the oldest entry, as an UPDATE does."""
        if size == 0:
            raise IotlbError(f"invalidate at iova {iova:#x}: range of size 0")
        if iova < 0 or size < 0:
            raise IotlbError(f"invalidate iova {iova:#x} size {size:#x}: negative")
        if iova + size > _ADDR_SPACE:
            raise IotlbError(f"invalidate iova {iova:#x} + size {size:#x} wraps past 2^64")
        touched = self._cut(min(iova, ADDR_LIMIT), min(iova + size, ADDR_LIMIT))
        if touched:
            self._bound()  # splitting an entry in two can pass the bound too
            self._changed()
        return touched

    def clear(self) -> None:
        """Forget every entry (a new connection, RESET_OWNER, the feature renegotiated)."""
        for lst in (self._starts, self._ends, self._uaddrs, self._perms, self._stamps):
            lst.clear()
        self._by_stamp.clear()
        self._changed()

    def _changed(self) -> None:
        self._table = None
        self.generation += 1

    def _insert(self, i: int, start: int, end: int, uaddr: int, perm: int, stamp: int) -> None:
        self._starts.insert(i, start)
        self._ends.insert(i, end)
        self._uaddrs.insert(i, uaddr)
        self._perms.insert(i, perm)
        self._stamps.insert(i, stamp)
        self._by_stamp.setdefault(stamp, set()).add(start)

    def _delete(self, lo: int, hi: int) -> list[int]:
        """Delete entries [lo, hi); return their stamps (the caller drops those left without entries, after
        re-inserting any pieces, so that a cut entry keeps its place in the eviction order)."""
        stamps = self._stamps[lo:hi]
        for k in range(lo, hi):
            self._by_stamp[self._stamps[k]].discard(self._starts[k])
        for lst in (self._starts, self._ends, self._uaddrs, self._perms, self._stamps):
            del lst[lo:hi]
        return stamps

    def _prune(self, stamps: list[int]) -> None:
        for stamp in stamps:
            if stamp in self._by_stamp and not self._by_stamp[stamp]:
                del self._by_stamp[stamp]

    def _cut(self, start: int, end: int) -> int:
        """Remove [start, end) from the map, keeping the parts of cut entries outside it; return the number
        of entries that overlapped it."""
        if start >= end:
            return 0
        lo = bisect.bisect_right(self._starts, start) - 1
        if lo < 0 or self._ends[lo] <= start:
            lo += 1
        hi = bisect.bisect_left(self._starts, end)
        if lo >= hi:
            return 0
        keep = []  # (start, end, uaddr, perm, stamp) of the pieces that stay
        if self._starts[lo] < start:
            keep.append((self._starts[lo], start, self._uaddrs[lo], self._perms[lo], self._stamps[lo]))
        last = hi - 1
        if self._ends[last] > end:
            uaddr = self._uaddrs[last] + (end - self._starts[last])
            keep.append((end, self._ends[last], uaddr, self._perms[last], self._stamps[last]))
        gone = self._delete(lo, hi)
        for k, piece in enumerate(keep):
            self._insert(lo + k, *piece)
        self._prune(gone)
        return hi - lo

    def _bound(self) -> None:
        """Evict the oldest entries (the lowest piece of the oldest UPDATE first) down to ``max_entries``."""
        while len(self._starts) > self.max_entries:
            stamp = next(iter(self._by_stamp))
            i = bisect.bisect_left(self._starts, min(self._by_stamp[stamp]))
            self._prune(self._delete(i, i + 1))
            self.evictions += 1

    # -- lookup (Python side) ----------------------------------------------------------------------------
    def lookup(self, iova: int) -> IotlbEntry | None:
        """The entry that maps ``iova``, if any."""
        i = bisect.bisect_right(self._starts, iova) - 1
        if i < 0 or self._ends[i] <= iova:
            return None
        s = self._starts[i]
        return IotlbEntry(s, self._ends[i] - s, self._uaddrs[i], self._perms[i])

    def overlapping(self, iova: int, size: int) -> list[IotlbEntry]:
        """The entries that share a byte with [iova, iova+size), sorted by IOVA (O(log n + k))."""
        if size <= 0:
            return []
        end = iova + size
        i = max(bisect.bisect_right(self._starts, iova) - 1, 0)
        out = []
        while i < len(self._starts) and self._starts[i] < end:
            if self._ends[i] > iova:
                s = self._starts[i]
                out.append(IotlbEntry(s, self._ends[i] - s, self._uaddrs[i], self._perms[i]))
            i += 1
        return out

    def translate(self, iova: int, length: int, perm: int) -> Translation:
        """Translate [iova, iova+length) for an access needing ``perm`` into front-end address segments."""
        end = iova + length
        if length <= 0 or iova < 0 or end > ADDR_LIMIT or perm not in _PERMS:
            return Translation(IOTLB_BAD, [], iova)
        segments: list[tuple[int, int]] = []
        i = bisect.bisect_right(self._starts, iova) - 1
        at = iova
        while at < end:
            if i < 0 or i >= len(self._starts) or not self._starts[i] <= at < self._ends[i]:
                return Translation(IOTLB_MISS, segments, at)
            if self._perms[i] & perm != perm:
                return Translation(IOTLB_DENIED, segments, at)
            uaddr = self._uaddrs[i] + (at - self._starts[i])
            n = min(self._ends[i], end) - at
            if segments and segments[-1][0] + segments[-1][1] == uaddr:
                segments[-1] = (segments[-1][0], segments[-1][1] + n)
            else:
                segments.append((uaddr, n))
            at += n
            i += 1
        return Translation(IOTLB_OK, segments, end)

    def covers(self, iova: int, length: int, perm: int) -> bool:
        """Whether all of [iova, iova+length) is mapped with (at least) ``perm`` -- a ring part the direct
        path may take a view of, once its front-end addresses also lie in one memory region."""
        return self.translate(iova, length, perm).status == IOTLB_OK

    # -- the compiled side -------------------------------------------------------------------------------
    @property
    def table(self) -> np.ndarray:
        """The entries as an int64 array (rows sorted by IOVA, columns ``COL_*``) for :func:`iotlb_translate`;
        an empty IOTLB is one row that maps nothing.  A new array after every change, never written after."""
        if self._table is None:
            n = len(self._starts)
            t = np.zeros((max(n, 1), NCOLS), dtype=np.int64)
            if n:
                t[:, COL_START] = self._starts
                t[:, COL_END] = self._ends
                t[:, COL_UADDR] = self._uaddrs
                t[:, COL_PERM] = self._perms
            else:
                t[0, COL_START] = t[0, COL_END] = ADDR_LIMIT
            t.flags.writeable = False
            self._table = t
        return self._table


@helper
def iotlb_translate(table: np.ndarray, iova: np.int64, length: np.int64, perm: np.int64) -> tuple[np.int64, np.int64]:
    """Compiled twin of :meth:`Iotlb.translate`, one segment at a time: (uaddr, n) with n > 0 the bytes from
    ``iova`` (at most ``length``) that translate to [uaddr, uaddr+n) -- following entries merged while they
    are contiguous in IOVA and front-end address and grant ``perm`` -- else (0, IOTLB_MISS / IOTLB_DENIED /
    IOTLB_BAD).  Callers loop: iova += n, length -= n."""
    if length <= 0 or iova < 0 or iova >= ADDR_LIMIT or length > ADDR_LIMIT - iova:
        return np.int64(0), np.int64(IOTLB_BAD)
    if perm != VHOST_ACCESS_RO and perm != VHOST_ACCESS_WO and perm != VHOST_ACCESS_RW:
        return np.int64(0), np.int64(IOTLB_BAD)
    n = table.shape[0]
    lo = 0
    hi = n
    while lo < hi:
        mid = (lo + hi) >> 1
        if table[mid, COL_START] <= iova:
            lo = mid + 1
        else:
            hi = mid
    row = lo - 1
    if row < 0 or table[row, COL_END] <= iova:
        return np.int64(0), np.int64(IOTLB_MISS)
    if table[row, COL_PERM] & perm != perm:
        return np.int64(0), np.int64(IOTLB_DENIED)
    uaddr = table[row, COL_UADDR] + (iova - table[row, COL_START])
    stop = iova + length
    end = table[row, COL_END]
    while end < stop and row + 1 < n:
        nxt = row + 1
        if table[nxt, COL_START] != end or table[nxt, COL_PERM] & perm != perm:
            break
        if table[nxt, COL_UADDR] != uaddr + (end - iova):
            break
        row = nxt
        end = table[row, COL_END]
    return uaddr, np.int64(min(end, stop) - iova)
