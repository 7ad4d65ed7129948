"""virtio-net (virtio 1.2 §5.1): queue 2k receives, 2k+1 transmits.

Modes: ``sink`` counts and drops what the driver transmits (reading no payload); ``sink-read`` also reads
every payload byte (a checksum of them in the device's stats, the work a copy into a packet buffer does);
``source`` fills receive buffers with generated frames
(and consumes what the driver transmits, as ``sink`` does); ``loopback`` returns each transmitted frame on the
paired receive queue.  The datapath is compiled: each kernel runs up to ``budget`` passes of at most ``Q_BATCH``
chains per ring, polls ``spins`` empty passes before asking for kicks, and publishes used entries once per pass.
"""

from __future__ import annotations

import enum
import struct

import numpy as np

from ..access import _NO_U16, _NO_U32, _NO_U64
from ..jit import inline_helper, kernel
from ..memory import GuestMemory
from ..ring.chain import READ_ONLY, WRITE_ONLY, log_segments, new_sg, sg_put, sg_sum, sg_write, walk_chain
from ..ring.poll import POLL_AGAIN, POLL_IDLE
from ..ring.split import flush_used, poll_avail, poll_avail_pair, read_avail_entry, write_used
from ..ring.state import (
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
    Q_STOP,
    Q_USED_IDX,
    new_queue_state,
)
from . import net_packed
from .base import VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, Device, Ring, Step, StepFn
from .net_frame import SEQ_LEN, SEQ_OFF, frame_sum, stamp

VIRTIO_ID_NET = 1
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_S_LINK_UP = 1
#: virtio_net_hdr with num_buffers (VERSION_1 or MRG_RXBUF), and the legacy one without it
NET_HDR_LEN = 12
NET_HDR_LEN_LEGACY = 10
#: Largest frame the loopback carries (64 KiB GSO frames and their header).
MAX_FRAME = 65536 + 64
#: Header length of a disabled TX queue's sink: longer than any chain, so every frame counts as a drop.
DISCARD_HDR_LEN = 1 << 62

_IDLE, _MORE, _STOPPED, _BROKEN = int(Step.IDLE), int(Step.MORE), int(Step.STOPPED), int(Step.BROKEN)


class Mode(str, enum.Enum):
    SINK = "sink"
    SINK_READ = "sink-read"
    SOURCE = "source"
    LOOPBACK = "loopback"


def make_frame(size: int, seq: int = 0) -> np.ndarray:
    """A UDP/IPv4 Ethernet frame of ``size`` bytes (≥ 60) from 02:00:00:00:00:01 to 02:00:00:00:00:02."""
    size = max(size, 60)
    eth = bytes.fromhex("0200000000020200000000010800")
    ip_len = size - 14
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, ip_len, seq & 0xFFFF, 0, 64, 17, 0, bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])
    )
    csum = sum(struct.unpack("!10H", ip))
    csum = (csum & 0xFFFF) + (csum >> 16)
    csum = ~((csum & 0xFFFF) + (csum >> 16)) & 0xFFFF
    ip = ip[:10] + struct.pack("!H", csum) + ip[12:]
    udp = struct.pack("!HHHH", 9, 9, ip_len - 20, 0)
    body = eth + ip + udp
    return np.frombuffer(body + bytes(size - len(body)), dtype=np.uint8).copy()


# ---------------------------------------------------------------------------------------------------------
# compiled datapath
@kernel
def tx_sink(q, desc, avail, used16, used32, mem, table, sg, budget, spins):
    """Consume TX chains: count packets and bytes (after the header), complete each with length 0."""
    hdr = q[Q_HDR_LEN]
    for _ in range(budget):
        if q[Q_STOP]:
            return _STOPPED
        n = poll_avail(q, avail, used16, mem, table, spins, True)
        if n < 0:  # nothing to take now (or broken): one test on the path with work
            if n == POLL_AGAIN:
                continue
            return _IDLE if n == POLL_IDLE else _BROKEN
        n = min(n, q[Q_BATCH])
        last = q[Q_LAST_AVAIL]
        used = q[Q_USED_IDX]
        done = 0
        status = _MORE
        for k in range(n):
            head = read_avail_entry(q, avail, mem, table, last + k)
            if head < 0:
                status = _BROKEN
                break
            nread, nseg, rbytes, wbytes = walk_chain(q, desc, mem, table, head, sg, READ_ONLY)
            if nread < 0:
                status = _BROKEN
                break
            if not write_used(q, used32, mem, table, used + k, head, 0):
                status = _BROKEN
                break
            # counted once completed (a chain left behind by a fault is not counted)
            if rbytes < hdr:
                q[Q_DROPS] += 1  # too short for the virtio-net header: dropped, still completed
            else:
                q[Q_PACKETS] += 1
                q[Q_BYTES] += rbytes - hdr
            done += 1
        # chains handled before a fault are still completed: no completion is lost
        q[Q_LAST_AVAIL] = (last + done) & 0xFFFF
        q[Q_CHAINS] += done
        if not flush_used(q, avail, used16, mem, table, (used + done) & 0xFFFF):
            return _BROKEN
        if status == _BROKEN:
            return _BROKEN
    return _MORE


@kernel
def tx_read(q, desc, avail, used16, used32, mem, table, sg, csum, budget, spins):
    """``tx_sink`` that also reads every payload byte: their sum accumulates in ``csum[0]``."""
    hdr = q[Q_HDR_LEN]
    for _ in range(budget):
        if q[Q_STOP]:
            return _STOPPED
        n = poll_avail(q, avail, used16, mem, table, spins, True)
        if n < 0:  # nothing to take now (or broken): one test on the path with work
            if n == POLL_AGAIN:
                continue
            return _IDLE if n == POLL_IDLE else _BROKEN
        n = min(n, q[Q_BATCH])
        last = q[Q_LAST_AVAIL]
        used = q[Q_USED_IDX]
        done = 0
        status = _MORE
        for k in range(n):
            head = read_avail_entry(q, avail, mem, table, last + k)
            if head < 0:
                status = _BROKEN
                break
            nread, nseg, rbytes, wbytes = walk_chain(q, desc, mem, table, head, sg, READ_ONLY)
            if nread < 0:
                status = _BROKEN
                break
            if not write_used(q, used32, mem, table, used + k, head, 0):
                status = _BROKEN
                break
            # counted once completed (a chain left behind by a fault is not counted)
            if rbytes < hdr:
                q[Q_DROPS] += 1  # too short for the virtio-net header: dropped, still completed
            else:
                q[Q_PACKETS] += 1
                q[Q_BYTES] += rbytes - hdr
                csum[0] += sg_sum(mem, sg, 0, nread, hdr)
            done += 1
        # chains handled before a fault are still completed: no completion is lost
        q[Q_LAST_AVAIL] = (last + done) & 0xFFFF
        q[Q_CHAINS] += done
        if not flush_used(q, avail, used16, mem, table, (used + done) & 0xFFFF):
            return _BROKEN
        if status == _BROKEN:
            return _BROKEN
    return _MORE


@inline_helper
def rx_deliver(q, desc, avail, used32, mem, table, sgs, hdrbuf, src, length, k, n):
    """Put one frame (virtio_net_hdr + ``length`` bytes of ``src``) into RX chains from avail position last+k;
    ``src`` is a frame array or a TX chain's segments (:func:`sg_put`).

    Returns the chains used (> 0), 0 if the ``n - k`` chains left are not enough (nothing is consumed), or -1
    if the queue broke.  Without MRG_RXBUF a chain too small for the frame is completed empty and counted as a
    drop, as vhost-net does.
    """
    hdr = q[Q_HDR_LEN]
    last = q[Q_LAST_AVAIL]
    used = q[Q_USED_IDX]
    total = hdr + length
    done = 0
    c = 0
    first_nseg = 0
    while done < total:
        if k + c >= n:
            return 0
        head = read_avail_entry(q, avail, mem, table, last + k + c)
        if head < 0:
            return -1
        sg = sgs[0] if c == 0 else sgs[1]
        nread, nseg, rbytes, wbytes = walk_chain(q, desc, mem, table, head, sg, WRITE_ONLY)
        if nread < 0:
            return -1
        if c == 0:
            if wbytes < hdr or (q[Q_MRG] == 0 and wbytes < total):
                if not write_used(q, used32, mem, table, used + k, head, 0):
                    return -1
                q[Q_DROPS] += 1
                return 1
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
            w = sg_put(mem, sg, 0, nseg, hdr, src, 0, min(length, wbytes - hdr))
            chain_len = hdr + w
            first_nseg = nseg
        else:
            chain_len = sg_put(mem, sg, 0, nseg, 0, src, done - hdr, min(total - done, wbytes))
        done += chain_len
        if q[Q_LOG_SIZE]:  # dirty logging: after the data, before the used entry
            log_segments(q, mem, table, sg, 0, nseg, chain_len)
        if not write_used(q, used32, mem, table, used + k + c, head, chain_len):
            return -1
        c += 1
    if c > 1 and hdr >= 12:
        hdrbuf[0] = c & 0xFF
        hdrbuf[1] = c >> 8
        sg_write(mem, sgs[0], 0, first_nseg, 10, hdrbuf, 0, 2)  # num_buffers
        if q[Q_LOG_SIZE]:
            log_segments(q, mem, table, sgs[0], 0, first_nseg, 12)
    q[Q_PACKETS] += 1
    q[Q_BYTES] += length
    return c


@kernel
def rx_source(q, desc, avail, used16, used32, mem, table, sgs, hdrbuf, frame, budget, spins):
    """Fill RX chains with copies of ``frame`` (at most q[Q_LIMIT] packets if that is not -1), each stamped
    with its sequence number and UDP checksum if q[Q_SEQ] (net_frame.py; ``frame`` is then the step's own
    copy)."""
    numbered = q[Q_SEQ] != 0 and frame.shape[0] >= SEQ_OFF + SEQ_LEN
    base = frame_sum(frame, frame.shape[0]) if numbered else 0
    for _ in range(budget):
        if q[Q_STOP]:
            return _STOPPED
        want = q[Q_LIMIT] < 0 or q[Q_PACKETS] < q[Q_LIMIT]  # a source at its limit produces no more
        n = poll_avail(q, avail, used16, mem, table, spins, want)
        if n < 0:  # nothing to take now (or broken): one test on the path with work
            if n == POLL_AGAIN:
                continue
            return _IDLE if n == POLL_IDLE else _BROKEN
        n = min(n, q[Q_BATCH])
        k = 0
        status = _MORE
        while k < n and (q[Q_LIMIT] < 0 or q[Q_PACKETS] < q[Q_LIMIT]):
            if numbered:
                stamp(frame, base, q[Q_PACKETS])
            c = rx_deliver(q, desc, avail, used32, mem, table, sgs, hdrbuf, frame, frame.shape[0], k, n)
            if c < 0:
                status = _BROKEN
                break
            if c == 0:
                break
            k += c
        q[Q_LAST_AVAIL] = (q[Q_LAST_AVAIL] + k) & 0xFFFF
        q[Q_CHAINS] += k
        if not flush_used(q, avail, used16, mem, table, (q[Q_USED_IDX] + k) & 0xFFFF):
            return _BROKEN
        if status == _BROKEN:
            return _BROKEN
    return _MORE


@kernel
def loopback(
    rq,
    rdesc,
    ravail,
    rused16,
    rused32,
    tq,
    tdesc,
    tavail,
    tused16,
    tused32,
    mem,
    table,
    tsg,
    rsgs,
    hdrbuf,
    max_frame,
    budget,
    spins,
):
    """Move each TX frame to the paired RX queue, copied once from the TX buffers into the RX buffers (frames
    longer than ``max_frame`` are dropped).  A TX chain is taken only when RX has room for it."""
    hdr = tq[Q_HDR_LEN]
    for _ in range(budget):
        if tq[Q_STOP] or rq[Q_STOP]:
            return _STOPPED
        nt, nr = poll_avail_pair(tq, tavail, tused16, rq, ravail, rused16, mem, table, spins)
        if nt < 0:  # nothing to take now (or broken): one test on the path with work
            if nt == POLL_AGAIN:
                continue
            return _IDLE if nt == POLL_IDLE else _BROKEN
        nt = min(nt, tq[Q_BATCH])
        nr = min(nr, rq[Q_BATCH])
        tlast = tq[Q_LAST_AVAIL]
        tused = tq[Q_USED_IDX]
        t = 0
        r = 0
        status = _MORE
        while t < nt:
            head = read_avail_entry(tq, tavail, mem, table, tlast + t)
            if head < 0:
                status = _BROKEN
                break
            nread, nseg, rbytes, wbytes = walk_chain(tq, tdesc, mem, table, head, tsg, READ_ONLY)
            if nread < 0:
                status = _BROKEN
                break
            # the TX used entry first (published only with the index): a chain whose completion cannot be written
            # is neither delivered nor counted
            if not write_used(tq, tused32, mem, table, tused + t, head, 0):
                status = _BROKEN
                break
            if rbytes < hdr or rbytes - hdr > max_frame:
                tq[Q_DROPS] += 1
            else:
                length = rbytes - hdr  # copied once, from the TX segments after the header into RX
                c = rx_deliver(
                    rq, rdesc, ravail, rused32, mem, table, rsgs, hdrbuf, (tsg, 0, nread, hdr), length, r, nr
                )
                if c < 0:
                    status = _BROKEN
                    break
                if c == 0:
                    break  # RX full: leave this TX chain for the next pass
                r += c
                tq[Q_PACKETS] += 1
                tq[Q_BYTES] += length
            t += 1
        tq[Q_LAST_AVAIL] = (tlast + t) & 0xFFFF
        rq[Q_LAST_AVAIL] = (rq[Q_LAST_AVAIL] + r) & 0xFFFF
        tq[Q_CHAINS] += t
        rq[Q_CHAINS] += r
        # both, even if RX fails: the TX chains taken are completed (no completion is lost)
        rok = flush_used(rq, ravail, rused16, mem, table, (rq[Q_USED_IDX] + r) & 0xFFFF)
        if not flush_used(tq, tavail, tused16, mem, table, (tused + t) & 0xFFFF) or not rok:
            return _BROKEN
        if status == _BROKEN:
            return _BROKEN
    return _MORE


# ---------------------------------------------------------------------------------------------------------
class NetDevice(Device):
    """virtio-net with ``queue_pairs`` RX/TX pairs in one of the three modes."""

    device_id = VIRTIO_ID_NET
    access_platform = True  # behind a vIOMMU: every access is translated in compiled code, nothing held

    def __init__(
        self,
        mode: Mode = Mode.SINK,
        queue_pairs: int = 1,
        pkt_size: int = 64,
        mac: bytes = bytes.fromhex("020000000002"),
        mtu: int = 1500,
        spins: int = 20000,
        count: int = -1,
        numbered: bool = False,
    ) -> None:
        self.mode = Mode(mode)
        #: source mode: each frame carries its sequence number and a valid UDP checksum (devices/net_frame.py)
        self.numbered = numbered
        self.count = count
        self.queue_pairs = queue_pairs
        self.num_queues = 2 * queue_pairs
        self.mac = mac
        self.mtu = mtu
        self.spins = spins  # empty polls (≈20-50 ns each) before a worker sleeps on its kick fds
        self.frame = make_frame(pkt_size)
        self.features = (
            (1 << VIRTIO_NET_F_MRG_RXBUF)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MTU)
            | ((1 << VIRTIO_NET_F_MQ) if queue_pairs > 1 else 0)
        )
        self.negotiated = 0
        #: sink-read: per TX queue, the sum of every payload byte read (over ring restarts)
        self.checksums: dict[int, np.ndarray] = {}

    def stats(self) -> dict:
        if self.mode is not Mode.SINK_READ:
            return {}
        return {"payload_checksum": {str(i): int(c[0]) for i, c in sorted(self.checksums.items())}}

    def config_space(self) -> bytes:
        # struct virtio_net_config: mac[6], status, max_virtqueue_pairs, mtu
        return self.mac + struct.pack("<HHH", VIRTIO_NET_S_LINK_UP, self.queue_pairs, self.mtu)

    @property
    def hdr_len(self) -> int:
        if self.negotiated & ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF)):
            return NET_HDR_LEN
        return NET_HDR_LEN_LEGACY

    def prepare_queue(self, index: int, q: np.ndarray) -> None:
        q[Q_HDR_LEN] = self.hdr_len
        q[Q_MRG] = 1 if self.negotiated & (1 << VIRTIO_NET_F_MRG_RXBUF) else 0
        if self.mode is Mode.SOURCE:
            q[Q_LIMIT] = self.count
            q[Q_SEQ] = 1 if self.numbered else 0

    def workers(self) -> list[tuple[int, ...]]:
        pairs = range(self.queue_pairs)
        if self.mode in (Mode.SINK, Mode.SINK_READ):
            return [(2 * p + 1,) for p in pairs]
        if self.mode is Mode.SOURCE:  # RX generates; TX is a sink, so that a driver's transmissions never stall
            return [(q,) for q in range(self.num_queues)]
        return [(2 * p, 2 * p + 1) for p in pairs]

    def warm_up(self) -> None:
        warm_up()

    def discards_when_disabled(self, index: int) -> bool:
        return index % 2 == 1  # a disabled TX queue is processed and its frames discarded; RX gets nothing

    def discard_step(self, ring: Ring) -> StepFn:
        """The sink over a disabled TX queue, with a header length no chain reaches: every frame is completed
        and counted as a drop (discarded, not transmitted), before its completion is published."""
        ring.q[Q_HDR_LEN] = DISCARD_HDR_LEN  # (prepare_queue sets the real one when the ring is enabled again)
        return self._step(Mode.SINK, [ring])

    def make_step(self, rings: list[Ring]) -> StepFn:
        if self.mode is Mode.SOURCE and rings[0].index % 2 == 1:
            return self._step(Mode.SINK, rings)  # a source's TX queue
        return self._step(self.mode, rings)

    def _step(self, mode: Mode, rings: list[Ring]) -> StepFn:
        spins = self.spins
        csum = self.checksums.setdefault(rings[0].index, np.zeros(1, np.uint64)) if mode is Mode.SINK_READ else None
        if self.negotiated & (1 << VIRTIO_F_RING_PACKED):
            return net_packed.make_step(mode.value, rings, spins, self.frame.copy(), MAX_FRAME, csum)
        mem = rings[0].mem
        views, table = mem.arena.view, mem.table
        if mode is Mode.SINK:
            (tx,) = rings
            sg = new_sg(int(tx.q[0]))
            sink = (tx.q, *tx.views.args(), views, table, sg)
            return lambda budget: tx_sink(*sink, budget, spins)
        if csum is not None:
            (tx,) = rings
            read = (tx.q, *tx.views.args(), views, table, new_sg(int(tx.q[0])), csum)
            return lambda budget: tx_read(*read, budget, spins)
        if mode is Mode.SOURCE:
            (rx,) = rings
            sgs = np.stack([new_sg(int(rx.q[0]))] * 2)
            # the step's own copy of the frame: it stamps a sequence number into it (one per queue)
            source = (rx.q, *rx.views.args(), views, table, sgs, np.zeros(16, np.uint8), self.frame.copy())
            return lambda budget: rx_source(*source, budget, spins)
        rx, tx = rings
        tsg = new_sg(int(tx.q[0]))
        rsgs = np.stack([new_sg(int(rx.q[0]))] * 2)
        args = (
            rx.q,
            *rx.views.args(),
            tx.q,
            *tx.views.args(),
            views,
            table,
            tsg,
            rsgs,
            np.zeros(16, np.uint8),
            MAX_FRAME,
        )
        return lambda budget: loopback(*args, budget, spins)


def warm_up() -> None:
    """Compile (or load from the on-disk cache) every net kernel on a tiny idle ring, so that the first
    connection does not wait for the compiler."""

    mem = GuestMemory(arena_size=1 << 21)
    try:
        q = new_queue_state(1)
        q[Q_STOP] = 1  # return at once
        ring = (_NO_U64, _NO_U16, _NO_U16, _NO_U32)
        sg = new_sg(1)
        sgs = np.stack([sg, sg])
        tx_sink(q, *ring, mem.arena.view, mem.table, sg, 1, 1)
        tx_read(q, *ring, mem.arena.view, mem.table, sg, np.zeros(1, np.uint64), 1, 1)
        rx_source(q, *ring, mem.arena.view, mem.table, sgs, np.zeros(16, np.uint8), make_frame(64), 1, 1)
        loopback(q, *ring, q, *ring, mem.arena.view, mem.table, sg, sgs, np.zeros(16, np.uint8), 16, 1, 1)
    finally:
        mem.close()
    net_packed.warm_up()
