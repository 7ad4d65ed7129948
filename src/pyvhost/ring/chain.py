"""Descriptor chain walking (split rings): from a head index to a scatter list of guest buffers.

Every value read from the guest is read once into a local and bounded before use:

* indices (``head``, ``next``) are checked against the table size; the walk stops after ``size`` descriptors
  (main table) or ``len/16`` (indirect table), so a loop cannot make it run forever;
* an indirect table must have a non-zero length that is a multiple of 16, lie whole in one region, not be
  nested, and not be combined with NEXT;
* each buffer must have a non-zero length and lie in guest memory (it is split at region boundaries);
* device-readable buffers must come before device-writable ones, and the caller may demand one direction.

The scatter list ``sg`` is an int64 array (capacity, 2) of (arena offset, length) rows; its capacity bounds
the segments a chain may produce.  Errors mark the queue broken (``fail``) and return ``nread = -1``.
"""

from __future__ import annotations

import numpy as np
from numba.core import types
from numba.extending import overload

from ..atomic import copy_bytes, ld64
from ..dirtylog import log_arena
from ..errors import QueueError
from ..jit import helper, inline_helper, kernel
from ..memory import SPACE_GPA, SPACE_GPA_W, translate
from ..protocol import ADDR_LIMIT
from .split import DESC_SIZE, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, fail, read_desc
from .state import Q_ERROR, Q_FAULT_LEN, Q_FAULT_WRITE, Q_LOG_OFF, Q_LOG_SIZE, Q_SIZE

#: Direction a caller demands of a chain.
ANY = 0
READ_ONLY = 1
WRITE_ONLY = 2
#: Most entries of one indirect table (Linux vhost bounds chains by UIO_MAXIOV = 1024).
MAX_INDIRECT = 1024
SG_COLUMNS = 2
_ADDR_LIMIT = np.uint64(ADDR_LIMIT)  # compare guest u64 values against a u64 (no float promotion)


def new_sg(queue_size: int) -> np.ndarray:
    """Scatter list big enough for any valid chain of a queue of this size."""
    return np.zeros((queue_size + MAX_INDIRECT, SG_COLUMNS), dtype=np.int64)


@helper
def add_buffer(q, mem, table, sg, n, addr, length, space):
    """Append guest buffer [addr, addr+length) to ``sg`` from row ``n``; return the new row count or -1.
    ``space`` is SPACE_GPA for a buffer the device reads, SPACE_GPA_W for one it writes (behind a vIOMMU the
    two hold the IOVAs mapped readable and writable)."""
    if length == 0:
        return fail(q, QueueError.ZERO_LENGTH, addr)
    if addr >= _ADDR_LIMIT:
        return fail(q, QueueError.BAD_ADDRESS, addr)
    a = np.int64(addr)
    rem = np.int64(length)
    while rem > 0:
        if n >= sg.shape[0]:
            return fail(q, QueueError.CHAIN_TOO_LONG, n)
        off, room = translate(table, space, a, 1)
        if off < 0:
            if q[Q_ERROR] == 0:
                q[Q_FAULT_WRITE] = 1 if space == SPACE_GPA_W else 0
                q[Q_FAULT_LEN] = 1
            return fail(q, QueueError.BAD_ADDRESS, a)
        take = min(rem, room)
        sg[n, 0] = off
        sg[n, 1] = take
        n += 1
        a += take
        rem -= take
    return n


@inline_helper
def walk_chain(q, desc, mem, table, head, sg, want):
    """Walk the chain starting at ``head``.

    Returns (nread, nseg, rbytes, wbytes): ``sg[:nread]`` are device-readable segments, ``sg[nread:nseg]``
    device-writable ones.  ``nread == -1`` means the queue is now broken (q[Q_ERROR] says why).
    """
    size = q[Q_SIZE]
    bad = (np.int64(-1), np.int64(0), np.int64(0), np.int64(0))
    if head < 0 or head >= size:
        fail(q, QueueError.HEAD_OUT_OF_RANGE, head)
        return bad
    n = np.int64(0)
    nread = np.int64(0)
    rbytes = np.int64(0)
    wbytes = np.int64(0)
    idx = np.int64(head)
    count = 0
    while True:
        count += 1
        if count > size:
            fail(q, QueueError.CHAIN_TOO_LONG, head)
            return bad
        addr, word, ok = read_desc(q, desc, mem, table, idx)
        if not ok:
            return bad
        length = np.int64(word & np.uint64(0xFFFFFFFF))
        flags = np.int64((word >> np.uint64(32)) & np.uint64(0xFFFF))
        nxt = np.int64(word >> np.uint64(48))
        if flags & VRING_DESC_F_INDIRECT:
            if flags & VRING_DESC_F_NEXT:
                fail(q, QueueError.INDIRECT_WITH_NEXT, idx)
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
            cnt = length // DESC_SIZE
            j = np.int64(0)
            steps = 0
            while True:
                steps += 1
                if steps > cnt:
                    fail(q, QueueError.CHAIN_TOO_LONG, head)
                    return bad
                eaddr = ld64(mem, base + DESC_SIZE * j)
                eword = ld64(mem, base + DESC_SIZE * j + 8)
                elen = np.int64(eword & np.uint64(0xFFFFFFFF))
                eflags = np.int64((eword >> np.uint64(32)) & np.uint64(0xFFFF))
                enext = np.int64(eword >> np.uint64(48))
                if eflags & VRING_DESC_F_INDIRECT:
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
                if not (eflags & VRING_DESC_F_NEXT):
                    break
                if enext >= cnt:
                    fail(q, QueueError.NEXT_OUT_OF_RANGE, enext)
                    return bad
                j = enext
            return nread, n, rbytes, wbytes
        writable = (flags & VRING_DESC_F_WRITE) != 0
        if (writable and want == READ_ONLY) or (not writable and (want == WRITE_ONLY or n > nread)):
            fail(q, QueueError.BAD_DIRECTION, idx)
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
            return nread, n, rbytes, wbytes
        if nxt >= size:
            fail(q, QueueError.NEXT_OUT_OF_RANGE, nxt)
            return bad
        idx = nxt


@helper
def sg_write(mem, sg, first, last, dst_off, src, src_off, length):
    """Copy ``src[src_off:src_off+length]`` into segments ``sg[first:last]`` starting ``dst_off`` bytes in.
    Returns the bytes written (less than ``length`` if the segments are too short)."""
    done = 0
    skip = dst_off
    for i in range(first, last):
        seg_len = sg[i, 1]
        if skip >= seg_len:
            skip -= seg_len
            continue
        o = sg[i, 0] + skip
        take = min(seg_len - skip, length - done)
        copy_bytes(mem, o, src, src_off + done, take)
        done += take
        skip = 0
        if done == length:
            break
    return done


@helper
def sg_read(mem, sg, first, last, src_off, dst, length):
    """Copy up to ``length`` bytes starting ``src_off`` bytes into ``sg[first:last]`` into ``dst``."""
    done = 0
    skip = src_off
    for i in range(first, last):
        seg_len = sg[i, 1]
        if skip >= seg_len:
            skip -= seg_len
            continue
        o = sg[i, 0] + skip
        take = min(seg_len - skip, length - done)
        copy_bytes(dst, done, mem, o, take)
        done += take
        skip = 0
        if done == length:
            break
    return done


@helper
def sg_copy(mem, dst, dfirst, dlast, dst_off, src, sfirst, slast, src_off, length):
    """Copy ``length`` bytes starting ``src_off`` bytes into segments ``src[sfirst:slast]`` to ``dst_off`` bytes
    into segments ``dst[dfirst:dlast]``, both of ``mem`` (one copy, no bounce buffer).  Returns the bytes copied
    (less than ``length`` if either side is too short).  Segments a driver made overlap get bytes of either
    side, never an access outside them."""
    i = dfirst
    dskip = dst_off
    while i < dlast and dskip >= dst[i, 1]:
        dskip -= dst[i, 1]
        i += 1
    j = sfirst
    sskip = src_off
    while j < slast and sskip >= src[j, 1]:
        sskip -= src[j, 1]
        j += 1
    done = 0
    while done < length and i < dlast and j < slast:
        take = min(length - done, dst[i, 1] - dskip, src[j, 1] - sskip)
        copy_bytes(mem, dst[i, 0] + dskip, mem, src[j, 0] + sskip, take)
        done += take
        dskip += take
        sskip += take
        if dskip == dst[i, 1]:
            i += 1
            dskip = 0
        if sskip == src[j, 1]:
            j += 1
            sskip = 0
    return done


#: Byte lanes of a word summed pairwise into 16-bit lanes (SWAR): each word adds at most 2 x 255 to a lane, so a
#: lane holds the sums of ``_FOLD_WORDS`` words (128 x 510 < 65536) before it is folded into the total.
_LO_BYTES = np.uint64(0x00FF00FF00FF00FF)
_LO_HALVES = np.uint64(0x0000FFFF0000FFFF)
_LO_WORD = np.uint64(0xFFFFFFFF)
_FOLD_WORDS = 128


@helper
def byte_sum(mem, off, n):
    """The sum of the ``n`` bytes ``mem[off:off+n]`` (uint64), read 8 bytes at a time: the bytes up to the next
    8-byte boundary and after the last whole word one by one, the words between as a uint64 view whose bytes
    are added in 16-bit lanes, folded every ``_FOLD_WORDS`` words -- a loop LLVM turns into vector code.
    Indices are unsigned, so Numba emits no negative-index fix-up (which would make the loop gather)."""
    total = np.uint64(0)
    end = off + n
    a = min(end, off + ((-(mem.ctypes.data + off)) & 7))  # the first byte at an 8-aligned address
    for b in range(off, a):
        total += np.uint64(mem[np.uint64(b)])
    nw = (end - a) >> 3
    if nw > 0:
        words = mem[a : a + 8 * nw].view(np.uint64)
        i = 0
        while i < nw:
            stop = min(nw, i + _FOLD_WORDS)
            lanes = np.uint64(0)
            for j in range(i, stop):
                w = words[np.uint64(j)]
                lanes += (w & _LO_BYTES) + ((w >> np.uint64(8)) & _LO_BYTES)
            lanes = (lanes & _LO_HALVES) + ((lanes >> np.uint64(16)) & _LO_HALVES)
            total += (lanes & _LO_WORD) + (lanes >> np.uint64(32))
            i = stop
        a += 8 * nw
    for b in range(a, end):
        total += np.uint64(mem[np.uint64(b)])
    return total


@helper
def sg_sum(mem, sg, first, last, src_off):
    """The sum of every byte of segments ``sg[first:last]`` from ``src_off`` bytes in (a sink that reads the
    payload, as a copy would)."""
    total = np.uint64(0)
    skip = src_off
    for i in range(first, last):
        seg_len = sg[i, 1]
        if skip >= seg_len:
            skip -= seg_len
            continue
        total += byte_sum(mem, sg[i, 0] + skip, seg_len - skip)
        skip = 0
    return total


def sg_put(mem, sg, first, last, dst_off, src, src_off, length):
    """Copy ``length`` bytes of a source, from ``src_off`` on, into segments ``sg[first:last]`` from ``dst_off``
    on; returns the bytes written.  The source is a frame (a uint8 array: :func:`sg_write`) or another chain's
    segments in ``mem``, the tuple (segments, first, last, offset) (:func:`sg_copy`).  Compiled code only: the
    source's type picks the copy when the caller is compiled."""
    raise NotImplementedError("sg_put is called from compiled code only")


@overload(sg_put, inline="always")
def _sg_put(mem, sg, first, last, dst_off, src, src_off, length):
    if isinstance(src, types.Array):

        def from_frame(mem, sg, first, last, dst_off, src, src_off, length):
            return sg_write(mem, sg, first, last, dst_off, src, src_off, length)

        return from_frame

    def from_chain(mem, sg, first, last, dst_off, src, src_off, length):
        ssg, sfirst, slast, sbase = src
        return sg_copy(mem, sg, first, last, dst_off, ssg, sfirst, slast, sbase + src_off, length)

    return from_chain


@helper
def log_segments(q, mem, table, sg, first, last, length):
    """Dirty logging (invariant 7) of what a device wrote into a chain: the first ``length`` bytes of segments
    ``sg[first:last]`` (all of them if ``length`` < 0).  Call it after the data is written, before the used
    entry is published; nothing happens while logging is off."""
    if q[Q_LOG_SIZE] == 0:
        return
    left = length
    for i in range(first, last):
        if left == 0:
            break
        n = sg[i, 1] if left < 0 else min(sg[i, 1], left)
        log_arena(mem, table, q[Q_LOG_OFF], q[Q_LOG_SIZE], sg[i, 0], n)
        if left > 0:
            left -= n


@kernel
def log_rows(q, mem, table, rows, n):
    """:func:`log_segments` of the first ``n`` (arena offset, length) rows of ``rows``, whole, for devices
    whose buffers are written outside compiled code (a ChainDevice's memoryviews, a tap's readv)."""
    log_segments(q, mem, table, rows, 0, n, -1)
