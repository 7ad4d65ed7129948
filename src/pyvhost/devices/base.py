"""The device API: what a virtio device built on pyvhost provides to the backend.

A device says which virtio features it offers, what its config space holds, how many queues it has, and how
its queues are served: ``workers()`` groups queue indices, and ``make_step()`` returns, for one group, the
function a worker thread calls in a loop.  The step runs one bounded pass over its rings (normally a compiled
kernel that releases the GIL) and returns a :class:`Step` status.
"""

from __future__ import annotations

import abc
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..access import RingViews
from ..memory import GuestMemory

log = logging.getLogger(__name__)

# virtio 1.2 transport feature bits the backend handles for every device
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ANY_LAYOUT = 27


class Step(enum.IntEnum):
    """What one pass of a worker's loop found."""

    BROKEN = -1   # a ring is broken (its q[Q_ERROR] says why)
    IDLE = 0      # nothing to do; notifications are enabled, sleep on the kick fds
    MORE = 1      # budget used up with work left; call again
    STOPPED = 2   # the control plane asked the worker to stop


@dataclass
class Ring:
    """What a step function gets for one ring: its state array, its views, and the memory they belong to."""

    index: int
    q: np.ndarray
    views: RingViews
    mem: GuestMemory


StepFn = Callable[[int], int]


class Device(abc.ABC):
    """Subclass this to write a device."""

    #: virtio device id (1 = net, 2 = block)
    device_id: int = 0
    #: device-specific feature bits offered (the backend adds VERSION_1, INDIRECT_DESC, EVENT_IDX)
    features: int = 0
    #: number of virtqueues
    num_queues: int = 1

    def config_space(self) -> bytes:
        """The device's config space (GET_CONFIG reads from it)."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """SET_CONFIG; read-only by default."""
        raise ValueError("config space is read-only")

    def set_features(self, features: int) -> None:
        """Called with the negotiated features (transport bits included)."""
        self.negotiated = features

    def workers(self) -> list[tuple[int, ...]]:
        """Queue groups, each served by one worker thread.  Default: one worker per queue."""
        return [(i,) for i in range(self.num_queues)]

    @abc.abstractmethod
    def make_step(self, rings: list[Ring]) -> StepFn:
        """The function a worker calls with a budget of passes; it returns a Step value."""

    def prepare_queue(self, index: int, q: np.ndarray) -> None:
        """Set device-specific fields of a queue's state before its worker starts."""

    def stats(self) -> dict:
        return {}


# ---------------------------------------------------------------------------------------------------------
# Devices in plain Python: compiled code takes chains off the ring and puts completions back; the device's
# handle() sees each chain as lists of memoryviews of guest memory.
from ..chain import ANY, MAX_INDIRECT, new_sg, walk_chain  # noqa: E402
from ..jit import kernel  # noqa: E402
from ..ring.split import (Q_CHAINS, Q_ERROR, Q_IDLE, Q_LAST_AVAIL, Q_SIZE, Q_STOP, Q_USED_IDX, Q_WAKEUPS,  # noqa: E402
                          avail_pending, flush_used, read_avail_entry, set_notify, write_used)
from ..atomic import fence_full  # noqa: E402

#: pop_chains results besides a chain count
POP_IDLE, POP_BROKEN, POP_STOPPED = 0, -1, -2
#: columns of the chains array: head, first sg row, readable segments, sg row after the last segment
C_HEAD, C_FIRST, C_NREAD, C_END = 0, 1, 2, 3


@kernel
def pop_chains(q, desc, avail, used16, mem, table, sg, chains, max_chains, spins):
    """Take up to ``max_chains`` chains (walked and bounded) off the avail ring into ``chains``/``sg``.

    Polls up to ``spins`` times; with nothing to take, asks for kicks, looks once more, and returns POP_IDLE.
    The chains are in flight until push_used() completes them (the worker does both in one step, so a stop
    never finds chains in flight)."""
    for _ in range(spins):
        if q[Q_STOP]:
            return POP_STOPPED
        n = avail_pending(q, avail, mem, table)
        if n < 0:
            return POP_BROKEN
        if n > 0:
            break
    else:
        if not set_notify(q, used16, mem, table, 1):
            return POP_BROKEN
        fence_full()
        n = avail_pending(q, avail, mem, table)
        if n <= 0:
            return POP_BROKEN if n < 0 else POP_IDLE
    if not set_notify(q, used16, mem, table, 0):
        return POP_BROKEN
    q[Q_WAKEUPS] += 1
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
    return k  # chains taken before a fault are still handed out (and completed); the fault shows in q[Q_ERROR]


@kernel
def push_used(q, avail, used16, used32, mem, table, chains, lens, n):
    """Complete ``n`` chains with the lengths written; publish once, then notify if asked."""
    used = q[Q_USED_IDX]
    for i in range(n):
        if not write_used(q, used32, mem, table, used + i, chains[i, C_HEAD], lens[i]):
            return False
    q[Q_CHAINS] += n
    q[Q_IDLE] = 0
    return flush_used(q, avail, used16, mem, table, (used + n) & 0xFFFF)


class ChainDevice(Device):
    """A device written in plain Python: implement :meth:`handle`; pyvhost does the rest.

    Each chain reaches ``handle`` as lists of memoryviews of guest memory -- the device-readable buffers, then
    the device-writable ones -- valid only during the call.  Chains are taken in batches of ``batch`` by
    compiled code (bounded and checked like every datapath), and completed in one publish per batch.
    """

    #: chains taken per batch
    batch: int = 64
    #: empty polls before a worker sleeps on its kick fd
    spins: int = 2000

    @abc.abstractmethod
    def handle(self, queue: int, readable: list[memoryview], writable: list[memoryview]) -> int:
        """Process one chain; return how many bytes were written into ``writable``."""

    def make_step(self, rings: list[Ring]) -> StepFn:
        (ring,) = rings
        mem = ring.mem
        arena, table = mem.arena.view, mem.table
        q = ring.q
        desc, avail, used16, used32 = ring.views.args()
        sg = new_sg(int(q[Q_SIZE]) * 2)
        chains = np.zeros((self.batch, 4), dtype=np.int64)
        lens = np.zeros(self.batch, dtype=np.int64)
        handle, index, batch, spins = self.handle, ring.index, self.batch, self.spins

        def step(budget: int) -> int:
            for _ in range(max(1, budget // 256)):
                n = pop_chains(q, desc, avail, used16, arena, table, sg, chains, batch, spins)
                if n == POP_STOPPED:
                    return Step.STOPPED
                if n == POP_IDLE:
                    return Step.IDLE
                if n == POP_BROKEN:
                    return Step.BROKEN
                for i in range(n):
                    head, first, nread, end = (int(x) for x in chains[i])
                    segs = [memoryview(arena[o:o + ln]) for o, ln in sg[first:end]]
                    try:
                        written = handle(index, segs[:nread], segs[nread:])
                        wmax = sum(len(s) for s in segs[nread:])
                        lens[i] = min(max(int(written or 0), 0), wmax)
                    except Exception:
                        log.exception("device %s: handling a chain of queue %d failed", type(self).__name__, index)
                        lens[i] = 0
                    finally:
                        for s in segs:
                            s.release()
                if not push_used(q, avail, used16, used32, arena, table, chains, lens, n):
                    return Step.BROKEN
                if q[Q_ERROR]:
                    return Step.BROKEN  # the fault that ended the batch; the chains before it are completed
            return Step.MORE

        return step
