"""virtio-net on a Linux tap device: a guest on a real network, the way vhost-net does it.

The tap is opened with ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`` and its vnet header size set to the negotiated
virtio-net header (12 bytes with VERSION_1 or MRG_RXBUF, else 10), so the header passes through unchanged in
both directions and carries the offloads: the guest's checksum/TSO/UFO requests go to the kernel as they are
(``VIRTIO_NET_F_CSUM``, ``HOST_TSO4/6``, ``HOST_UFO``), and ``TUNSETOFFLOAD`` lets the kernel hand the guest
partially checksummed and GSO frames when it negotiated ``GUEST_CSUM`` and ``GUEST_TSO4/6``.

No copies in between:

* TX (queue 1): compiled code takes chains off the ring (``pop_chains``); each chain's readable buffers go to
  the tap in one ``os.writev`` of memoryviews of guest memory; the batch is completed by ``push_used``.
* RX (queue 0): the worker holds a few RX chains (popped, not yet completed) and ``os.readv``s each frame from
  the tap straight into their writable buffers, then completes the chains the frame filled -- one chain, or
  several with ``num_buffers`` set when MRG_RXBUF is negotiated -- and keeps the rest for the next frame.
  It sleeps on the tap fd when the tap is empty and on the kick fd when the guest has no buffers.

Back-pressure loses nothing silently.  With no RX buffers the worker stops reading the tap, and the kernel
drops at the tap's queue (counted in the tap's tx_dropped), as with vhost-net.  A frame larger than the
buffers held lands partly in a bounce buffer and waits there until the guest posts more.  A TX write the tap
refuses for lack of room waits for the tap to be writable; one the kernel rejects (a bad header, the link
down) is counted as a drop, as vhost-net does.  A chain's buffers are touched only between its pop and its
push, by the one worker of its queue; chains held when the worker stops are given back (the avail index is
moved back over them), so GET_VRING_BASE reports exactly the chains completed.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import socket
import struct

import numpy as np

from ..access import _NO_U16, _NO_U32, _NO_U64, RingViews
from ..jit import kernel
from ..memory import GuestMemory
from ..ring.chain import ANY, MAX_INDIRECT, log_rows, new_sg, walk_chain
from ..ring.split import flush_used, read_avail_entry, write_used
from ..ring.state import (
    Q_BYTES,
    Q_CHAINS,
    Q_DROPS,
    Q_ERROR,
    Q_IDLE,
    Q_LAST_AVAIL,
    Q_LOG_SIZE,
    Q_PACKETS,
    Q_SIZE,
    Q_STOP,
    Q_USED_IDX,
    new_queue_state,
)
from .base import VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, Device, Ring, Step, StepFn
from .chain_device import POP_BROKEN, POP_IDLE, POP_STOPPED, discard_split, wait_pending  # wait_pending's results
from .chain_device import warm_up as warm_up_base
from .net import (
    NET_HDR_LEN,
    NET_HDR_LEN_LEGACY,
    VIRTIO_ID_NET,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
    multiqueue_features,
)

log = logging.getLogger(__name__)

VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
TUNGETVNETHDRSZ = 0x800454D7
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
SIOCGIFMTU = 0x8921
#: most iovecs one readv/writev takes (UIO_MAXIOV)
IOV_MAX = 1024
#: largest frame a tap hands over with GSO: 64 KiB of IP packet plus the Ethernet and VLAN headers
MAX_GSO_FRAME = 65536 + 64

#: guest-side offloads (the kernel may send the guest such frames) and what TUNSETOFFLOAD calls them
GUEST_OFFLOADS = {
    VIRTIO_NET_F_GUEST_CSUM: TUN_F_CSUM,
    VIRTIO_NET_F_GUEST_TSO4: TUN_F_TSO4,
    VIRTIO_NET_F_GUEST_TSO6: TUN_F_TSO6,
}
#: host-side offloads (the guest may send such frames; the tap takes them through the vnet header)
HOST_OFFLOADS = (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO)
OFFLOAD_FEATURES = sum(1 << b for b in (*GUEST_OFFLOADS, *HOST_OFFLOADS))


# ---------------------------------------------------------------------------------------------------------
# compiled ring access: chains off the avail ring, completions onto the used ring (the rest is Python)
#: columns of the chains array: head, first sg row, readable segments, sg row after the last segment
C_HEAD, C_FIRST, C_NREAD, C_END = 0, 1, 2, 3


@kernel
def pop_chains(q, desc, avail, used16, mem, table, sg, chains, max_chains, spins):
    """Take up to ``max_chains`` chains (walked and bounded) off the avail ring into ``chains``/``sg``.

    Polls up to ``spins`` times; with nothing to take, asks for kicks, looks once more, and returns POP_IDLE.
    Chains taken before a fault are still handed out; the fault shows in q[Q_ERROR]."""
    n = wait_pending(q, avail, used16, mem, table, spins)
    if n <= 0:
        return n
    last = q[Q_LAST_AVAIL]
    row = 0
    room = q[Q_SIZE] + MAX_INDIRECT  # rows one chain may need at most
    k = 0
    while k < min(n, max_chains) and row + room <= sg.shape[0]:
        head = read_avail_entry(q, avail, mem, table, last + k)
        if head < 0:
            break
        nread, nseg, rbytes, wbytes = walk_chain(q, desc, mem, table, head, sg[row:], ANY)
        if nread < 0:
            break
        chains[k, C_HEAD] = head
        chains[k, C_FIRST] = row
        chains[k, C_NREAD] = nread
        chains[k, C_END] = row + nseg
        row += nseg
        k += 1
    q[Q_LAST_AVAIL] = (last + k) & 0xFFFF
    return k


@kernel
def push_used(q, avail, used16, used32, mem, table, heads, lens, n):
    """Complete ``n`` chains (``heads[i]`` with ``lens[i]`` bytes written); publish once, then notify if asked."""
    used = q[Q_USED_IDX]
    for i in range(n):
        if not write_used(q, used32, mem, table, used + i, heads[i], lens[i]):
            return False
    q[Q_CHAINS] += n
    q[Q_IDLE] = 0
    return flush_used(q, avail, used16, mem, table, (used + n) & 0xFFFF)


def tun_offload_flags(features: int) -> int:
    """TUNSETOFFLOAD flags for the negotiated guest offloads (TSO only with checksum offload, as tun demands)."""
    if not features & (1 << VIRTIO_NET_F_GUEST_CSUM):
        return 0
    flags = TUN_F_CSUM
    if features & (1 << VIRTIO_NET_F_GUEST_TSO4):
        flags |= TUN_F_TSO4
    if features & (1 << VIRTIO_NET_F_GUEST_TSO6):
        flags |= TUN_F_TSO6
    return flags


def open_tap(name: str, multi_queue: bool = False) -> tuple[int, str]:
    """Attach to (or create) tap ``name`` with a vnet header; the fd is non-blocking.  ``multi_queue``: one more
    queue of a tap made with ``IFF_MULTI_QUEUE`` (each TUNSETIFF on the name adds a queue)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        feats = struct.unpack("I", fcntl.ioctl(fd, TUNGETFEATURES, bytes(4)))[0]
        if not feats & IFF_VNET_HDR:
            raise OSError(errno.EOPNOTSUPP, "this kernel's tun has no IFF_VNET_HDR")
        if multi_queue and not feats & IFF_MULTI_QUEUE:
            raise OSError(errno.EOPNOTSUPP, "this kernel's tun has no IFF_MULTI_QUEUE")
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if multi_queue else 0)
        ifr = struct.pack("16sH22x", name.encode(), flags)
        ifr = fcntl.ioctl(fd, TUNSETIFF, ifr)
        actual = ifr[:16].rstrip(b"\0").decode()
    except BaseException:
        os.close(fd)
        raise
    return fd, actual


def _iov(views: list[memoryview]) -> list:
    """``views`` as one writev/readv argument (more than IOV_MAX segments are joined into one copy)."""
    if len(views) <= IOV_MAX:
        return views
    return [b"".join(views)]


def new_counters() -> dict[str, int]:
    """A queue pair's counters (each pair's workers write their own: no two threads add to one count)."""
    return dict.fromkeys(("tx_frames", "tx_bytes", "tx_drops", "rx_frames", "rx_bytes", "rx_drops", "rx_bounced"), 0)


class TapDevice(Device):
    """virtio-net whose other end is tap ``tap``: ``queue_pairs`` RX/TX pairs, pair k on tap queue k (a tap
    made with ``IFF_MULTI_QUEUE`` when more than one; the kernel spreads the flows it sends over the queues)."""

    device_id = VIRTIO_ID_NET
    #: the datapath walks split rings (pop_chains/push_used)
    transport_features_off = 1 << VIRTIO_F_RING_PACKED
    access_platform = True  # behind a vIOMMU: every access translated, held chains given back

    def __init__(
        self,
        tap: str,
        offloads: bool = True,
        mac: bytes = bytes.fromhex("525400123456"),
        mtu: int | None = None,
        batch: int = 64,
        spins: int = 2000,
        queue_pairs: int = 1,
    ) -> None:
        if queue_pairs < 1:
            raise ValueError(f"queue_pairs {queue_pairs}: at least 1")
        self.queue_pairs = queue_pairs
        self.num_queues = 2 * queue_pairs
        multi = queue_pairs > 1
        self.fds: list[int] = []
        try:
            fd, self.tap = open_tap(tap, multi)
            self.fds.append(fd)
            while len(self.fds) < queue_pairs:
                self.fds.append(open_tap(self.tap, multi)[0])
        except BaseException:
            for fd in self.fds:
                os.close(fd)
            raise
        #: the pairs whose tap queue is attached (a disabled pair's queue is detached: the kernel sends it nothing)
        self.attached = [True] * queue_pairs
        #: the rings the driver enabled (SET_VRING_ENABLE)
        self.enabled: set[int] = set()
        self.mac = mac
        self.mtu = mtu if mtu is not None else self._tap_mtu()
        self.batch = batch
        self.spins = spins
        self.tun_offloads = self._probe_offloads() if offloads else 0
        self.features = (
            (1 << VIRTIO_NET_F_MRG_RXBUF)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MTU)
            | multiqueue_features(queue_pairs)
        )
        if offloads:
            self.features |= sum(1 << b for b in HOST_OFFLOADS)
            self.features |= sum(1 << b for b, f in GUEST_OFFLOADS.items() if self.tun_offloads & f)
        self.negotiated = 0
        self.pair_counters = [new_counters() for _ in range(queue_pairs)]
        log.info(
            "tap %s: %d queue(s), fds %s, mtu %d, offloads %s",
            self.tap,
            queue_pairs,
            self.fds,
            self.mtu,
            "on" if offloads else "off",
        )

    @property
    def fd(self) -> int:
        """The first tap queue's fd (-1 once closed)."""
        return self.fds[0] if self.fds else -1

    @property
    def counters(self) -> dict[str, int]:
        """The counters of every pair, added up."""
        out = new_counters()
        for c in self.pair_counters:
            for k, v in c.items():
                out[k] += v
        return out

    # -- set-up -------------------------------------------------------------------------------------------
    def _tap_mtu(self) -> int:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                ifr = fcntl.ioctl(s, SIOCGIFMTU, struct.pack("16si20x", self.tap.encode(), 0))
                return struct.unpack("16si20x", ifr)[1]
        except OSError:
            return 1500

    def _probe_offloads(self) -> int:
        """The guest offloads this tap accepts (TUNSETOFFLOAD refuses what the kernel cannot do)."""
        want = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
        for flags in (want, TUN_F_CSUM | TUN_F_TSO4, TUN_F_CSUM, 0):
            try:
                fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
            except OSError:
                continue
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, 0)  # off until a driver negotiates them
            return flags
        return 0

    def config_space(self) -> bytes:
        # struct virtio_net_config: mac[6], status, max_virtqueue_pairs, mtu
        return self.mac + struct.pack("<HHH", VIRTIO_NET_S_LINK_UP, self.queue_pairs, self.mtu)

    @property
    def hdr_len(self) -> int:
        if self.negotiated & ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF)):
            return NET_HDR_LEN
        return NET_HDR_LEN_LEGACY

    def set_features(self, features: int) -> None:
        if features & (1 << VIRTIO_F_RING_PACKED):
            raise ValueError("the tap device serves split rings only (VIRTIO_F_RING_PACKED asked for)")
        self.negotiated = features
        for fd in self.fds:  # (the kernel keeps both per tap; set through every queue all the same)
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", self.hdr_len))
            fcntl.ioctl(fd, TUNSETOFFLOAD, tun_offload_flags(features))
        log.info(
            "tap %s: vnet header %d bytes, offloads %#x (features %#x)",
            self.tap,
            self.hdr_len,
            tun_offload_flags(features),
            features,
        )

    def ring_enabled(self, index: int, enabled: bool) -> None:
        """A pair's tap queue is attached while one of its rings is enabled and detached otherwise (TUNSETQUEUE,
        as QEMU does): the kernel then steers no flow to a queue nobody reads.  The first queue stays attached."""
        (self.enabled.add if enabled else self.enabled.discard)(index)
        pair = index // 2
        if 0 < pair < self.queue_pairs:
            self._attach(pair, bool({2 * pair, 2 * pair + 1} & self.enabled))

    def _attach(self, pair: int, want: bool) -> None:
        if want == self.attached[pair]:
            return
        ifr = struct.pack("16sH22x", b"", IFF_ATTACH_QUEUE if want else IFF_DETACH_QUEUE)
        try:
            fcntl.ioctl(self.fds[pair], TUNSETQUEUE, ifr)
        except OSError as e:
            log.error("tap %s: %s queue %d failed: %s", self.tap, "attaching" if want else "detaching", pair, e)
            return
        self.attached[pair] = want
        log.info("tap %s: queue %d %s", self.tap, pair, "attached" if want else "detached")

    def driver_gone(self) -> None:
        self.enabled.clear()
        for pair in range(1, self.queue_pairs):  # the next driver starts from every queue attached
            self._attach(pair, True)

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)

    def stats(self) -> dict:
        out: dict = self.counters
        if self.queue_pairs > 1:
            out["pairs"] = [dict(c) for c in self.pair_counters]
        return out

    # -- datapath -----------------------------------------------------------------------------------------
    def make_step(self, rings: list[Ring]) -> StepFn:
        (ring,) = rings
        if ring.index % 2 == 0:
            return _RxStep(self, ring)
        return _TxStep(self, ring)

    def warm_up(self) -> None:
        warm_up()
        warm_up_base()  # discard_split's kernels

    def discards_when_disabled(self, index: int) -> bool:
        return index % 2 == 1  # a disabled TX queue: frames taken and dropped, never written to the tap

    def discard_step(self, ring: Ring) -> StepFn:
        return discard_split(ring)


class _RingIO:
    """What both directions share: the ring's arrays and the compiled pop/push around Python code."""

    def __init__(self, dev: TapDevice, ring: Ring, batch: int) -> None:
        self.dev = dev
        self.fd = dev.fds[ring.index // 2]  # the pair's tap queue
        self.counters = dev.pair_counters[ring.index // 2]
        self.q = ring.q
        self.index = ring.index
        self.arena, self.table = ring.mem.arena.view, ring.mem.table
        assert isinstance(ring.views, RingViews), "the tap serves split rings"
        self.desc, self.avail, self.used16, self.used32 = ring.views.args()
        self.sg = new_sg(int(self.q[Q_SIZE]) * 2)
        self.batch = batch
        self.chains = np.zeros((batch, 4), dtype=np.int64)
        self.heads_done = np.zeros(batch, dtype=np.int64)  # completions waiting for push_used
        self.lens = np.zeros(batch, dtype=np.int64)
        self.ndone = 0
        self.hdr = dev.hdr_len
        #: fds the worker also sleeps on when this step is idle (readable wakes it)
        self.wait_fds: list[int] = []
        self.errors_seen: set[int] = set()

    def pop(self, max_chains: int, spins: int) -> int:
        return pop_chains(
            self.q, self.desc, self.avail, self.used16, self.arena, self.table, self.sg, self.chains, max_chains, spins
        )

    def complete(self, head: int, length: int) -> bool:
        """Queue a completion; publish when the batch is full.  False if the ring broke."""
        self.heads_done[self.ndone] = head
        self.lens[self.ndone] = length
        self.ndone += 1
        return self.flush() if self.ndone == self.batch else True

    def flush(self) -> bool:
        n, self.ndone = self.ndone, 0
        if n == 0:
            return True
        return bool(
            push_used(
                self.q, self.avail, self.used16, self.used32, self.arena, self.table, self.heads_done, self.lens, n
            )
        )

    def views(self, first: int, end: int) -> list[memoryview]:
        arena = self.arena
        return [arena[o : o + ln].data for o, ln in self.sg[first:end].tolist()]


_SENT, _DROPPED, _STOPPING = 0, 1, 2


class _TxStep(_RingIO):
    """Queue 1: each chain's readable buffers (virtio_net_hdr + frame) go to the tap in one writev."""

    def __init__(self, dev: TapDevice, ring: Ring) -> None:
        super().__init__(dev, ring, dev.batch)

    def __call__(self, budget: int) -> int:
        q, c = self.q, self.counters
        for _ in range(max(1, budget // 256)):
            n = self.pop(self.batch, self.dev.spins)
            if n == POP_STOPPED:
                return Step.STOPPED
            if n == POP_IDLE:
                return Step.BROKEN if q[Q_ERROR] else Step.IDLE  # (a fault at the first chain takes none)
            if n == POP_BROKEN:
                return Step.BROKEN
            for i in range(n):  # (chains taken before a fault are sent and completed, then the queue stops)
                head, first, nread, _end = (int(x) for x in self.chains[i])
                segs = self.views(first, first + nread)
                try:
                    size = sum(len(s) for s in segs)
                    sent = _DROPPED if nread == 0 or size < self.hdr else self._write(segs)
                    if sent == _STOPPING:
                        # stopping while the tap is full: give this chain and the rest back, unsent
                        q[Q_LAST_AVAIL] = (int(q[Q_LAST_AVAIL]) - (n - i)) & 0xFFFF
                        return Step.STOPPED if self.flush() else Step.BROKEN
                    if sent == _DROPPED:  # too short for the header, or refused by the kernel: still completed
                        q[Q_DROPS] += 1
                        c["tx_drops"] += 1
                    else:
                        q[Q_PACKETS] += 1
                        q[Q_BYTES] += size - self.hdr
                        c["tx_frames"] += 1
                        c["tx_bytes"] += size - self.hdr
                finally:
                    for s in segs:
                        s.release()
                if not self.complete(head, 0):
                    return Step.BROKEN
            if not self.flush() or q[Q_ERROR]:
                return Step.BROKEN
        return Step.MORE

    def _write(self, segs: list[memoryview]) -> int:
        """One frame to the tap: _SENT, _DROPPED (the kernel refused it), or _STOPPING (told to stop while
        waiting for room)."""
        iov = _iov(segs)
        while True:
            try:
                os.writev(self.fd, iov)
                return _SENT
            except (BlockingIOError, InterruptedError):
                while not self.q[Q_STOP]:  # the tap's socket buffer is full: wait for room, lose nothing
                    if select.select([], [self.fd], [], 0.1)[1]:
                        break
                else:
                    return _STOPPING
            except OSError as e:  # the kernel refused the frame (bad vnet header, link down): dropped
                if e.errno not in self.errors_seen:  # once per kind of error, not once per frame
                    self.errors_seen.add(e.errno or 0)
                    log.warning(
                        "tap %s: write failed: %s (frames the tap refuses are counted as drops)", self.dev.tap, e
                    )
                return _DROPPED


class _RxStep(_RingIO):
    """Queue 0: frames are read from the tap straight into held RX chains."""

    def __init__(self, dev: TapDevice, ring: Ring) -> None:
        super().__init__(dev, ring, dev.batch)
        feats = dev.negotiated
        self.mrg = bool(feats & (1 << VIRTIO_NET_F_MRG_RXBUF))
        gso = feats & ((1 << VIRTIO_NET_F_GUEST_TSO4) | (1 << VIRTIO_NET_F_GUEST_TSO6))
        #: chains are held (popped ahead) until they hold the largest frame the tap may hand over
        self.want = self.hdr + (MAX_GSO_FRAME if gso else dev.mtu + 22)
        self.heads: list[int] = []  # held chains, in avail order
        self.sizes: list[int] = []  # their writable bytes
        self.nviews: list[int] = []  # their writable segments
        self.held_views: list[memoryview] = []
        self.held_rows: list[list[int]] = []  # their (arena offset, length), for the dirty log
        self.held_bytes = 0
        self.bounce = bytearray(MAX_GSO_FRAME + 64)
        self.bounce_view = memoryview(self.bounce)
        self.pending = 0  # bytes of a frame waiting in the bounce buffer for more chains
        self.pending_chains = 0  # chains that frame already fills (at the front of the held ones)

    # -- held chains --------------------------------------------------------------------------------------
    def _take(self, max_chains: int) -> int:
        """Pop up to ``max_chains`` more chains without waiting; returns a POP_* value or the count.

        A chain no frame can use (readable buffers in an RX chain, or too small for the header) is held too,
        with no buffers: completions are made from the front of the held chains only, so the held ones are
        always the last ones popped, and giving them back is moving the avail index back over them."""
        n = self.pop(max_chains, 1)
        for i in range(max(n, 0)):
            head, first, nread, end = (int(x) for x in self.chains[i])
            views = self.views(first + nread, end)
            rows = self.sg[first + nread : end].tolist()
            size = sum(len(v) for v in views)
            if nread or size < self.hdr:
                for v in views:
                    v.release()
                views, rows, size = [], [], 0
            self.heads.append(head)
            self.sizes.append(size)
            self.nviews.append(len(views))
            self.held_views.extend(views)
            self.held_rows.extend(rows)
            self.held_bytes += size
        return n

    def _skip_unusable(self) -> bool:
        """Complete (empty) the unusable chains at the front of the held ones.  False if the ring broke."""
        k = 0
        while k < len(self.heads) and self.sizes[k] == 0:
            if not self.complete(self.heads[k], 0):
                return False
            k += 1
        if k:
            self._release(k)
        return True

    def _release(self, k: int) -> None:
        """Forget the first ``k`` held chains (their completions are queued)."""
        nv = sum(self.nviews[:k])
        for v in self.held_views[:nv]:
            v.release()
        del self.held_views[:nv], self.held_rows[:nv]
        self.held_bytes -= sum(self.sizes[:k])
        del self.heads[:k], self.sizes[:k], self.nviews[:k]

    def _give_back(self) -> None:
        """Stopping: the held chains go back to the driver (avail index moved back over them, in order)."""
        if self.pending:  # a frame waiting for buffers is lost with the queue; the kernel would drop it too
            self.q[Q_DROPS] += 1
            self.counters["rx_drops"] += 1
            self.pending = self.pending_chains = 0
        n = len(self.heads)
        self.q[Q_LAST_AVAIL] = (int(self.q[Q_LAST_AVAIL]) - n) & 0xFFFF
        self._release(n)

    # -- one frame --------------------------------------------------------------------------------------
    def _set_num_buffers(self, count: int) -> None:
        """virtio_net_hdr.num_buffers (bytes 10-11 of the first chain's buffers; the tap leaves them)."""
        if self.hdr < NET_HDR_LEN:
            return
        data = struct.pack("<H", count)
        off, i = 10, 0
        for v in self.held_views:
            if off >= len(v):
                off -= len(v)
                continue
            take = min(len(v) - off, 2 - i)
            v[off : off + take] = data[i : i + take]
            i += take
            off = 0
            if i == 2:
                return

    def _deliver(self, n: int, in_chains: int) -> bool:
        """A frame of ``n`` bytes (header included) of which ``in_chains`` are in the held chains, in order:
        complete the chains it filled.  False if the ring broke."""
        k, left = 0, in_chains
        lens = []
        while left > 0:
            take = min(self.sizes[k], left)
            lens.append(take)
            left -= take
            k += 1
        self._set_num_buffers(k)
        if self.q[Q_LOG_SIZE]:  # dirty logging: the chains the frame filled, before they are completed
            nv = sum(self.nviews[:k])
            log_rows(self.q, self.arena, self.table, np.array(self.held_rows[:nv], dtype=np.int64).reshape(-1, 2), nv)
        for j in range(k):
            if not self.complete(self.heads[j], lens[j]):
                return False
        self._release(k)
        self.q[Q_PACKETS] += 1
        self.q[Q_BYTES] += n - self.hdr
        self.counters["rx_frames"] += 1
        self.counters["rx_bytes"] += n - self.hdr
        return True

    def _place_pending(self) -> bool | None:
        """Copy a bounced frame's tail into the chains after the ones it fills.  None: still not enough room."""
        first = self.pending_chains
        room = sum(self.sizes[first:])
        if room < self.pending:
            return None
        nv = sum(self.nviews[:first])
        src, done = self.bounce_view, 0
        for v in self.held_views[nv:]:
            take = min(len(v), self.pending - done)
            v[:take] = src[done : done + take]
            done += take
            if done == self.pending:
                break
        head_bytes = sum(self.sizes[:first])
        n, self.pending, self.pending_chains = head_bytes + done, 0, 0
        return self._deliver(n, n)

    def _read_one(self) -> int:
        """Read one frame into the held chains; -1 if the tap is empty (-2 if reading it failed), 0 if the
        queue broke, 1 if delivered (or dropped as the kernel would), 2 if it waits in the bounce buffer for
        more chains."""
        if not self.mrg:  # one chain per frame
            chains = 1
        elif len(self.held_views) < IOV_MAX:
            chains = len(self.heads)
        else:  # whole chains only, within IOV_MAX with the bounce buffer
            chains, nv = 0, 0
            while chains < len(self.heads) and nv + self.nviews[chains] < IOV_MAX:
                nv += self.nviews[chains]
                chains += 1
        if chains == len(self.heads):
            iov, held = self.held_views, self.held_bytes
        else:
            iov, held = self.held_views[: sum(self.nviews[:chains])], sum(self.sizes[:chains])
        try:
            n = os.readv(self.fd, [*iov, self.bounce_view])
        except (BlockingIOError, InterruptedError):
            return -1
        except OSError as e:  # the tap went away (or worse): retry once a second, say so once
            if e.errno not in self.errors_seen:
                self.errors_seen.add(e.errno or 0)
                log.error("tap %s: read failed: %s", self.dev.tap, e)
            return -2
        if n < self.hdr:  # the tap always writes the header; nothing to deliver
            self.q[Q_DROPS] += 1
            self.counters["rx_drops"] += 1
            return 1
        if n <= held:
            return 1 if self._deliver(n, n) else 0
        if not self.mrg:  # larger than the chain (vhost-net: "Discarded rx packet"); the chain stays held
            self.q[Q_DROPS] += 1
            self.counters["rx_drops"] += 1
            return 1
        # the frame went past the held chains: its tail (at the start of the bounce buffer) waits for more
        self.pending, self.pending_chains = n - held, chains
        self.counters["rx_bounced"] += 1
        return 2

    # -- the worker's step --------------------------------------------------------------------------------
    def __call__(self, budget: int) -> int:
        status = self._run()
        if status == Step.BROKEN:  # the worker ends here: let go of the guest's buffers (no view outlives it)
            self.drain(0.0)
        return status

    def drain(self, timeout: float) -> list[int]:
        """The worker leaves (on any path, an exception included): let go of the held chains' views.  They
        are used by this worker's thread only, so nothing is left in use."""
        self.pending = self.pending_chains = 0
        self._release(len(self.heads))
        return []

    def _run(self) -> int:
        q = self.q
        frames = 0
        limit = max(self.batch, 1)
        while True:
            if q[Q_STOP]:
                ok = self.flush()
                self._give_back()
                return Step.STOPPED if ok else Step.BROKEN
            need = self.pending > 0 or self.held_bytes < self.want or not self.heads
            if need:
                n = self._take(self.batch)
                if n == POP_BROKEN or q[Q_ERROR]:  # (chains taken before a fault are not used either)
                    # they go back to the driver: behind a vIOMMU the fault may be an IOTLB miss after which
                    # the queue resumes from the avail index, and a chain kept out of it would be lost
                    self.flush()
                    self._give_back()
                    return Step.BROKEN
                if n == POP_STOPPED:
                    continue
            if self.pending:
                placed = self._place_pending()
                if placed is None:  # still waiting for buffers: sleep on the kick (notifications are on)
                    self.wait_fds = []
                    return Step.IDLE if self.flush() else Step.BROKEN
                if not placed:
                    return Step.BROKEN
                continue
            if not self._skip_unusable():
                return Step.BROKEN
            if not self.heads:  # no RX buffers: stop reading the tap (the kernel queues, then drops)
                self.wait_fds = []
                return Step.IDLE if self.flush() else Step.BROKEN
            r = self._read_one()
            if r == 0:
                return Step.BROKEN
            if r < 0:  # the tap is empty: publish, sleep on the tap fd (or a while, if reading it fails)
                self.wait_fds = [self.fd] if r == -1 else []
                return Step.IDLE if self.flush() else Step.BROKEN
            frames += 1
            if frames >= limit:
                return Step.MORE if self.flush() else Step.BROKEN


def warm_up() -> None:
    """Compile (or load from the on-disk cache) pop_chains and push_used on a stopped queue, so that the first
    connection does not wait for the compiler."""

    mem = GuestMemory(arena_size=1 << 21)
    try:
        q = new_queue_state(1)
        q[Q_STOP] = 1
        chains = np.zeros((1, 4), dtype=np.int64)
        pop_chains(q, _NO_U64, _NO_U16, _NO_U16, mem.arena.view, mem.table, new_sg(1), chains, 1, 1)
        push_used(
            q, _NO_U16, _NO_U16, _NO_U32, mem.arena.view, mem.table, np.zeros(1, np.int64), np.zeros(1, np.int64), 0
        )
    finally:
        mem.close()
