"""virtio-net kernels for packed rings: the same three modes, loops and counters as the split kernels in
``devices/net.py``, over ``ring/packed.py``.

A pass takes chains while the descriptor at the avail cursor is available -- at most ``Q_BATCH`` chains and at
most the descriptors the ring can have in flight -- collecting their used descriptors in ``shadow``, then
writes them all at once (the first one's flags last) and advances the cursors.  Every chain taken in a pass is
completed in that pass, so a stopped worker leaves nothing in flight and GET_VRING_BASE's used cursor equals
the avail one.  The avail cursor moves (and the chains are counted) only once their used descriptors are
published: if the batch cannot be written (part of the ring unmapped) the queue breaks with its chains still
available, never taken without being completed.  A pass takes nothing once the ring holds as many descriptors
in flight as it can (a driver that makes more available is not followed).
"""

from __future__ import annotations

import numpy as np

from ..access import _NO_U16, _NO_U64
from ..jit import helper, inline_helper, kernel
from ..memory import GuestMemory
from ..ring.chain import READ_ONLY, WRITE_ONLY, log_segments, new_sg, sg_put, sg_sum, sg_write
from ..ring.packed import (
    NOT_AVAIL,
    SH_ID,
    SH_LEN,
    SH_NDESC,
    advance,
    flush_used,
    in_flight,
    new_packed_state,
    new_shadow,
    poll_head,
    poll_head_pair,
    read_head,
    walk_packed,
)
from ..ring.poll import POLL_AGAIN, POLL_IDLE
from ..ring.state import (
    Q_AVAIL_WRAP,
    Q_BATCH,
    Q_BYTES,
    Q_CHAINS,
    Q_DROPS,
    Q_HDR_LEN,
    Q_LAST_AVAIL,
    Q_LIMIT,
    Q_LOG_SIZE,
    Q_MRG,
    Q_PACKETS,
    Q_SEQ,
    Q_SIZE,
    Q_STOP,
)
from .base import Step
from .net_frame import SEQ_LEN, SEQ_OFF, frame_sum, stamp

_IDLE, _MORE, _STOPPED, _BROKEN = int(Step.IDLE), int(Step.MORE), int(Step.STOPPED), int(Step.BROKEN)


@helper
def _counters(q):
    """The counters a pass changes, to restore if its chains are not completed."""
    return q[Q_PACKETS], q[Q_BYTES], q[Q_DROPS]


@helper
def _end_pass(q, drv, desc, mem, table, shadow, n, pos, wrap, counters):
    """Complete the ``n`` chains a pass took (their used descriptors in ``shadow``), the avail cursor then at
    ``pos``/``wrap``: publish them, then move the avail cursor and count them.  If they cannot be published
    the cursor and the counters (``counters``, from ``_counters`` at the start of the pass) stay as the pass
    found them.  Returns (published, ok) as flush_used does."""
    published, ok = flush_used(q, drv, desc, mem, table, shadow, n)
    if published:
        q[Q_LAST_AVAIL] = pos
        q[Q_AVAIL_WRAP] = wrap
        q[Q_CHAINS] += n
    else:
        q[Q_PACKETS], q[Q_BYTES], q[Q_DROPS] = counters
    return published, ok


@helper
def _room(q, shadow):
    """(descriptors, chains) one pass may take."""
    return q[Q_SIZE] - in_flight(q), min(q[Q_BATCH], shadow.shape[0])


@kernel
def tx_sink(q, desc, drv, dev, mem, table, sg, shadow, budget, spins):
    """Consume TX chains: count packets and bytes (after the header), complete each with length 0."""
    hdr = q[Q_HDR_LEN]
    size = q[Q_SIZE]
    for _ in range(budget):
        if q[Q_STOP]:
            return _STOPPED
        f = poll_head(q, desc, dev, mem, table, spins, True)
        if f < 0:  # nothing to take now (or broken): one test on the path with work
            if f == POLL_AGAIN:
                continue
            return _IDLE if f == POLL_IDLE else _BROKEN
        room, nmax = _room(q, shadow)
        pos, wrap = q[Q_LAST_AVAIL], q[Q_AVAIL_WRAP]
        counters = _counters(q)
        taken = 0
        done = 0
        status = _MORE
        while done < nmax and taken < room:
            nread, nseg, rbytes, wbytes, ndesc, bid = walk_packed(
                q, desc, mem, table, pos, wrap, f, sg, READ_ONLY, room - taken
            )
            if nread < 0:
                status = _BROKEN
                break
            shadow[done, SH_ID] = bid
            shadow[done, SH_LEN] = 0
            shadow[done, SH_NDESC] = ndesc
            # counted as taken; _end_pass takes the count back if the chain is not completed
            if rbytes < hdr:
                q[Q_DROPS] += 1  # too short for the virtio-net header: dropped, still completed
            else:
                q[Q_PACKETS] += 1
                q[Q_BYTES] += rbytes - hdr
            done += 1
            taken += ndesc
            pos, wrap = advance(pos, wrap, ndesc, size)
            if done >= nmax or taken >= room:
                break
            f = read_head(q, desc, mem, table, pos, wrap)
            if f < 0:
                if f == -1:
                    status = _BROKEN
                break
        # chains handled before a fault are still completed: no completion is lost
        _published, ok = _end_pass(q, drv, desc, mem, table, shadow, done, pos, wrap, counters)
        if not ok or status == _BROKEN:
            return _BROKEN
    return _MORE


@kernel
def tx_read(q, desc, drv, dev, mem, table, sg, shadow, csum, budget, spins):
    """``tx_sink`` that also reads every payload byte: their sum accumulates in ``csum[0]``."""
    hdr = q[Q_HDR_LEN]
    size = q[Q_SIZE]
    for _ in range(budget):
        if q[Q_STOP]:
            return _STOPPED
        f = poll_head(q, desc, dev, mem, table, spins, True)
        if f < 0:  # nothing to take now (or broken): one test on the path with work
            if f == POLL_AGAIN:
                continue
            return _IDLE if f == POLL_IDLE else _BROKEN
        room, nmax = _room(q, shadow)
        pos, wrap = q[Q_LAST_AVAIL], q[Q_AVAIL_WRAP]
        counters = _counters(q)
        taken = 0
        done = 0
        status = _MORE
        while done < nmax and taken < room:
            nread, nseg, rbytes, wbytes, ndesc, bid = walk_packed(
                q, desc, mem, table, pos, wrap, f, sg, READ_ONLY, room - taken
            )
            if nread < 0:
                status = _BROKEN
                break
            shadow[done, SH_ID] = bid
            shadow[done, SH_LEN] = 0
            shadow[done, SH_NDESC] = ndesc
            # counted as taken; _end_pass takes the count back if the chain is not completed
            if rbytes < hdr:
                q[Q_DROPS] += 1  # too short for the virtio-net header: dropped, still completed
            else:
                q[Q_PACKETS] += 1
                q[Q_BYTES] += rbytes - hdr
                csum[0] += sg_sum(mem, sg, 0, nread, hdr)
            done += 1
            taken += ndesc
            pos, wrap = advance(pos, wrap, ndesc, size)
            if done >= nmax or taken >= room:
                break
            f = read_head(q, desc, mem, table, pos, wrap)
            if f < 0:
                if f == -1:
                    status = _BROKEN
                break
        # chains handled before a fault are still completed: no completion is lost
        _published, ok = _end_pass(q, drv, desc, mem, table, shadow, done, pos, wrap, counters)
        if not ok or status == _BROKEN:
            return _BROKEN
    return _MORE


@inline_helper
def rx_deliver(q, desc, mem, table, sgs, hdrbuf, src, length, shadow, k, nmax, pos, wrap, taken, room):
    """Put one frame (virtio_net_hdr + ``length`` bytes of ``src``: a frame array or a TX chain's segments, see
    ``sg_put``) into RX chains from the cursor ``pos``/``wrap``, their used descriptors into ``shadow[k:]``.

    Returns (chains used, cursor, descriptors taken): chains > 0, or 0 if the chains available (or the room
    left in this pass) are not enough -- the cursor is then unchanged and nothing is consumed -- or -1 if the
    queue broke.  Without MRG_RXBUF a chain too small for the frame is completed empty and counted as a drop.
    """
    hdr = q[Q_HDR_LEN]
    size = q[Q_SIZE]
    total = hdr + length
    done = 0
    c = 0
    first_nseg = 0
    p, w, t = pos, wrap, taken
    while done < total:
        if k + c >= nmax or t >= room:
            return 0, pos, wrap, taken
        f = read_head(q, desc, mem, table, p, w)
        if f == -1:
            return -1, pos, wrap, taken
        if f == NOT_AVAIL:
            return 0, pos, wrap, taken
        sg = sgs[0] if c == 0 else sgs[1]
        nread, nseg, rbytes, wbytes, ndesc, bid = walk_packed(q, desc, mem, table, p, w, f, sg, WRITE_ONLY, room - t)
        if nread < 0:
            return -1, pos, wrap, taken
        if c == 0:
            if wbytes < hdr or (q[Q_MRG] == 0 and wbytes < total):
                shadow[k, SH_ID] = bid
                shadow[k, SH_LEN] = 0
                shadow[k, SH_NDESC] = ndesc
                q[Q_DROPS] += 1
                p, w = advance(p, w, ndesc, size)
                return 1, p, w, t + ndesc
            # header first (num_buffers = 1; patched below if the frame needs more buffers), then the frame
            if sg[0, 1] >= hdr:
                o = sg[0, 0]
                for b in range(hdr):
                    mem[o + b] = 0
                if hdr >= 12:
                    mem[o + 10] = 1
            else:
                for b in range(hdr):
                    hdrbuf[b] = 0
                if hdr >= 12:
                    hdrbuf[10] = 1
                sg_write(mem, sg, 0, nseg, 0, hdrbuf, 0, hdr)
            wr = sg_put(mem, sg, 0, nseg, hdr, src, 0, min(length, wbytes - hdr))
            chain_len = hdr + wr
            first_nseg = nseg
        else:
            chain_len = sg_put(mem, sg, 0, nseg, 0, src, done - hdr, min(total - done, wbytes))
        done += chain_len
        if q[Q_LOG_SIZE]:  # dirty logging: after the data, before the used entry
            log_segments(q, mem, table, sg, 0, nseg, chain_len)
        shadow[k + c, SH_ID] = bid
        shadow[k + c, SH_LEN] = chain_len
        shadow[k + c, SH_NDESC] = ndesc
        p, w = advance(p, w, ndesc, size)
        t += ndesc
        c += 1
    if c > 1 and hdr >= 12:
        hdrbuf[0] = c & 0xFF
        hdrbuf[1] = c >> 8
        sg_write(mem, sgs[0], 0, first_nseg, 10, hdrbuf, 0, 2)  # num_buffers
        if q[Q_LOG_SIZE]:
            log_segments(q, mem, table, sgs[0], 0, first_nseg, 12)
    q[Q_PACKETS] += 1
    q[Q_BYTES] += length
    return c, p, w, t


@kernel
def rx_source(q, desc, drv, dev, mem, table, sgs, shadow, hdrbuf, frame, budget, spins):
    """Fill RX chains with copies of ``frame`` (at most q[Q_LIMIT] packets if that is not -1), each stamped
    with its sequence number and UDP checksum if q[Q_SEQ] (net_frame.py; ``frame`` is then the step's own
    copy)."""
    numbered = q[Q_SEQ] != 0 and frame.shape[0] >= SEQ_OFF + SEQ_LEN
    base = frame_sum(frame, frame.shape[0]) if numbered else 0
    for _ in range(budget):
        if q[Q_STOP]:
            return _STOPPED
        want = q[Q_LIMIT] < 0 or q[Q_PACKETS] < q[Q_LIMIT]  # a source at its limit produces no more
        f = poll_head(q, desc, dev, mem, table, spins, want)
        if f < 0:  # nothing to take now (or broken): one test on the path with work
            if f == POLL_AGAIN:
                continue
            return _IDLE if f == POLL_IDLE else _BROKEN
        room, nmax = _room(q, shadow)
        pos, wrap = q[Q_LAST_AVAIL], q[Q_AVAIL_WRAP]
        counters = _counters(q)
        taken = 0
        k = 0
        status = _MORE
        while q[Q_LIMIT] < 0 or q[Q_PACKETS] < q[Q_LIMIT]:
            if numbered:
                stamp(frame, base, q[Q_PACKETS])
            c, pos, wrap, taken = rx_deliver(
                q, desc, mem, table, sgs, hdrbuf, frame, frame.shape[0], shadow, k, nmax, pos, wrap, taken, room
            )
            if c < 0:
                status = _BROKEN
                break
            if c == 0:
                break
            k += c
        _published, ok = _end_pass(q, drv, desc, mem, table, shadow, k, pos, wrap, counters)
        if not ok or status == _BROKEN:
            return _BROKEN
    return _MORE


@kernel
def loopback(
    rq,
    rdesc,
    rdrv,
    rdev,
    tq,
    tdesc,
    tdrv,
    tdev,
    mem,
    table,
    tsg,
    rsgs,
    rshadow,
    tshadow,
    hdrbuf,
    max_frame,
    budget,
    spins,
):
    """Move each TX frame to the paired RX queue, copied once from the TX buffers into the RX buffers (frames
    longer than ``max_frame`` are dropped).  A TX chain is taken only when RX has room for it."""
    hdr = tq[Q_HDR_LEN]
    tsize = tq[Q_SIZE]
    for _ in range(budget):
        if tq[Q_STOP] or rq[Q_STOP]:
            return _STOPPED
        ft, fr = poll_head_pair(tq, tdesc, tdev, rq, rdesc, rdev, mem, table, spins)
        if ft < 0:  # nothing to take now (or broken): one test on the path with work
            if ft == POLL_AGAIN:
                continue
            return _IDLE if ft == POLL_IDLE else _BROKEN
        troom, tmax = _room(tq, tshadow)
        rroom, rmax = _room(rq, rshadow)
        tpos, twrap = tq[Q_LAST_AVAIL], tq[Q_AVAIL_WRAP]
        rpos, rwrap = rq[Q_LAST_AVAIL], rq[Q_AVAIL_WRAP]
        tcounters = _counters(tq)
        rcounters = _counters(rq)
        ttaken = 0
        rtaken = 0
        t = 0
        r = 0
        moved = 0  # frames of this pass delivered to RX chains, and their bytes
        moved_bytes = 0
        status = _MORE
        while t < tmax and ttaken < troom:
            nread, nseg, rbytes, wbytes, ndesc, bid = walk_packed(
                tq, tdesc, mem, table, tpos, twrap, ft, tsg, READ_ONLY, troom - ttaken
            )
            if nread < 0:
                status = _BROKEN
                break
            if rbytes < hdr or rbytes - hdr > max_frame:
                tq[Q_DROPS] += 1
            else:
                length = rbytes - hdr  # copied once, from the TX segments after the header into RX
                c, rpos, rwrap, rtaken = rx_deliver(
                    rq,
                    rdesc,
                    mem,
                    table,
                    rsgs,
                    hdrbuf,
                    (tsg, 0, nread, hdr),
                    length,
                    rshadow,
                    r,
                    rmax,
                    rpos,
                    rwrap,
                    rtaken,
                    rroom,
                )
                if c < 0:
                    status = _BROKEN
                    break
                if c == 0:
                    break  # RX full: leave this TX chain for the next pass
                r += c
                moved += 1
                moved_bytes += length
                tq[Q_PACKETS] += 1
                tq[Q_BYTES] += length
            tshadow[t, SH_ID] = bid
            tshadow[t, SH_LEN] = 0
            tshadow[t, SH_NDESC] = ndesc
            t += 1
            ttaken += ndesc
            tpos, twrap = advance(tpos, twrap, ndesc, tsize)
            if t >= tmax or ttaken >= troom:
                break
            ft = read_head(tq, tdesc, mem, table, tpos, twrap)
            if ft < 0:
                if ft == -1:
                    status = _BROKEN
                break
        # TX first, then RX even if TX broke after publishing: the chains taken are completed (no completion is
        # lost).  RX publishes only frames whose TX chains were completed; frames whose RX batch could not be
        # published are TX drops.
        tpub, tok = _end_pass(tq, tdrv, tdesc, mem, table, tshadow, t, tpos, twrap, tcounters)
        if tpub:
            rpub, rok = _end_pass(rq, rdrv, rdesc, mem, table, rshadow, r, rpos, rwrap, rcounters)
            if not rpub:
                tq[Q_PACKETS] -= moved
                tq[Q_BYTES] -= moved_bytes
                tq[Q_DROPS] += moved
        else:
            rok = True
            rq[Q_PACKETS], rq[Q_BYTES], rq[Q_DROPS] = rcounters
        if not tok or not rok or status == _BROKEN:
            return _BROKEN
    return _MORE


# ---------------------------------------------------------------------------------------------------------
def make_step(mode: str, rings: list, spins: int, frame: np.ndarray, max_frame: int, csum: np.ndarray | None = None):
    """The step function of one NetDevice worker over packed rings (NetDevice.make_step dispatches here);
    ``csum``: sink-read's checksum of the payload bytes read."""

    mem = rings[0].mem
    views, table = mem.arena.view, mem.table
    if mode == "sink":
        (tx,) = rings
        size = int(tx.q[Q_SIZE])
        args = (tx.q, *tx.views.args(), views, table, new_sg(size), new_shadow(size))
        return lambda budget: tx_sink(*args, budget, spins)
    if mode == "sink-read":
        (tx,) = rings
        size = int(tx.q[Q_SIZE])
        args = (tx.q, *tx.views.args(), views, table, new_sg(size), new_shadow(size), csum)
        return lambda budget: tx_read(*args, budget, spins)
    if mode == "source":
        (rx,) = rings
        size = int(rx.q[Q_SIZE])
        sgs = np.stack([new_sg(size)] * 2)
        args = (rx.q, *rx.views.args(), views, table, sgs, new_shadow(size), np.zeros(16, np.uint8), frame)
        return lambda budget: rx_source(*args, budget, spins)
    rx, tx = rings
    rsize, tsize = int(rx.q[Q_SIZE]), int(tx.q[Q_SIZE])
    rsgs = np.stack([new_sg(rsize)] * 2)
    args = (
        rx.q,
        *rx.views.args(),
        tx.q,
        *tx.views.args(),
        views,
        table,
        new_sg(tsize),
        rsgs,
        new_shadow(rsize),
        new_shadow(tsize),
        np.zeros(16, np.uint8),
        max_frame,
    )
    return lambda budget: loopback(*args, budget, spins)


def warm_up() -> None:
    """Compile (or load from the on-disk cache) the packed kernels on a tiny stopped ring."""

    mem = GuestMemory(arena_size=1 << 21)
    try:
        q = new_packed_state(1)
        q[Q_STOP] = 1  # return at once
        ring = (_NO_U64, _NO_U16, _NO_U16)
        sg = new_sg(1)
        sgs = np.stack([sg, sg])
        sh = new_shadow(1)
        tx_sink(q, *ring, mem.arena.view, mem.table, sg, sh, 1, 1)
        tx_read(q, *ring, mem.arena.view, mem.table, sg, sh, np.zeros(1, np.uint64), 1, 1)
        rx_source(q, *ring, mem.arena.view, mem.table, sgs, sh, np.zeros(16, np.uint8), np.zeros(64, np.uint8), 1, 1)
        loopback(
            q,
            *ring,
            q,
            *ring,
            mem.arena.view,
            mem.table,
            sg,
            sgs,
            sh,
            sh,
            np.zeros(16, np.uint8),
            16,
            1,
            1,
        )
    finally:
        mem.close()
