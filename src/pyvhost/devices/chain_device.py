"""Devices in plain Python: compiled code takes chains off the ring and puts completions back; the device sees each
chain as lists of memoryviews of guest memory, and completes it at once (handle) or later (submit)."""

from __future__ import annotations

import collections
import logging
import os
import select
import threading
import time

import numpy as np

from ..access import _NO_U32, RingViews
from ..atomic import fence_full
from ..errors import QueueError
from ..jit import helper, kernel
from ..memory import GuestMemory
from ..ring import packed as PK
from ..ring.chain import ANY, MAX_INDIRECT, log_rows, new_sg, walk_chain
from ..ring.poll import POLL_AGAIN, POLL_IDLE
from ..ring.split import fail, flush_used, poll_avail, read_avail_entry, write_used
from ..ring.state import (
    Q_AVAIL_WRAP,
    Q_CHAINS,
    Q_DROPS,
    Q_ERROR,
    Q_IDLE,
    Q_LAST_AVAIL,
    Q_LOG_SIZE,
    Q_SIZE,
    Q_STOP,
    Q_USED_IDX,
    new_queue_state,
)
from .base import Device, Ring, Step, StepFn

log = logging.getLogger(__name__)
#: pop_chains results besides a chain count
POP_IDLE, POP_BROKEN, POP_STOPPED = 0, -1, -2
#: columns of the chains array: head (packed: buffer id), first sg row, readable segments, sg row after the last
#: segment, bytes the device may write
C_HEAD, C_FIRST, C_NREAD, C_END, C_WLEN = 0, 1, 2, 3, 4
CHAIN_COLS = 5
#: inflight tracking state of a ring (``ist``): next counter value, 1 if tracking
IST_COUNTER, IST_TRACK = 0, 1
_NO_U8, _NO_U16, _NO_U64 = np.zeros(0, np.uint8), np.zeros(0, np.uint16), np.zeros(0, np.uint64)


@helper
def wait_pending(q, avail, used16, mem, table, spins):
    """Chains waiting on the avail ring (> 0, kicks then suppressed while we work), or POP_IDLE after ``spins``
    empty polls (kicks asked for and the ring looked at once more), POP_STOPPED or POP_BROKEN."""
    while True:
        if q[Q_STOP]:
            return POP_STOPPED
        n = poll_avail(q, avail, used16, mem, table, spins, True)
        if n != POLL_AGAIN:
            break
    if n == POLL_IDLE:
        return POP_IDLE
    return POP_BROKEN if n < 0 else n


@kernel
def pop_chains(q, desc, avail, used16, mem, table, sg, chains, max_chains, spins, i8, i64, ist):
    """Take up to ``max_chains`` chains (walked and bounded) off the avail ring into ``chains``/``sg``.

    Polls up to ``spins`` times; with nothing to take, asks for kicks, looks once more, and returns POP_IDLE.
    With inflight tracking (``ist[IST_TRACK]``), each chain taken is marked in flight -- counter first, then
    the flag -- in avail order, before the device sees it."""
    n = wait_pending(q, avail, used16, mem, table, spins)
    if n <= 0:
        return n
    last = q[Q_LAST_AVAIL]
    track = ist[IST_TRACK]
    row = 0
    room = q[Q_SIZE] + MAX_INDIRECT  # rows one chain may need at most
    k = 0
    while k < min(n, max_chains) and row + room <= sg.shape[0]:
        head = read_avail_entry(q, avail, mem, table, last + k)
        if head < 0:
            break
        nread, nseg, _rbytes, wbytes = walk_chain(q, desc, mem, table, head, sg[row:], ANY)
        if nread < 0:
            break
        if track:
            i64[3 + 2 * head] = np.uint64(ist[IST_COUNTER])  # desc[head].counter
            ist[IST_COUNTER] += 1
            fence_full()
            i8[16 + 16 * head] = 1  # desc[head].inflight
        chains[k, C_HEAD] = head
        chains[k, C_FIRST] = row
        chains[k, C_NREAD] = nread
        chains[k, C_END] = row + nseg
        chains[k, C_WLEN] = wbytes
        row += nseg
        k += 1
    q[Q_LAST_AVAIL] = (last + k) & 0xFFFF
    return k  # chains taken before a fault are still handed out (and completed); the fault shows in q[Q_ERROR]


@kernel
def push_used(q, avail, used16, used32, mem, table, heads, lens, n, i8, i16, track):
    """Complete ``n`` chains with the lengths written; publish once, then notify if asked.

    With inflight tracking, in libvhost-user's order: link the batch (``desc[h].next = last_batch_head;
    last_batch_head = h``), publish the used index, clear each ``inflight``, then record ``used_idx``."""
    used = q[Q_USED_IDX]
    for i in range(n):
        h = heads[i]
        if not write_used(q, used32, mem, table, used + i, h, lens[i]):
            return False
        if track:
            i16[11 + 8 * h] = i16[6]  # desc[h].next = last_batch_head
            i16[6] = np.uint16(h)  # last_batch_head = h
    q[Q_CHAINS] += n
    q[Q_IDLE] = 0
    new_used = (used + n) & 0xFFFF
    if track:
        fence_full()
    if not flush_used(q, avail, used16, mem, table, new_used):
        return False
    if track:
        fence_full()
        for i in range(n):
            i8[16 + 16 * heads[i]] = 0
        fence_full()
        i16[7] = np.uint16(new_used)  # used_idx
    return True


@helper
def wait_head(q, desc, dev, mem, table, spins):
    """``wait_pending`` of a packed ring: the flags of the available descriptor at the avail cursor (> 0),
    POP_IDLE, POP_STOPPED or POP_BROKEN."""
    while True:
        if q[Q_STOP]:
            return POP_STOPPED
        f = PK.poll_head(q, desc, dev, mem, table, spins, True)
        if f != POLL_AGAIN:
            break
    if f == POLL_IDLE:
        return POP_IDLE
    return POP_BROKEN if f < 0 else f


@kernel
def pop_packed(q, desc, dev, mem, table, sg, chains, max_chains, spins, ids):
    """``pop_chains`` of a packed ring: take up to ``max_chains`` chains (walked and bounded by walk_packed:
    at most the descriptors the ring can still have in flight) from the avail cursor into ``chains``/``sg``,
    ``chains[k, C_HEAD]`` being the buffer id.  ``ids[id]`` holds the descriptors the chain with that id took
    while it is out (0: free): an id the driver makes available again before it was completed breaks the
    queue (PACKED_ID_IN_USE).  The chains taken before a fault are still handed out; the fault shows in
    q[Q_ERROR]."""
    f = wait_head(q, desc, dev, mem, table, spins)
    if f <= 0:
        return f
    size = q[Q_SIZE]
    room = size - PK.in_flight(q)  # descriptors the driver may have made available
    pos, wrap = q[Q_LAST_AVAIL], q[Q_AVAIL_WRAP]
    rows = size + MAX_INDIRECT  # rows one chain may need at most
    row = 0
    taken = 0
    k = 0
    while k < max_chains and taken < room and row + rows <= sg.shape[0]:
        nread, nseg, _r, wbytes, ndesc, bid = PK.walk_packed(
            q, desc, mem, table, pos, wrap, f, sg[row:], ANY, room - taken
        )
        if nread < 0:
            break
        if ids[bid] != 0:
            fail(q, QueueError.PACKED_ID_IN_USE, bid)
            break
        ids[bid] = ndesc
        chains[k, C_HEAD] = bid
        chains[k, C_FIRST] = row
        chains[k, C_NREAD] = nread
        chains[k, C_END] = row + nseg
        chains[k, C_WLEN] = wbytes
        row += nseg
        taken += ndesc
        k += 1
        pos, wrap = PK.advance(pos, wrap, ndesc, size)
        if k >= max_chains or taken >= room:
            break
        f = PK.read_head(q, desc, mem, table, pos, wrap)
        if f < 0:  # nothing more yet, or broken (q[Q_ERROR])
            break
    q[Q_LAST_AVAIL] = pos
    q[Q_AVAIL_WRAP] = wrap
    return k


@kernel
def push_packed(q, drv, desc, mem, table, shadow, ids, heads, lens, n):
    """``push_used`` of a packed ring: the ``n`` completed chains' used descriptors (buffer id, length written)
    written from the used cursor in completion order -- the cursor moving on by the descriptors each chain took
    (virtio 1.2 §2.8.21: in-order completion is not required) -- published at once, the driver notified if it
    asked to be; their ids are then free.  False if the queue broke."""
    for i in range(n):
        b = heads[i]
        shadow[i, PK.SH_ID] = b
        shadow[i, PK.SH_LEN] = lens[i]
        shadow[i, PK.SH_NDESC] = ids[b]
    published, ok = PK.flush_used(q, drv, desc, mem, table, shadow, n)
    if published:
        for i in range(n):
            ids[heads[i]] = 0
        q[Q_CHAINS] += n
        q[Q_IDLE] = 0
    return published and ok


@kernel
def walk_one(q, desc, mem, table, head, sg):
    """Walk the chain at ``head`` (a resubmitted one) into ``sg``: (readable segments, segments), or (-1, 0)."""
    nread, nseg, _r, _w = walk_chain(q, desc, mem, table, head, sg, ANY)
    return nread, nseg


class Request:
    """One chain given to :meth:`ChainDevice.submit`: ``readable`` and ``writable`` are memoryviews of guest
    memory, valid until :meth:`complete` is called -- once, from any thread."""

    __slots__ = ("queue", "head", "readable", "writable", "_sink", "_wmax", "_rows")

    def __init__(
        self,
        queue: int,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        sink: _Completions,
        wmax: int,
        rows: np.ndarray | None = None,
    ) -> None:
        self.queue, self.head, self.readable, self.writable = queue, head, readable, writable
        self._sink = [sink]
        self._wmax = wmax  # bytes the device may write (the used length is capped to it)
        self._rows = rows  # while dirty logging: the writable buffers' (arena offset, length) rows, logged whole

    @property
    def done(self) -> bool:
        return not self._sink

    def complete(self, written: int) -> None:
        """Finish the request: ``written`` bytes were written into ``writable`` (the used length)."""
        got = self._finish(written)
        if got is not None:
            got[0].put(*got[1])

    def _finish(self, written: int) -> tuple[_Completions, tuple[int, int, np.ndarray | None]] | None:
        """Release the buffers; return where the completion goes and what it is (None: completed already)."""
        try:
            sink = self._sink.pop()  # atomic: a second complete() finds the list empty
        except IndexError:
            log.error("queue %d: chain %d completed twice; the second completion is ignored", self.queue, self.head)
            return None
        n = 0
        try:  # whatever goes wrong here, the completion is delivered (a lost one would block the ring forever)
            n = min(max(int(written or 0), 0), self._wmax)
            for views in (self.readable, self.writable):
                for b in views:
                    try:
                        b.release()  # a view the device released already is fine
                    except BufferError:
                        log.error(
                            "queue %d: chain %d completed while its buffers are still in use", self.queue, self.head
                        )
        except Exception:
            log.exception("queue %d: completing chain %d (written=%r)", self.queue, self.head, written)
        self.readable = self.writable = []
        return sink, (self.head, n, self._rows)


def complete_all(done: list[tuple[Request, int]]) -> None:
    """Complete several requests, each with its used length, as :meth:`Request.complete` does one by one --
    but their ring's worker gets them together and is woken once: one used-index publish and one call for
    the lot instead of one per request."""
    if not done:
        return
    sink: _Completions | None = None
    items: list[tuple[int, int, np.ndarray | None]] = []
    for req, written in done:
        got = req._finish(written)
        if got is None:
            continue
        if got[0] is not sink:  # requests of another ring (a device may mix them): theirs go there
            if sink is not None:
                sink.put_many(items)
            sink, items = got[0], []
        items.append(got[1])
    if sink is not None:
        sink.put_many(items)


class _Completions:
    """Completions of one ring, from any thread; the ring's worker drains and publishes them.  A completion
    from another thread wakes the worker through ``fd`` if it sleeps (an eventfd, closed under the lock when
    the worker is done with the ring, so that a late writer never writes into a reused fd number)."""

    def __init__(self) -> None:
        self.items: collections.deque[tuple[int, int, np.ndarray | None]] = collections.deque()
        self.lock = threading.Lock()
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.owner = 0
        self.sleeping = False

    def put(self, head: int, n: int, rows: np.ndarray | None = None) -> None:
        self.items.append((head, n, rows))
        self._wake()

    def put_many(self, items: list[tuple[int, int, np.ndarray | None]]) -> None:
        self.items.extend(items)
        self._wake()

    def _wake(self) -> None:
        # the worker sets ``sleeping`` before it last looks at ``items``, and we look at ``sleeping`` after
        # appending: one of the two sees the other (both under the GIL), so a completion never goes unnoticed
        if self.sleeping and threading.get_ident() != self.owner:
            with self.lock:
                if self.fd >= 0:
                    os.eventfd_write(self.fd, 1)

    def sleep(self, fds: list[int], timeout: float) -> None:
        """Wait for a completion (or one of ``fds``), unless there is one already."""
        self.sleeping = True
        try:
            if not self.items:
                _wait([self.fd, *fds], timeout)
        finally:
            self.sleeping = False

    def close(self) -> None:
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def _wait(fds: list[int], timeout: float) -> None:
    ready, _, _ = select.select([fd for fd in fds if fd >= 0], [], [], timeout)
    for fd in ready:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass


class ChainDevice(Device):
    """A device written in plain Python: implement :meth:`handle` (or :meth:`submit`); pyvhost does the rest.

    Each chain reaches the device as lists of memoryviews of guest memory -- the device-readable buffers, then
    the device-writable ones.  ``handle`` processes a chain and returns at once; a device whose requests take
    time overrides ``submit`` instead, hands the :class:`Request` to a thread (or anything), and calls
    ``req.complete(written)`` when done: requests complete in any order and the queue goes on meanwhile.
    Chains are taken in batches of ``batch`` by compiled code (bounded and checked like every datapath) and
    completions are published in batches.  A ring is stopped (for a memory change, GET_VRING_BASE, a
    disconnect) once every request taken from it is complete -- or, if some do not complete within the
    backend's stop timeout, the queue is broken, those requests are logged (queue, head) and guest memory stays
    mapped until they complete; their completions are then dropped.

    Split and packed rings (VIRTIO_F_RING_PACKED) alike; on a packed ring ``Request.head`` is the chain's
    buffer id.  Chains in flight on a split ring are recorded in the inflight area when the front-end provides
    one (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): a back-end restarted after a crash resubmits the chains the
    crashed one had taken and not completed, once each, in the order they were taken, before new ones.  On a
    packed ring they are not (logged once per ring): the ring works, without that crash recovery.
    """

    #: chains taken per batch
    batch: int = 64
    #: empty polls before a worker sleeps on its kick fd
    spins: int = 2000
    #: completions published at the latest after this many, even in the middle of a batch
    publish_every: int = 8
    inflight_tracking = True

    def warm_up(self) -> None:
        warm_up()

    def handle(self, queue: int, readable: list[memoryview], writable: list[memoryview]) -> int:
        """Process one chain; return how many bytes were written into ``writable``."""
        raise NotImplementedError(f"{type(self).__name__} implements neither handle() nor submit()")

    def submit(self, req: Request) -> None:
        """Start processing a chain; ``req.complete(written)`` finishes it (the default: handle() at once)."""
        req.complete(self.handle(req.queue, req.readable, req.writable))

    def submit_batch(self, reqs: list[Request]) -> None:
        """Start processing chains one pass took off a ring, in ring order, ``publish_every`` at most at a time
        (what completes at once is published between lots).  The default submits each (and the ring's worker,
        seeing it is not overridden, does that itself, publishing completions as they come).  A device that
        overrides this takes them as a lot -- to hand them to a thread at once, say, and finish them with
        :func:`complete_all`; a request it leaves incomplete when it raises is completed with length 0."""
        for req in reqs:
            self.submit(req)

    def stopping(self, queue: int) -> None:
        """Ring ``queue`` is being left (stopped, broken or disconnected): complete now the requests the device
        holds back (e.g. waiting for a rate limit), since the ring waits for them only up to the stop timeout.
        Called from the ring's worker; the default holds nothing back."""

    def make_step(self, rings: list[Ring]) -> StepFn:
        (ring,) = rings
        mem = ring.mem
        arena, table = mem.arena.view, mem.table
        whole = arena.data  # the chains' buffers are slices of it (lives as long as ``arena`` here does)
        q = ring.q
        size = int(q[Q_SIZE])
        sg = new_sg(size * 2)
        batch = max(1, min(self.batch, size))
        chains = np.zeros((batch, CHAIN_COLS), dtype=np.int64)
        heads = np.zeros(size, dtype=np.int64)
        lens = np.zeros(size, dtype=np.int64)
        index, spins, submit, submit_batch, stopping, publish_every = (
            ring.index,
            self.spins,
            self.submit,
            self.submit_batch,
            self.stopping,
            self.publish_every,
        )
        batched = type(self).submit_batch is not ChainDevice.submit_batch
        name = type(self).__name__
        region = ring.inflight
        ist = np.zeros(2, dtype=np.int64)
        resubmit: collections.deque[int] = collections.deque()
        views = ring.views
        split = isinstance(views, RingViews)
        if not split and region is not None:
            untracked: set[int] = self.__dict__.setdefault("_untracked_rings", set())
            if index not in untracked:  # once per ring
                untracked.add(index)
                log.warning(
                    "vring %d: inflight tracking is split-ring only: requests in flight on this packed ring are "
                    "not recorded (no resubmission after a back-end crash)",
                    index,
                )
            region = None
        if region is not None:
            heads_in_flight, counter = region.recover(int(q[Q_USED_IDX]))
            resubmit.extend(heads_in_flight)
            ist[IST_COUNTER], ist[IST_TRACK] = counter, 1
            # the chains taken so far are the completed ones and the ones in flight (a prefix of the avail ring)
            q[Q_LAST_AVAIL] = (int(q[Q_USED_IDX]) + len(heads_in_flight)) & 0xFFFF
            if heads_in_flight:
                log.info(
                    "vring %d: resubmitting %d in-flight requests (heads %s)",
                    index,
                    len(heads_in_flight),
                    " ".join(map(str, heads_in_flight)),
                )
            i8, i16, i64 = region.u8, region.u16, region.u64
        else:
            i8, i16, i64 = _NO_U8, _NO_U16, _NO_U64
        track = int(ist[IST_TRACK])
        if isinstance(views, RingViews):
            desc, avail, used16, used32 = views.args()

            def pop(room: int, polls: int) -> int:
                return pop_chains(q, desc, avail, used16, arena, table, sg, chains, room, polls, i8, i64, ist)

            def push(k: int) -> bool:
                return push_used(q, avail, used16, used32, arena, table, heads, lens, k, i8, i16, track)

        else:
            desc, drv, dev = views.args()
            shadow = PK.new_shadow(size)
            ids = np.zeros(size, dtype=np.int64)  # descriptors taken by the chain with this buffer id (0: free)

            def pop(room: int, polls: int) -> int:
                return pop_packed(q, desc, dev, arena, table, sg, chains, room, polls, ids)

            def push(k: int) -> bool:
                return push_packed(q, drv, desc, arena, table, shadow, ids, heads, lens, k)

        done = _Completions()
        kick_fd = ring.kick_fd
        outstanding = 0
        taken: dict[int, int] = {}  # heads handed to the device, not yet reaped (how many times: a packed id reused)
        publish = True  # completions go to the used ring (until writing it fails)
        logging = bool(q[Q_LOG_SIZE])  # fixed while the step lives (the backend restarts it to switch)

        def request(head: int, rows: list[list[int]], nread: int, wlen: int) -> Request:
            nonlocal outstanding
            segs = [whole[o : o + ln] for o, ln in rows]
            # while dirty logging, what the device may write is logged (whole) when it completes the chain
            wrows = np.array(rows[nread:], dtype=np.int64).reshape(-1, 2) if logging and len(rows) > nread else None
            req = Request(index, head, segs[:nread], segs[nread:], done, wlen, wrows)
            outstanding += 1
            taken[head] = taken.get(head, 0) + 1
            return req

        def start(head: int, rows: list[list[int]], nread: int, wlen: int) -> None:
            req = request(head, rows, nread, wlen)
            try:
                submit(req)
            except Exception:
                log.exception("device %s: handling a chain of queue %d failed", name, index)
                if not req.done:
                    req.complete(0)

        def start_batch(reqs: list[Request]) -> None:
            try:
                submit_batch(reqs)
            except Exception:
                log.exception("device %s: handling %d chains of queue %d failed", name, len(reqs), index)
                complete_all([(req, 0) for req in reqs if not req.done])

        def forget(head: int) -> None:
            nonlocal outstanding
            outstanding -= 1
            left = taken[head] - 1
            if left:
                taken[head] = left
            else:
                del taken[head]

        def reap() -> bool:
            nonlocal publish
            items = done.items
            k = 0
            while items and k < size:
                heads[k], lens[k], wrows = items.popleft()
                if wrows is not None:  # the device's writes, logged before the used entry is published
                    log_rows(q, arena, table, wrows, len(wrows))
                forget(int(heads[k]))
                k += 1
            if not k:
                return True
            if not push(k):
                publish = False
            return publish

        def held() -> list[int]:
            """Heads still with the device (completions that came since are dropped: the ring is gone)."""
            while done.items:
                forget(done.items.popleft()[0])
            return sorted(h for h, k in taken.items() for _ in range(k))

        def drain(timeout: float) -> list[int]:
            """Leave the ring: wait up to ``timeout`` s for the requests taken, publishing their completions
            while the used ring can be written (else dropping them); return the heads still out."""
            deadline = time.monotonic() + timeout
            try:
                stopping(index)
            except Exception:
                log.exception("device %s: stopping queue %d failed", name, index)
            while outstanding:
                if not (publish and reap()):
                    held()
                left = deadline - time.monotonic()
                if not outstanding or left <= 0:
                    break
                done.sleep([], min(0.1, left))
            done.close()
            return held()

        def step(budget: int) -> int:
            done.owner = threading.get_ident()
            for _ in range(max(1, budget // 256)):
                if not reap():
                    return Step.BROKEN
                if q[Q_STOP]:
                    return Step.STOPPED  # the requests still out are waited for (bounded) by drain()
                if resubmit:  # one at a time, in the order they were first taken, before anything new
                    if outstanding:
                        done.sleep([], 0.1)
                        continue
                    head = resubmit.popleft()
                    nread, nseg = walk_one(q, desc, arena, table, head, sg)
                    if nread < 0:
                        return Step.BROKEN
                    rows = sg[:nseg].tolist()
                    start(head, rows, int(nread), sum(ln for _, ln in rows[nread:]))
                    continue
                room = min(batch, size - outstanding)
                if room <= 0:
                    done.sleep([], 0.1)
                    continue
                n = pop(room, spins if not outstanding else 64)
                if n == POP_STOPPED:
                    continue
                if n == POP_BROKEN:
                    return Step.BROKEN
                if n == POP_IDLE:
                    if q[Q_ERROR]:  # a fault at the first chain takes none: still a fault (an IOTLB miss?)
                        return Step.BROKEN
                    if not outstanding:
                        return Step.IDLE
                    if not done.items:
                        done.sleep([kick_fd], 0.1)
                    continue
                rows = sg[: int(chains[n - 1, C_END])].tolist()
                if batched:  # in lots of publish_every: what completes at once is published between lots
                    reqs = [request(h, rows[a:b], nread, w) for h, a, nread, b, w in chains[:n].tolist()]
                    for i in range(0, n, publish_every):
                        start_batch(reqs[i : i + publish_every])
                        if len(done.items) >= publish_every and not reap():
                            return Step.BROKEN
                    if q[Q_ERROR]:
                        return Step.BROKEN
                    continue
                for head, first, nread, end, wlen in chains[:n].tolist():
                    start(head, rows[first:end], nread, wlen)
                    if len(done.items) >= publish_every:  # keep the driver busy while the batch goes on
                        if not reap():
                            return Step.BROKEN
                if q[Q_ERROR]:
                    return Step.BROKEN  # the fault that ended the batch; drain() completes the chains before it
            return Step.MORE

        step.drain = drain  # type: ignore[attr-defined]
        step.held = held  # type: ignore[attr-defined]
        return step


def discard_split(ring: Ring, spins: int = 64) -> StepFn:
    """The step of a started but disabled split ring whose buffers are processed and discarded (a net TX
    queue): take chains (walked and bounded as always), complete each with length 0, count them in Q_DROPS."""
    q = ring.q
    arena, table = ring.mem.arena.view, ring.mem.table
    assert isinstance(ring.views, RingViews), "a split ring"
    desc, avail, used16, used32 = ring.views.args()
    size = int(q[Q_SIZE])
    batch = max(1, min(64, size))
    sg = new_sg(size * 2)
    chains = np.zeros((batch, CHAIN_COLS), dtype=np.int64)
    heads = np.zeros(batch, dtype=np.int64)
    lens = np.zeros(batch, dtype=np.int64)
    ist = np.zeros(2, dtype=np.int64)

    def step(budget: int) -> int:
        for _ in range(max(1, budget // 256)):
            n = pop_chains(q, desc, avail, used16, arena, table, sg, chains, batch, spins, _NO_U8, _NO_U64, ist)
            if n == POP_STOPPED:
                return Step.STOPPED
            if n == POP_BROKEN:
                return Step.BROKEN
            if n == POP_IDLE:  # (a fault at the first chain takes none)
                return Step.BROKEN if q[Q_ERROR] else Step.IDLE
            heads[:n] = chains[:n, C_HEAD]
            q[Q_DROPS] += n  # counted before the driver sees them completed
            if not push_used(q, avail, used16, used32, arena, table, heads, lens, n, _NO_U8, _NO_U16, 0):
                return Step.BROKEN
            if q[Q_ERROR]:
                return Step.BROKEN
        return Step.MORE

    return step


def warm_up() -> None:
    """Compile (or load from the on-disk cache) the ChainDevice kernels on a tiny idle ring, so that the first
    connection does not wait for the compiler."""

    mem = GuestMemory(arena_size=1 << 21)
    try:
        q = new_queue_state(1)
        q[Q_STOP] = 1  # return at once
        sg = new_sg(2)
        chains = np.zeros((1, CHAIN_COLS), dtype=np.int64)
        ist = np.zeros(2, dtype=np.int64)
        ints = np.zeros(1, dtype=np.int64)
        pop_chains(q, _NO_U64, _NO_U16, _NO_U16, mem.arena.view, mem.table, sg, chains, 1, 1, _NO_U8, _NO_U64, ist)
        push_used(q, _NO_U16, _NO_U16, _NO_U32, mem.arena.view, mem.table, ints, ints, 0, _NO_U8, _NO_U16, 0)
        walk_one(q, _NO_U64, mem.arena.view, mem.table, -1, sg)
        pq = PK.new_packed_state(1)
        pq[Q_STOP] = 1
        pop_packed(pq, _NO_U64, _NO_U16, mem.arena.view, mem.table, sg, chains, 1, 1, ints)
        push_packed(pq, _NO_U16, _NO_U64, mem.arena.view, mem.table, PK.new_shadow(1), ints, ints, ints, 0)
    finally:
        mem.close()
