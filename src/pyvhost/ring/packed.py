"""Packed virtqueue (virtio 1.2 §2.8), device side: layout, queue state, chain walking and used descriptors.

A packed ring is one array of 16-byte descriptors ``{addr u64, len u32, id u16, flags u16}`` that both sides
write, plus two 4-byte event suppression areas ``{off_wrap u16, flags u16}``: the *driver* area (written by the
driver, read here: may we call?) and the *device* area (written here: should the driver kick?).  In vhost-user's
SET_VRING_ADDR they are the ``desc``, ``avail`` and ``used`` addresses respectively.

The device keeps two cursors, each a position in ``[0, size)`` and a wrap counter starting at 1:

* avail (``Q_LAST_AVAIL``, ``Q_AVAIL_WRAP``): the next descriptor to take.  It is available when its AVAIL bit
  equals the wrap counter and its USED bit does not.  AVAIL == USED == wrap there can only be a used descriptor
  of this lap -- the used cursor never passes the avail one -- so it breaks the queue (PACKED_BAD_WRAP);
  anything else is "nothing yet".
* used (``Q_USED_IDX``, ``Q_USED_WRAP``): where the next used descriptor goes.  It advances by the number of
  descriptors of the chain completed (whatever its position was), so completion may be in or out of order.

The queue size need not be a power of two (≤ 32768): positions wrap explicitly, and every position used to
index the ring is bounded to ``[0, size)`` at its point of use (``slot``, the split ring's mask for any size), so
a cursor out of range -- the control plane refuses one, this is the second line -- cannot reach past the ring.

Every guest value is read once and bounded: a head's flags by one acquire load (then its other fields by one
64-bit load each), a chained descriptor's len/id/flags by one 64-bit load; a chain may not be longer than the
descriptors the ring can hold in flight; the buffer id (of the last descriptor) must be below the queue size;
indirect tables follow the split ring's rules (non-zero multiple of 16, at most ``MAX_INDIRECT`` entries, one
region, nothing nested; within a table only WRITE counts, entries are sequential).

Used descriptors of one pass are collected in a ``shadow`` array and written together at its end: every one
but the first (id, len, then flags by a release store), then the first one's flags last (publish after fill),
so the driver, which polls the first, never sees part of a batch; ``flush_used`` says whether it was published
(a device that completes chains in the pass that takes them moves its avail cursor only then).  Both metadata
paths go through the same functions: ``direct`` uses the ring's validated views, ``copy`` translates the ring
address and checks the bounds on every access (see ring/split.py).
"""

from __future__ import annotations

import numpy as np

from ..atomic import eventfd_write, fence_full, ld16_acquire, ld32, ld64, st16, st16_release, st32
from ..dirtylog import log_arena
from ..errors import QueueError
from ..jit import helper, inline_helper
from ..memory import SPACE_GPA, SPACE_GPA_W, SPACE_UVA, SPACE_UVA_W, translate
from ..protocol import ADDR_LIMIT
from .chain import MAX_INDIRECT, READ_ONLY, WRITE_ONLY, add_buffer
from .poll import NOTHING, make_poll
from .split import DESC_SIZE, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, fail
from .state import (
    Q_AVAIL,
    Q_AVAIL_WRAP,
    Q_CALL_MISSED,
    Q_CALLFD,
    Q_CALLS,
    Q_DESC,
    Q_DESC_AT,
    Q_DIRECT,
    Q_ERROR,
    Q_EVENT_IDX,
    Q_FAULT_LEN,
    Q_FAULT_WRITE,
    Q_LAST_AVAIL,
    Q_LOG_OFF,
    Q_LOG_SIZE,
    Q_NOTIFY_ON,
    Q_PACKED,
    Q_SIGNALLED,
    Q_SIGNALLED_VALID,
    Q_SIZE,
    Q_USED,
    Q_USED_AT,
    Q_USED_IDX,
    Q_USED_WRAP,
    new_queue_state,
)

# -- virtio 1.2 constants -------------------------------------------------------------------------------
VRING_PACKED_DESC_F_AVAIL = 1 << 7
VRING_PACKED_DESC_F_USED = 1 << 15
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2
#: Largest packed queue (virtio: up to 2^15 entries, any number).
MAX_QUEUE_SIZE = 32768
DESC_ALIGN, EVENT_ALIGN = 16, 4
EVENT_BYTES = 4

#: read_head(): the descriptor is not available (yet).  -1 means the queue broke.
NOT_AVAIL = NOTHING
#: columns of the shadow array: buffer id, length written, descriptors the chain took in the ring
SH_ID, SH_LEN, SH_NDESC = 0, 1, 2
_ADDR_LIMIT = np.uint64(ADDR_LIMIT)


def ring_bytes(n: int) -> int:
    return DESC_SIZE * n


def new_packed_state(size: int) -> np.ndarray:
    """Queue state of a fresh packed ring: both cursors at position 0 with wrap counter 1."""
    q = new_queue_state(size)
    q[Q_PACKED] = 1
    q[Q_AVAIL_WRAP] = q[Q_USED_WRAP] = 1
    return q


def new_shadow(size: int) -> np.ndarray:
    """Used descriptors of one pass (a pass takes at most ``size`` chains)."""
    return np.zeros((max(size, 1), 3), dtype=np.int64)


# -- vhost-user GET/SET_VRING_BASE for packed rings --------------------------------------------------------
def encode_base(avail: int, avail_wrap: int, used: int, used_wrap: int) -> int:
    """bits 0-14 avail position, 15 avail wrap, 16-30 used position, 31 used wrap (docs/interop/vhost-user.rst)."""
    return (avail & 0x7FFF) | (avail_wrap & 1) << 15 | (used & 0x7FFF) << 16 | (used_wrap & 1) << 31


def decode_base(num: int) -> tuple[int, int, int, int]:
    """(avail, avail_wrap, used, used_wrap).  A front-end that sends only the low half (DPDK's virtio-user
    does) gets the used cursor equal to the avail one, as DPDK's own back-end assumes."""
    avail, avail_wrap = num & 0x7FFF, (num >> 15) & 1
    if num >> 16 == 0:
        return avail, avail_wrap, avail, avail_wrap
    return avail, avail_wrap, (num >> 16) & 0x7FFF, (num >> 31) & 1


# -- cursors ---------------------------------------------------------------------------------------------
@helper
def advance(pos, wrap, n, size):
    """Move a cursor ``n`` (≤ size) descriptors on, flipping the wrap counter past the end."""
    pos += n
    if pos >= size:
        pos -= size
        wrap ^= 1
    return pos, wrap


@helper
def slot(pos, size):
    """``pos`` bounded to ``[0, size)`` where it indexes the ring (any size; ``pos`` itself is normally there)."""
    if pos < 0 or pos >= size:
        return pos % size
    return pos


@helper
def linear(pos, wrap, size):
    """A cursor as one number modulo 2*size (wrap 1 is the first lap): distances between cursors are
    differences of these modulo 2*size."""
    return pos if wrap else pos + size


@helper
def in_flight(q):
    """Descriptors taken but not yet used (the avail cursor's lead over the used one)."""
    size = q[Q_SIZE]
    m = 2 * size
    return (linear(q[Q_LAST_AVAIL], q[Q_AVAIL_WRAP], size) - linear(q[Q_USED_IDX], q[Q_USED_WRAP], size) + m) % m


@helper
def is_avail(flags, wrap):
    return ((flags & VRING_PACKED_DESC_F_AVAIL) != 0) == (wrap != 0) and ((flags & VRING_PACKED_DESC_F_USED) != 0) != (
        wrap != 0
    )


@helper
def used_flags(wrap, written):
    """Flags of a used descriptor: AVAIL = USED = the used wrap counter; WRITE when data was written."""
    f = (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED) if wrap else 0
    return f | (VRING_DESC_F_WRITE if written else 0)


# -- compiled accessors ------------------------------------------------------------------------------------
@helper
def read_head(q, desc, mem, table, pos, wrap):
    """The flags of the descriptor at ``pos`` (one acquire load) if it is available, NOT_AVAIL if it is not,
    or -1 with the queue broken (ring unmapped, or a used descriptor of this lap: PACKED_BAD_WRAP)."""
    pos = slot(pos, q[Q_SIZE])
    if q[Q_DIRECT]:
        f = np.int64(ld16_acquire(desc, DESC_SIZE * pos + 14))
    else:
        off, _room = translate(table, SPACE_UVA, q[Q_DESC] + DESC_SIZE * pos, DESC_SIZE)
        if off < 0:
            return fail(q, QueueError.RING_UNMAPPED, q[Q_DESC])
        f = np.int64(ld16_acquire(mem, off + 14))
    a = (f & VRING_PACKED_DESC_F_AVAIL) != 0
    if a != (wrap != 0):
        return np.int64(NOT_AVAIL)
    if ((f & VRING_PACKED_DESC_F_USED) != 0) == (wrap != 0):
        return fail(q, QueueError.PACKED_BAD_WRAP, (pos << 16) | f)
    return f


@inline_helper
def look_head(q, desc, mem, table):
    """``ring.poll``'s look at a packed ring: the flags of the descriptor at the avail cursor if it is
    available, NOTHING, or -1 (broken)."""
    return read_head(q, desc, mem, table, q[Q_LAST_AVAIL], q[Q_AVAIL_WRAP])


@helper
def read_desc(q, desc, mem, table, pos):
    """Descriptor at ``pos`` as two words, addr and len | id << 32 | flags << 48 (one load each), and ok."""
    pos = slot(pos, q[Q_SIZE])
    if q[Q_DIRECT]:
        return np.uint64(desc[2 * pos]), np.uint64(desc[2 * pos + 1]), True
    off, _room = translate(table, SPACE_UVA, q[Q_DESC] + DESC_SIZE * pos, DESC_SIZE)
    if off < 0:
        fail(q, QueueError.RING_UNMAPPED, q[Q_DESC])
        return np.uint64(0), np.uint64(0), False
    return ld64(mem, off), ld64(mem, off + 8), True


@inline_helper
def walk_packed(q, desc, mem, table, pos, wrap, head_flags, sg, want, room):
    """Walk the chain whose head at ``pos`` has ``head_flags`` (from read_head, available).

    Returns (nread, nseg, rbytes, wbytes, ndesc, buffer id) like chain.walk_chain plus the descriptors the
    chain takes in the ring and its id; ``nread == -1`` means the queue broke.  ``room`` (≥ 1) bounds the
    chain: the descriptors the ring can still have in flight in this pass.
    """
    size = q[Q_SIZE]
    bad = (np.int64(-1), np.int64(0), np.int64(0), np.int64(0), np.int64(0), np.int64(0))
    n = np.int64(0)
    nread = np.int64(0)
    rbytes = np.int64(0)
    wbytes = np.int64(0)
    p = np.int64(pos)
    w = np.int64(wrap)
    count = np.int64(0)
    flags = np.int64(head_flags)
    while True:
        addr, word, ok = read_desc(q, desc, mem, table, p)
        if not ok:
            return bad
        if count > 0:
            flags = np.int64(word >> np.uint64(48))  # the same load as len and id
            if not is_avail(flags, w):
                fail(q, QueueError.PACKED_BAD_WRAP, (p << 16) | flags)
                return bad
        count += 1
        length = np.int64(word & np.uint64(0xFFFFFFFF))
        bid = np.int64((word >> np.uint64(32)) & np.uint64(0xFFFF))
        if flags & VRING_DESC_F_INDIRECT:
            if count > 1:
                fail(q, QueueError.PACKED_INDIRECT_IN_CHAIN, p)
                return bad
            if flags & VRING_DESC_F_NEXT:
                fail(q, QueueError.INDIRECT_WITH_NEXT, p)
                return bad
            if length == 0 or length % DESC_SIZE != 0 or length > DESC_SIZE * MAX_INDIRECT:
                fail(q, QueueError.INDIRECT_BAD_SIZE, length)
                return bad
            if addr >= _ADDR_LIMIT:
                fail(q, QueueError.INDIRECT_UNMAPPED, addr)
                return bad
            base, _room = translate(table, SPACE_GPA, np.int64(addr), length)
            if base < 0:
                if q[Q_ERROR] == 0:
                    q[Q_FAULT_WRITE] = 0
                    q[Q_FAULT_LEN] = length
                fail(q, QueueError.INDIRECT_UNMAPPED, addr)
                return bad
            for j in range(length // DESC_SIZE):
                eaddr = ld64(mem, base + DESC_SIZE * j)
                eword = ld64(mem, base + DESC_SIZE * j + 8)
                elen = np.int64(eword & np.uint64(0xFFFFFFFF))
                eflags = np.int64(eword >> np.uint64(48))
                if eflags & VRING_DESC_F_INDIRECT:  # reserved in a table; refused as the split ring does
                    fail(q, QueueError.INDIRECT_NESTED, j)
                    return bad
                writable = (eflags & VRING_DESC_F_WRITE) != 0
                if (writable and want == READ_ONLY) or (not writable and (want == WRITE_ONLY or n > nread)):
                    fail(q, QueueError.BAD_DIRECTION, j)
                    return bad
                n2 = add_buffer(q, mem, table, sg, n, eaddr, elen, SPACE_GPA_W if writable else SPACE_GPA)
                if n2 < 0:
                    return bad
                if writable:
                    wbytes += elen
                else:
                    rbytes += elen
                    nread = n2
                n = n2
            if bid >= size:
                fail(q, QueueError.PACKED_BAD_ID, bid)
                return bad
            return nread, n, rbytes, wbytes, count, bid
        writable = (flags & VRING_DESC_F_WRITE) != 0
        if (writable and want == READ_ONLY) or (not writable and (want == WRITE_ONLY or n > nread)):
            fail(q, QueueError.BAD_DIRECTION, p)
            return bad
        n2 = add_buffer(q, mem, table, sg, n, addr, length, SPACE_GPA_W if writable else SPACE_GPA)
        if n2 < 0:
            return bad
        if writable:
            wbytes += length
        else:
            rbytes += length
            nread = n2
        n = n2
        if not (flags & VRING_DESC_F_NEXT):
            if bid >= size:
                fail(q, QueueError.PACKED_BAD_ID, bid)
                return bad
            return nread, n, rbytes, wbytes, count, bid
        if count >= room:
            fail(q, QueueError.CHAIN_TOO_LONG, pos)
            return bad
        p, w = advance(p, w, 1, size)


@helper
def write_used_desc(q, desc, mem, table, pos, bid, length, flags):
    """Used descriptor at ``pos``: len and id, then flags by a release store.  False if the ring is unmapped."""
    pos = slot(pos, q[Q_SIZE])
    if q[Q_DIRECT]:
        o = DESC_SIZE * pos
        st32(desc, o + 8, np.uint32(length))
        st16(desc, o + 12, np.uint16(bid))
        st16_release(desc, o + 14, np.uint16(flags))
        return True
    off, _room = translate(table, SPACE_UVA_W, q[Q_DESC] + DESC_SIZE * pos, DESC_SIZE)
    if off < 0:
        fail(q, QueueError.RING_UNMAPPED, q[Q_DESC])
        return False
    st32(mem, off + 8, np.uint32(length))
    st16(mem, off + 12, np.uint16(bid))
    st16_release(mem, off + 14, np.uint16(flags))
    return True


@helper
def read_driver_event(q, drv, mem, table):
    """The driver's event suppression area as one 32-bit load: off_wrap | flags << 16, or -1 (broken)."""
    if q[Q_DIRECT]:
        return np.int64(ld32(drv, 0))
    off, _room = translate(table, SPACE_UVA, q[Q_AVAIL], 4)
    if off < 0:
        return fail(q, QueueError.RING_UNMAPPED, q[Q_AVAIL])
    return np.int64(ld32(mem, off))


@helper
def write_device_event(q, dev, mem, table, off_wrap, flags, with_off):
    """Our event suppression area: off_wrap (if ``with_off``), then flags by a release store."""
    if q[Q_DIRECT]:
        if with_off:
            st16(dev, 0, np.uint16(off_wrap))
        st16_release(dev, 2, np.uint16(flags))
        if q[Q_LOG_SIZE]:  # dirty logging (invariant 7), after the write
            log_arena(mem, table, q[Q_LOG_OFF], q[Q_LOG_SIZE], q[Q_USED_AT], 4)
        return True
    off, _room = translate(table, SPACE_UVA_W, q[Q_USED], 4)
    if off < 0:
        fail(q, QueueError.RING_UNMAPPED, q[Q_USED])
        return False
    if with_off:
        st16(mem, off, np.uint16(off_wrap))
    st16_release(mem, off + 2, np.uint16(flags))
    if q[Q_LOG_SIZE]:  # dirty logging (invariant 7), after the write
        log_arena(mem, table, q[Q_LOG_OFF], q[Q_LOG_SIZE], off, 4)
    return True


@helper
def set_notify(q, dev, mem, table, enable):
    """Ask for kicks (before sleeping) or suppress them (while polling).  With EVENT_IDX, ask for a kick when
    the descriptor at our avail cursor is made available."""
    if enable == q[Q_NOTIFY_ON]:
        return True
    q[Q_NOTIFY_ON] = enable
    if not enable:
        return write_device_event(q, dev, mem, table, 0, RING_EVENT_FLAGS_DISABLE, False)
    if q[Q_EVENT_IDX]:
        return write_device_event(
            q, dev, mem, table, slot(q[Q_LAST_AVAIL], q[Q_SIZE]) | (q[Q_AVAIL_WRAP] << 15), RING_EVENT_FLAGS_DESC, True
        )
    return write_device_event(q, dev, mem, table, 0, RING_EVENT_FLAGS_ENABLE, False)


@helper
def need_event(event, new, old, m):
    """``vring_need_event`` modulo ``m``: was ``event`` in [old, new)?  (``event`` may be anything the driver
    wrote; the distances are reduced to [0, m) first.)"""
    return ((new - event - 1) % m + m) % m < ((new - old) % m + m) % m


@helper
def log_used_descs(q, mem, table, pos, wrap, shadow, n):
    """Dirty logging (invariant 7) of the ``n`` used descriptors of ``shadow`` written from ``pos``."""
    size = q[Q_SIZE]
    p, w = pos, wrap
    for k in range(n):
        at = slot(p, size)
        if q[Q_DIRECT]:
            off = q[Q_DESC_AT] + DESC_SIZE * at + 8
        else:
            off, _room = translate(table, SPACE_UVA_W, q[Q_DESC] + DESC_SIZE * at + 8, 8)
        if off >= 0:
            log_arena(mem, table, q[Q_LOG_OFF], q[Q_LOG_SIZE], off, 8)
        p, w = advance(p, w, shadow[k, SH_NDESC], size)


@helper
def flush_used(q, drv, desc, mem, table, shadow, n):
    """Write the ``n`` used descriptors of ``shadow`` from the used cursor -- the first one's flags last --
    advance the cursor, and signal the driver if it asked to be (flags, or EVENT_IDX's off_wrap).

    Returns (published, ok).  If one cannot be written (the ring is partly unmapped: the queue breaks) the batch
    is not published and the cursor stays: (False, False).  If the driver's area cannot be read after
    publishing, the queue breaks with the batch published: (True, False)."""
    if n == 0:
        return True, True
    size = q[Q_SIZE]
    pos0 = q[Q_USED_IDX]
    w0 = q[Q_USED_WRAP]
    p, w = advance(pos0, w0, shadow[0, SH_NDESC], size)
    for k in range(1, n):
        if not write_used_desc(
            q, desc, mem, table, p, shadow[k, SH_ID], shadow[k, SH_LEN], used_flags(w, shadow[k, SH_LEN] > 0)
        ):
            return False, False
        p, w = advance(p, w, shadow[k, SH_NDESC], size)
    if not write_used_desc(
        q, desc, mem, table, pos0, shadow[0, SH_ID], shadow[0, SH_LEN], used_flags(w0, shadow[0, SH_LEN] > 0)
    ):
        return False, False
    q[Q_USED_IDX] = p
    q[Q_USED_WRAP] = w
    if q[Q_LOG_SIZE]:  # dirty logging of the batch, once (not a test per descriptor)
        log_used_descs(q, mem, table, pos0, w0, shadow, n)
    fence_full()  # the driver's event area must be read after our flags store is visible
    ev = read_driver_event(q, drv, mem, table)
    if ev < 0:
        return True, False
    flags = (ev >> 16) & 0x3
    if q[Q_EVENT_IDX]:
        new = linear(p, w, size)
        last, valid = q[Q_SIGNALLED], q[Q_SIGNALLED_VALID]
        q[Q_SIGNALLED] = new
        q[Q_SIGNALLED_VALID] = 1
        if flags == RING_EVENT_FLAGS_DESC:
            off = ev & 0x7FFF
            event = off if (ev >> 15) & 1 else off + size
            signal = (not valid) or need_event(event, new, last, 2 * size)
        else:
            signal = flags != RING_EVENT_FLAGS_DISABLE
    else:
        signal = flags != RING_EVENT_FLAGS_DISABLE
    if signal:
        if q[Q_CALLFD] >= 0:
            q[Q_CALLS] += 1
            eventfd_write(q[Q_CALLFD], 1)
        else:
            q[Q_CALL_MISSED] = 1  # told once a call fd comes (backend.py, SET_VRING_CALL)
    return True, True


#: the polling routine (``ring.poll``) for this layout, one ring and a pair of rings
poll_head, poll_head_pair = make_poll(look_head, set_notify)
