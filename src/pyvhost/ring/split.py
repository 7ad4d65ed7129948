"""Split virtqueue (virtio 1.2 §2.7), device side: layout and compiled ring accessors (the queue state is
``ring.state``).

Every accessor takes the queue state ``q``, the guest memory arena ``mem`` (one uint8 array, see
``memory.Arena``), the translation ``table``, and both metadata representations:

* direct path (``q[Q_DIRECT] == 1``): typed views validated once per memory generation -- ``desc`` (uint64,
  two words per descriptor), ``avail`` (uint16), ``used16`` (uint16) and ``used32`` (uint32) -- indexed with
  the ring index masked to the queue size (the ``array_index_nospec`` of the kernel), no other check;
* copy path (``q[Q_DIRECT] == 0``): the ring's front-end virtual address is translated through the memory
  table and bounds-checked on every access, like vhost's ``vhost_get_user()``/``copy_to_user()``.

Both go through the same functions so that the loop around them is identical; the difference measured by the
benchmark is the cost of the checks.  Indices are read with acquire loads and published with release stores.
"""

from __future__ import annotations

import numpy as np

from ..atomic import (
    eventfd_write,
    fence_full,
    ld16,
    ld16_acquire,
    ld64,
    load_acquire,
    st16,
    st16_release,
    st32,
    store_release,
)
from ..dirtylog import log_arena
from ..errors import QueueError
from ..jit import helper, inline_helper
from ..memory import SPACE_UVA, SPACE_UVA_W, translate
from .poll import NOTHING, make_poll
from .state import (
    Q_AVAIL,
    Q_CALL_MISSED,
    Q_CALLFD,
    Q_CALLS,
    Q_DESC,
    Q_DIRECT,
    Q_ERROR,
    Q_ERROR_VALUE,
    Q_EVENT_IDX,
    Q_LAST_AVAIL,
    Q_LOG_OFF,
    Q_LOG_SIZE,
    Q_MASK,
    Q_NOTIFY_ON,
    Q_SIGNALLED,
    Q_SIGNALLED_VALID,
    Q_SIZE,
    Q_USED,
    Q_USED_AT,
    Q_USED_IDX,
)

# -- virtio 1.2 constants -------------------------------------------------------------------------------
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
DESC_SIZE = 16
#: Largest split queue (virtio: Queue Size ≤ 32768, a power of 2).
MAX_QUEUE_SIZE = 32768
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4


def desc_bytes(n: int) -> int:
    return DESC_SIZE * n


def avail_bytes(n: int) -> int:
    return 6 + 2 * n  # flags, idx, ring[n], used_event


def used_bytes(n: int) -> int:
    return 6 + 8 * n  # flags, idx, ring[n] of {id, len}, avail_event


# -- compiled accessors ------------------------------------------------------------------------------------
@helper
def fail(q, code, value):
    """Mark the queue broken (first error wins) and return -1."""
    if q[Q_ERROR] == 0:
        q[Q_ERROR] = code
        q[Q_ERROR_VALUE] = value
    return -1


@helper
def read_avail_idx(q, avail, mem, table):
    """The driver's avail index (acquire), or -1 if the ring is unmapped (queue broken)."""
    if q[Q_DIRECT]:
        return np.int64(load_acquire(avail, 1))
    off, _room = translate(table, SPACE_UVA, q[Q_AVAIL] + 2, 2)
    if off < 0:
        return fail(q, QueueError.RING_UNMAPPED, q[Q_AVAIL])
    return np.int64(ld16_acquire(mem, off))


@helper
def read_avail_entry(q, avail, mem, table, i):
    """Descriptor head at free-running avail position ``i`` (masked), or -1."""
    slot = i & q[Q_MASK]
    if q[Q_DIRECT]:
        return np.int64(avail[2 + slot])
    off, _room = translate(table, SPACE_UVA, q[Q_AVAIL] + 4 + 2 * slot, 2)
    if off < 0:
        return fail(q, QueueError.RING_UNMAPPED, q[Q_AVAIL])
    return np.int64(ld16(mem, off))


@helper
def read_avail_flags_event(q, avail, mem, table):
    """(flags, used_event) of the avail ring, or (-1, -1)."""
    if q[Q_DIRECT]:
        return np.int64(avail[0]), np.int64(avail[2 + q[Q_SIZE]])
    off, _room = translate(table, SPACE_UVA, q[Q_AVAIL], 2)
    if off < 0:
        return np.int64(fail(q, QueueError.RING_UNMAPPED, q[Q_AVAIL])), np.int64(-1)
    flags = np.int64(ld16(mem, off))
    off, _room = translate(table, SPACE_UVA, q[Q_AVAIL] + 4 + 2 * q[Q_SIZE], 2)
    if off < 0:
        return np.int64(fail(q, QueueError.RING_UNMAPPED, q[Q_AVAIL])), np.int64(-1)
    return flags, np.int64(ld16(mem, off))


@helper
def read_desc(q, desc, mem, table, idx):
    """Descriptor ``idx`` (already checked < size) as two words: addr, and len | flags << 32 | next << 48.
    Each is one 64-bit load, so len, flags and next come from one read of the guest's memory."""
    if q[Q_DIRECT]:
        j = (idx & q[Q_MASK]) << 1
        return np.uint64(desc[j]), np.uint64(desc[j + 1]), True
    off, _room = translate(table, SPACE_UVA, q[Q_DESC] + DESC_SIZE * idx, DESC_SIZE)
    if off < 0:
        fail(q, QueueError.RING_UNMAPPED, q[Q_DESC])
        return np.uint64(0), np.uint64(0), False
    return ld64(mem, off), ld64(mem, off + 8), True


@helper
def write_used(q, used32, mem, table, i, head, length):
    """Used entry at free-running position ``i`` (not yet published).  False if the ring is unmapped."""
    slot = i & q[Q_MASK]
    if q[Q_DIRECT]:
        used32[1 + 2 * slot] = np.uint32(head)
        used32[2 + 2 * slot] = np.uint32(length)
        return True
    off, _room = translate(table, SPACE_UVA_W, q[Q_USED] + 4 + 8 * slot, 8)
    if off < 0:
        fail(q, QueueError.RING_UNMAPPED, q[Q_USED])
        return False
    st32(mem, off, np.uint32(head))
    st32(mem, off + 4, np.uint32(length))
    return True


@helper
def publish_used(q, used16, mem, table, new_idx):
    """Release-store the used index after the entries it covers."""
    if q[Q_DIRECT]:
        store_release(used16, 1, np.uint16(new_idx & 0xFFFF))
        return True
    off, _room = translate(table, SPACE_UVA_W, q[Q_USED] + 2, 2)
    if off < 0:
        fail(q, QueueError.RING_UNMAPPED, q[Q_USED])
        return False
    st16_release(mem, off, np.uint16(new_idx & 0xFFFF))
    return True


@helper
def write_used_u16(q, used16, mem, table, word, value):
    """Write used ring u16 field ``word`` (0 = flags, 2 + 4*size = avail_event)."""
    if q[Q_DIRECT]:
        used16[word] = np.uint16(value & 0xFFFF)
        if q[Q_LOG_SIZE]:  # dirty logging (invariant 7), after the write
            log_arena(mem, table, q[Q_LOG_OFF], q[Q_LOG_SIZE], q[Q_USED_AT] + 2 * word, 2)
        return True
    off, _room = translate(table, SPACE_UVA_W, q[Q_USED] + 2 * word, 2)
    if off < 0:
        fail(q, QueueError.RING_UNMAPPED, q[Q_USED])
        return False
    st16(mem, off, np.uint16(value & 0xFFFF))
    if q[Q_LOG_SIZE]:  # dirty logging (invariant 7), after the write
        log_arena(mem, table, q[Q_LOG_OFF], q[Q_LOG_SIZE], off, 2)
    return True


@helper
def need_event(event, new, old):
    """virtio ``vring_need_event``: has ``event`` been crossed moving from old to new?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


@helper
def set_notify(q, used16, mem, table, enable):
    """Ask for kicks (before sleeping) or suppress them (while polling)."""
    if enable == q[Q_NOTIFY_ON]:
        return True
    q[Q_NOTIFY_ON] = enable
    if q[Q_EVENT_IDX]:
        if enable:
            return write_used_u16(q, used16, mem, table, 2 + 4 * q[Q_SIZE], q[Q_LAST_AVAIL])
        return True  # a stale avail_event already suppresses kicks
    return write_used_u16(q, used16, mem, table, 0, 0 if enable else VRING_USED_F_NO_NOTIFY)


@helper
def avail_pending(q, avail, mem, table):
    """Chains waiting: 0..size, or -1 with the queue broken (ring unmapped or an index jump)."""
    idx = read_avail_idx(q, avail, mem, table)
    if idx < 0:
        return np.int64(-1)
    n = (idx - q[Q_LAST_AVAIL]) & 0xFFFF
    if n > q[Q_SIZE]:
        return np.int64(fail(q, QueueError.AVAIL_IDX_JUMP, idx))
    return n


@inline_helper
def look_avail(q, avail, mem, table):
    """``ring.poll``'s look at a split ring: how many chains are available, NOTHING, or -1 (broken)."""
    n = avail_pending(q, avail, mem, table)
    return np.int64(NOTHING) if n == 0 else n


@helper
def log_used(q, mem, table, old, new):
    """Dirty logging (invariant 7) of a published batch: the used entries from free-running position ``old``
    to ``new`` and the used index -- once per batch, not per entry (a test per entry in ``write_used`` cost
    the direct path's TX loop 60 %)."""
    for i in range((new - old) & 0xFFFF):
        slot = (old + i) & q[Q_MASK]
        if q[Q_DIRECT]:
            off = q[Q_USED_AT] + 4 + 8 * slot
        else:
            off, _room = translate(table, SPACE_UVA_W, q[Q_USED] + 4 + 8 * slot, 8)
        if off >= 0:
            log_arena(mem, table, q[Q_LOG_OFF], q[Q_LOG_SIZE], off, 8)
    if q[Q_DIRECT]:
        off = q[Q_USED_AT] + 2
    else:
        off, _room = translate(table, SPACE_UVA_W, q[Q_USED] + 2, 2)
    if off >= 0:
        log_arena(mem, table, q[Q_LOG_OFF], q[Q_LOG_SIZE], off, 2)


@helper
def flush_used(q, avail, used16, mem, table, new_used):
    """Publish ``new_used`` and signal the driver if it asked to be (flags or EVENT_IDX)."""
    old = q[Q_USED_IDX]
    if new_used == old:
        return True
    if not publish_used(q, used16, mem, table, new_used):
        return False
    if q[Q_LOG_SIZE]:  # the entries and the index just written
        log_used(q, mem, table, old, new_used)
    q[Q_USED_IDX] = new_used & 0xFFFF
    fence_full()  # the driver's flags/used_event must be read after the index store is visible
    flags, event = read_avail_flags_event(q, avail, mem, table)
    if flags < 0:
        return False
    if q[Q_EVENT_IDX]:
        # like vhost_notify(): compare against the index at the last signal, not the last publish
        last, valid = q[Q_SIGNALLED], q[Q_SIGNALLED_VALID]
        q[Q_SIGNALLED] = new_used & 0xFFFF
        q[Q_SIGNALLED_VALID] = 1
        signal = (not valid) or need_event(event, new_used, last)
    else:
        signal = (flags & VRING_AVAIL_F_NO_INTERRUPT) == 0
    if signal:
        if q[Q_CALLFD] >= 0:
            q[Q_CALLS] += 1
            eventfd_write(q[Q_CALLFD], 1)
        else:
            q[Q_CALL_MISSED] = 1  # told once a call fd comes (backend.py, SET_VRING_CALL)
    return True


#: the polling routine (``ring.poll``) for this layout, one ring and a pair of rings
poll_avail, poll_avail_pair = make_poll(look_avail, set_notify)
