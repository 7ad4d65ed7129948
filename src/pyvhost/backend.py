"""The vhost-user back-end: one handler per request id, the vring state machine, and the worker threads.

Ring lifecycle (docs/interop/vhost-user.rst "Ring states"): a ring is *started* by SET_VRING_KICK and
*stopped* by GET_VRING_BASE; it is *enabled* from the start when VHOST_USER_F_PROTOCOL_FEATURES is not
negotiated, otherwise by SET_VRING_ENABLE.  A worker runs over a group of rings while all of them are started,
enabled and have a size and addresses.  A ring that is started but disabled "must be processed without causing
any side effects": the device says whether and how (``Device.discard_step``: a net TX queue's frames are taken
and discarded; an RX queue is given nothing).

Invariant 1 (no stale view): anything that changes memory or ring addresses first stops the affected workers
(each acknowledges by leaving its compiled loop, draining what it handed out and being joined), then drops
their views, then unmaps, then bumps the generation; workers restart with views built for the new generation.
Stopping is bounded (STOP_TIMEOUT): a worker that does not end in time, or whose requests are still with the
device, breaks its queue, and guest memory then stays mapped until those requests complete -- a deliberate,
logged leak rather than an unmap under a view in use.

Behind a vIOMMU (``VIRTIO_F_ACCESS_PLATFORM``, offered for devices with ``Device.access_platform``) ring and
buffer addresses are IOVAs, translated through the IOTLB the front-end fills with IOTLB_MSG UPDATEs.  Workers
run with a translation table composed from the IOTLB when they started (``GuestMemory.set_iova_map``); an
UPDATE does not stop them.  A worker that faults on an IOVA its table lacks asks the front-end with a MISS on
the backend channel and sleeps (on its eventfds, no polling) until an UPDATE covers it -- then the control plane
restarts it with a new table -- or until ``MISS_TRIES`` MISS messages ``MISS_INTERVAL`` apart went unanswered
(then the queue breaks).  An INVALIDATE (or an UPDATE changing a mapping) that touches any translation a
worker's table may hold stops *every* worker (their requests in flight finished or given back, bounded by
STOP_TIMEOUT), then the table is rebuilt without it, and only then is the message acknowledged (invariant 6):
stopping all queues rather than only those whose rings or buffers overlap is simpler and as safe -- any
worker's table maps every IOVA a descriptor may name.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import select
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import protocol as P
from . import sigbus
from .access import Metadata, PackedViews, RingViews, bind, bind_packed, check_alignment
from .devices.base import (
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_ANY_LAYOUT,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    Device,
    Ring,
    Step,
)
from .dirtylog import DirtyLog, DirtyLogError, check_ring_log_addr, guest_end
from .errors import QueueError, describe
from .iotlb import IOTLB_DENIED, IOTLB_MISS, IOTLB_OK, Iotlb
from .memory import SPACE_UVA, GuestMemory, MappedRegion, MemoryError_
from .protocol import ProtocolError
from .protocol import ProtocolFeature as PF
from .protocol import Request as R
from .ring import inflight
from .ring import packed as PK
from .ring.split import MAX_QUEUE_SIZE, avail_bytes, desc_bytes, used_bytes
from .ring.state import (
    Q_AVAIL_WRAP,
    Q_BATCH,
    Q_BYTES,
    Q_CALL_MISSED,
    Q_CALLFD,
    Q_CALLS,
    Q_CHAINS,
    Q_DROPS,
    Q_ERROR,
    Q_ERROR_VALUE,
    Q_EVENT_IDX,
    Q_FAULT_LEN,
    Q_FAULT_WRITE,
    Q_LAST_AVAIL,
    Q_LOG_OFF,
    Q_LOG_SIZE,
    Q_NOTIFY_ON,
    Q_PACKETS,
    Q_SIGNALLED_VALID,
    Q_STOP,
    Q_USED_IDX,
    Q_USED_WRAP,
    Q_WAKEUPS,
    new_queue_state,
)

log = logging.getLogger(__name__)

TRANSPORT_FEATURES = (
    (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_F_ANY_LAYOUT)
    | (1 << VIRTIO_F_RING_PACKED)
    | (1 << P.VHOST_USER_F_PROTOCOL_FEATURES)
    | (1 << P.VHOST_F_LOG_ALL)
)
PROTOCOL_FEATURES = (
    (1 << PF.MQ)
    | (1 << PF.REPLY_ACK)
    | (1 << PF.CONFIG)
    | (1 << PF.CONFIGURE_MEM_SLOTS)
    | (1 << PF.STATUS)
    | (1 << PF.LOG_SHMFD)
)
#: Passes a worker's compiled loop makes before it returns to Python (bounds the stop latency).
DEFAULT_BUDGET = 4096
#: Seconds a peer may take to send the rest of a message it has begun (and to take a reply).
MESSAGE_TIMEOUT = 5.0
#: Ended connections whose counters the server keeps.
HISTORY = 64
#: Seconds a worker gets to leave its loop and finish (or give up) the requests it handed out, when the control
#: plane stops it or when it ends on its own.  Past it, the queue is broken, the requests still out are logged,
#: and the memory they may touch stays mapped until they complete (never unmapped under them).
STOP_TIMEOUT = 5.0
#: Seconds more the control plane waits for a worker that gave up on its requests to leave.
STOP_GRACE = 1.0
#: IOTLB MISS messages a queue sends for one IOVA (``MISS_INTERVAL`` seconds apart) before it breaks; the count
#: starts again with every UPDATE or INVALIDATE the front-end sends meanwhile.
MISS_TRIES = 5
MISS_INTERVAL = 1.0
#: Queue errors that behind a vIOMMU may be an IOTLB miss rather than the guest's fault.
_ADDRESS_FAULTS = (QueueError.RING_UNMAPPED, QueueError.BAD_ADDRESS, QueueError.INDIRECT_UNMAPPED)
_PERM_NAMES = {P.VHOST_ACCESS_RO: "read", P.VHOST_ACCESS_WO: "write", P.VHOST_ACCESS_RW: "read/write"}
#: Entries of IOTLB snapshots handed to running workers that the backend remembers (``Connection.exposed``)
#: before it stops every worker to start afresh from the current IOTLB alone.
EXPOSED_MAX = 8 * 2048


class VringError(ProtocolError):
    pass


@dataclass
class Vring:
    """Control-plane state of one virtqueue."""

    index: int
    size: int = 0
    addr: P.VringAddr | None = None
    base: int = 0
    base_given: bool = False  # packed rings: SET_VRING_BASE was received (else both cursors start at 0, wrap 1)
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    enabled: bool = False
    started: bool = False
    broken: bool = False
    q: np.ndarray = field(default_factory=lambda: new_queue_state(1))
    views: RingViews | PackedViews | None = None

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        self.q[Q_CALLFD] = -1

    @property
    def ready(self) -> bool:
        return self.started and self.enabled and self.size > 0 and self.addr is not None and not self.broken


class Worker(threading.Thread):
    """Runs a device's step function over a group of rings until stopped or a ring breaks.

    Every exit -- stopped, a broken ring, an fd error, an exception in the step -- ends with the step's
    ``drain`` (if it has one, see devices/base.py), bounded in time: the worker is quiet only once nothing it
    handed out may still use the rings' memory.  ``held`` then says what is still out."""

    def __init__(
        self,
        conn: Connection,
        rings: list[Vring],
        step,
        budget: int,
        timeout: float = STOP_TIMEOUT,
        cpu: int | None = None,
    ) -> None:
        super().__init__(name=f"pyvhost-q{'-'.join(str(r.index) for r in rings)}", daemon=True)
        self.conn, self.rings, self.step, self.budget = conn, rings, step, budget
        #: the CPU this worker's thread pins itself to (None: the process's affinity)
        self.cpu = cpu
        self.timeout = timeout
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.wake_lock = threading.Lock()  # the fd is closed by whichever of run() and stop() ends last
        self.fault: str | None = None
        self.deadline: float | None = None  # set by stop(): when the drain gives up
        #: heads of chains whose buffers may still be in use after the drain ([] none; None unknown)
        self.held: list[int] | None = None
        #: behind a vIOMMU: written by the control plane on every IOTLB change while the worker waits for a MISS
        self.iotlb_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        #: the IOTLB generation its translation table was composed from (Connection.map_generation)
        self.map_generation = conn.map_generation
        #: (iova, length, perm, covered) the worker waits for after an IOTLB fault, or None
        self.waiting: tuple[int, int, int, bool] | None = None

    def run(self) -> None:
        reason: str | None = None
        try:
            if self.cpu is not None:  # this thread only (its kernel thread id); the process's mask is left alone
                os.sched_setaffinity(threading.get_native_id(), {self.cpu})
            reason = self._loop()
        except Exception as e:  # a bug, not the guest's fault: say so, break the queue, keep the process
            log.exception("worker %s failed", self.name)
            self.fault = "exception"
            reason = f"its worker failed ({type(e).__name__}: {e})"
        finally:
            self._drain()
        if reason is not None:
            self.conn.ring_broken(self.rings, reason or None)

    def _loop(self) -> str | None:
        """Call the step until it stops (None) or a ring breaks ("": the queue state says why, else the reason)."""
        while True:
            status = self.step(self.budget)
            if status == Step.MORE:
                continue
            if status == Step.STOPPED:
                return None
            if status == Step.BROKEN:
                return self._iotlb_wait() if self.conn.iommu else ""
            fds = [r.kick_fd for r in self.rings if r.kick_fd >= 0] + [self.wake_fd]
            # a step may also sleep on fds of its own (``step.wait_fds``: a tap, a socket); those wake the
            # worker when readable and are left for the step to read
            extra = list(getattr(self.step, "wait_fds", ()))
            ready, _, _ = select.select(fds + extra, [], [], 1.0)
            for fd in ready:
                if fd in extra:
                    continue
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass
                except OSError as e:
                    return f"reading its kick fd failed ({e})"

    def _iotlb_wait(self) -> str | None:
        """A ring faulted behind a vIOMMU: if the IOVA is missing from the IOTLB, send MISS and sleep until the
        control plane restarts the worker (an UPDATE covered it: None) or MISS_TRIES went unanswered (the
        reason the queue breaks).  "" if the fault is the guest's (the queue state says why)."""
        verdict = self.conn.iotlb_fault(self)
        if verdict is not None:
            return verdict
        assert self.waiting is not None
        iova, _length, perm, covered = self.waiting
        tries = 0
        # a MISS goes out MISS_INTERVAL apart, never on an IOTLB change: an UPDATE for another IOVA (another
        # queue's answer) that made each waiting worker ask again would get each of those asks answered by an
        # UPDATE in turn -- MISS/UPDATE ping-pong between the waiting queues that floods the front-end
        next_miss = time.monotonic()
        while True:
            timeout = MISS_INTERVAL
            if not covered:
                now = time.monotonic()
                if now >= next_miss:
                    if tries == MISS_TRIES:
                        return (
                            f"IOTLB miss at iova {iova:#x} ({_PERM_NAMES.get(perm, perm)}) not answered after "
                            f"{MISS_TRIES} MISS messages {MISS_INTERVAL:g} s apart"
                        )
                    if self.conn.send_miss(iova, perm):
                        tries += 1  # (a MISS the full channel did not take is tried again, not counted)
                    next_miss = now + MISS_INTERVAL
                timeout = max(0.0, next_miss - now)
            ready, _, _ = select.select([self.wake_fd, self.iotlb_fd], [], [], timeout)
            if self.wake_fd in ready or any(r.q[Q_STOP] for r in self.rings):
                return None  # stopped (to be restarted with the new translation, or for good)
            if self.iotlb_fd in ready:
                try:
                    os.eventfd_read(self.iotlb_fd)
                except BlockingIOError:
                    pass
                tries = 0  # the front-end is answering: a fresh count of tries

    def _drain(self) -> None:
        """Let the step finish or drop what it took, for at most the time left (see ``stop``)."""
        drain = getattr(self.step, "drain", None)
        timeout = self.timeout if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        try:
            self.held = list(drain(timeout)) if drain is not None else []
        except Exception:
            log.exception("worker %s: draining its queues failed; their memory stays mapped", self.name)
            self.held = None
        if self.held:
            log.error(
                "queues %s: requests still in flight after %.1f s (heads %s); their buffers stay mapped "
                "until they complete",
                "/".join(str(r.index) for r in self.rings),
                timeout,
                " ".join(map(str, self.held)),
            )
        with self.wake_lock:
            os.close(self.wake_fd)
            self.wake_fd = -1
            os.close(self.iotlb_fd)
            self.iotlb_fd = -1

    def iotlb_changed(self) -> None:
        """The IOTLB changed (without covering what the worker waits for): its count of MISS tries restarts."""
        with self.wake_lock:
            if self.iotlb_fd >= 0:
                os.eventfd_write(self.iotlb_fd, 1)

    def request_stop(self, deadline: float) -> None:
        """Ask the worker to leave its loop; its drain gives up at ``deadline`` (time.monotonic())."""
        self.deadline = deadline
        for r in self.rings:
            r.q[Q_STOP] = 1
        with self.wake_lock:
            if self.wake_fd >= 0:
                os.eventfd_write(self.wake_fd, 1)

    def wait_stopped(self, deadline: float) -> bool:
        """Wait (until ``deadline`` plus STOP_GRACE) for the worker to end; True if it ended and holds nothing."""
        self.join(max(0.0, deadline - time.monotonic()) + STOP_GRACE)
        if self.is_alive():
            return False
        for r in self.rings:
            r.q[Q_STOP] = 0
        return self.holding() == []

    def stop(self, timeout: float | None = None) -> bool:
        """Stop and join, within ``timeout`` (default: the worker's) plus STOP_GRACE; see ``wait_stopped``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self.request_stop(deadline)
        return self.wait_stopped(deadline)

    def holding(self) -> list[int] | None:
        """What the worker's requests still hold, asked again: [] nothing; None unknown (still running, or the
        drain failed).  Only once the worker has ended (the step's ``held`` is not thread-safe)."""
        if self.is_alive():
            return None
        held_fn = getattr(self.step, "held", None)
        if self.held and held_fn is not None:
            try:
                self.held = list(held_fn())
            except Exception:
                log.exception("worker %s: asking what its requests hold failed", self.name)
                self.held = None
        return self.held


class Connection:
    """One front-end connection: message handlers and device state."""

    def __init__(
        self,
        sock: socket.socket,
        device: Device,
        metadata: Metadata,
        budget: int = DEFAULT_BUDGET,
        batch: int = 256,
        fault_fd: int = -1,
        stop_timeout: float = STOP_TIMEOUT,
        cpus: tuple[int, ...] = (),
    ) -> None:
        self.sock = sock
        self.device = device
        self.metadata = metadata
        self.budget = budget
        self.batch = batch
        self.stop_timeout = stop_timeout
        #: CPUs the workers pin themselves to: the k-th queue group of ``Device.workers`` on cpus[k % len]
        self.cpus = cpus
        #: regions ADD_MEM_REG gave more than once (QEMU < 8.1 with several queue pairs): how many times
        self.region_holders: dict[P.MemRegion, int] = {}
        #: eventfd the SIGBUS guard writes when a region's file was truncated under us (the server's; -1: none)
        self.fault_fd = fault_fd
        self.mem = GuestMemory(notify_fd=fault_fd)
        #: workers that ended (or not) with requests still holding guest memory: while any is left, no region
        #: is unmapped -- regions replaced meanwhile wait in ``kept`` (and whole memories in ``kept_memory``)
        self.stuck: list[Worker] = []
        self.kept: list[tuple[GuestMemory, MappedRegion]] = []
        self.kept_memory: list[GuestMemory] = []
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.status = 0
        self.vrings = [Vring(i) for i in range(device.num_queues)]
        self.workers: dict[tuple[int, ...], Worker] = {}
        #: workers of rings that are started but disabled, by ring index (``Device.discard_step``)
        self.discarding: dict[int, Worker] = {}
        self.lock = threading.Lock()
        self.handlers = {
            R.GET_FEATURES: self.get_features,
            R.SET_FEATURES: self.set_features,
            R.GET_PROTOCOL_FEATURES: self.get_protocol_features,
            R.SET_PROTOCOL_FEATURES: self.set_protocol_features,
            R.SET_OWNER: self.set_owner,
            R.RESET_OWNER: self.reset_owner,
            R.SET_MEM_TABLE: self.set_mem_table,
            R.GET_MAX_MEM_SLOTS: self.get_max_mem_slots,
            R.ADD_MEM_REG: self.add_mem_reg,
            R.REM_MEM_REG: self.rem_mem_reg,
            R.SET_VRING_NUM: self.set_vring_num,
            R.SET_VRING_ADDR: self.set_vring_addr,
            R.SET_VRING_BASE: self.set_vring_base,
            R.GET_VRING_BASE: self.get_vring_base,
            R.SET_VRING_KICK: self.set_vring_kick,
            R.SET_VRING_CALL: self.set_vring_call,
            R.SET_VRING_ERR: self.set_vring_err,
            R.SET_VRING_ENABLE: self.set_vring_enable,
            R.GET_QUEUE_NUM: self.get_queue_num,
            R.SET_STATUS: self.set_status,
            R.GET_STATUS: self.get_status,
            R.GET_CONFIG: self.get_config,
            R.SET_CONFIG: self.set_config,
            R.GET_INFLIGHT_FD: self.get_inflight_fd,
            R.SET_INFLIGHT_FD: self.set_inflight_fd,
            R.SET_LOG_BASE: self.set_log_base,
            R.SET_LOG_FD: self.set_log_fd,
            R.SET_BACKEND_REQ_FD: self.set_backend_req_fd,
            R.IOTLB_MSG: self.iotlb_msg,
        }
        #: requests whose reply is their answer (a failure still owes one, of the right shape)
        self.replies: dict[int, int | None] = {
            R.GET_FEATURES: 8,
            R.GET_PROTOCOL_FEATURES: 8,
            R.GET_VRING_BASE: 8,
            R.GET_QUEUE_NUM: 8,
            R.GET_MAX_MEM_SLOTS: 8,
            R.GET_STATUS: 8,
            R.GET_CONFIG: None,
            R.GET_INFLIGHT_FD: inflight.PAYLOAD_SIZE,
        }
        self.inflight: inflight.InflightArea | None = None
        #: the dirty log (SET_LOG_BASE), mapped in the guest memory arena; written while VHOST_F_LOG_ALL is on
        self.log: DirtyLog | None = None
        #: SET_LOG_FD's eventfd (kept for the front-end's sake; QEMU reads the bitmap itself)
        self.log_fd = -1
        #: counters of queue states that were replaced (a ring set up again, the connection reset): stats()
        #: adds the live ones, so counters are cumulative over ring restarts
        self.totals: dict[int, dict[str, int]] = {}
        #: messages that failed: malformed (counted by the server) or failed by their handler
        self.failed = 0
        # -- vIOMMU (VIRTIO_F_ACCESS_PLATFORM) --
        #: what the front-end mapped (IOTLB_MSG UPDATE/INVALIDATE); guarded by iotlb_lock (workers read it)
        self.iotlb = Iotlb()
        self.iotlb_lock = threading.Lock()
        #: every mapping in a translation table some running worker may still hold (the union of the IOTLB
        #: snapshots handed out since every worker last stopped): an INVALIDATE touching it stops them all
        self.exposed = Iotlb(max_entries=EXPOSED_MAX * 2)
        #: the IOTLB generation the memory's translation table was composed from (-1: not yet)
        self.map_generation = -1
        #: the backend channel (SET_BACKEND_REQ_FD): MISS and ACCESS_FAIL go there
        self.backend_sock: socket.socket | None = None
        self.backend_lock = threading.Lock()
        self.warned_no_channel = False
        #: IOTLB messages taken (UPDATE, INVALIDATE) and sent (MISS): logged when the connection ends
        self.iotlb_counts = {P.VHOST_IOTLB_UPDATE: 0, P.VHOST_IOTLB_INVALIDATE: 0, P.VHOST_IOTLB_MISS: 0}
        #: written by a worker whose faulting IOVA an UPDATE had already covered: the server's selector
        #: then has the control plane restart it with a new table (``wake_waiting``)
        self.resume_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    # -- dispatch ---------------------------------------------------------------------------------------
    def handle(self, msg: P.Message) -> None:
        """Handle one message: call its handler, send what is owed, never raise for the peer's mistakes."""
        handler = self.handlers.get(msg.request)  # type: ignore[call-overload]
        reply: bytes | None = None
        ok = True
        try:
            if handler is None:
                raise ProtocolError(f"unsupported request {msg.name}")
            reply = handler(msg)
        except (ProtocolError, MemoryError_, OSError, ValueError) as e:
            ok = False
            log.error("%s failed: %s", msg.name, e)
        except Exception:  # a bug in a handler: fail this request, keep the connection and the process
            ok = False
            log.exception("%s failed unexpectedly", msg.name)
        finally:
            msg.close_fds()
        if not ok:
            self.failed += 1
        self.answer(msg, reply, ok)

    def answer(self, msg: P.Message, reply: bytes | None, ok: bool) -> None:
        """Send what ``msg`` is owed: its reply (of the right shape even on failure), or a REPLY_ACK status."""
        acked = msg.need_reply and self.protocol_features & (1 << PF.REPLY_ACK)
        if msg.request in self.replies or (
            # QEMU reads a (payload-less) reply to SET_LOG_BASE whenever LOG_SHMFD is negotiated, without asking
            # for an ack; a front-end that asks for one gets the REPLY_ACK status instead (which says whether it
            # failed)
            msg.request == R.SET_LOG_BASE and self.protocol_features & (1 << PF.LOG_SHMFD) and not acked
        ):
            fds: list[int] | None = None
            if isinstance(reply, tuple):  # a reply that carries fds
                reply, fds = reply
            if reply is None:
                size = self.replies.get(msg.request, 0)
                reply = bytes(size if size is not None else len(msg.payload))
                if not ok and msg.request == R.SET_LOG_BASE:
                    # empty means accepted; a refused log says so by a u64 status (QEMU reads and ignores it)
                    reply = P.U64.pack(1)
            try:
                P.send_message(self.sock, msg.request, reply, fds, flags=P.VHOST_USER_VERSION | P.VHOST_USER_REPLY_MASK)
            finally:
                for fd in fds or ():  # the peer has its own copies now
                    os.close(fd)
        elif acked:
            P.send_reply(self.sock, msg.request, P.U64.pack(0 if ok else 1))

    def vring(self, index: int) -> Vring:
        if index >= len(self.vrings):
            raise VringError(f"vring index {index} out of range (device has {len(self.vrings)} queues)")
        return self.vrings[index]

    # -- features and ownership -------------------------------------------------------------------------
    @property
    def offered_features(self) -> int:
        platform = (1 << VIRTIO_F_ACCESS_PLATFORM) if self.device.access_platform else 0
        return (self.device.features | TRANSPORT_FEATURES | platform) & ~self.device.transport_features_off

    @property
    def offered_protocol_features(self) -> int:
        out = PROTOCOL_FEATURES | ((1 << PF.INFLIGHT_SHMFD) if self.device.inflight_tracking else 0)
        if self.device.access_platform:  # the backend channel carries IOTLB misses
            out |= 1 << PF.BACKEND_REQ
        return out

    def get_features(self, msg: P.Message) -> bytes:
        return P.U64.pack(self.offered_features)

    def set_features(self, msg: P.Message) -> None:
        features = msg.u64()
        extra = features & ~self.offered_features
        if extra:
            raise ProtocolError(f"SET_FEATURES asks for features not offered: {extra:#x}")
        if features != self.features:
            # workers run with what the old features implied (a header size, the ring layout...): stop them,
            # apply the new features at this quiescent point, then restart them
            self.stop_workers()
        if (features ^ self.features) & (1 << VIRTIO_F_ACCESS_PLATFORM):
            # addresses change meaning (IOVAs or not): no translation or view of the other kind survives
            self._set_platform(bool(features & (1 << VIRTIO_F_ACCESS_PLATFORM)))
        if (features ^ self.features) & (1 << VIRTIO_F_RING_PACKED):
            # the ring layout changes: no view or state of the other one survives
            self.features = features
            for vr in self.vrings:
                vr.views = None
                vr.base, vr.base_given = 0, False
                if vr.size and not self.packed and vr.size & (vr.size - 1):
                    vr.size = 0  # not a split ring size: wait for SET_VRING_NUM
                if vr.size:
                    self._new_state(vr)
        self.features = features
        try:
            self.device.set_features(features)
        finally:
            if not features & (1 << P.VHOST_USER_F_PROTOCOL_FEATURES):
                for vr in self.vrings:  # without protocol features, rings are enabled from the start
                    vr.enabled = True
            self.refresh()

    def get_protocol_features(self, msg: P.Message) -> bytes:
        return P.U64.pack(self.offered_protocol_features)

    def set_protocol_features(self, msg: P.Message) -> None:
        features = msg.u64()
        extra = features & ~self.offered_protocol_features
        if extra:
            raise ProtocolError(f"SET_PROTOCOL_FEATURES asks for features not offered: {extra:#x}")
        self.protocol_features = features

    def set_owner(self, msg: P.Message) -> None:
        self.owner = True

    def reset_owner(self, msg: P.Message) -> None:
        self.teardown()
        self.mem = GuestMemory(notify_fd=self.fault_fd)  # teardown closed the old memory (and its arena) for good
        self.features = 0
        self.owner = False
        self._set_platform(False)

    # -- vIOMMU: the IOTLB and the backend channel ------------------------------------------------------
    def _set_platform(self, on: bool) -> None:
        """VIRTIO_F_ACCESS_PLATFORM switched (every worker is stopped): start from an empty IOTLB, addresses
        translated as IOVAs (on) or as guest-physical and front-end addresses (off)."""
        for vr in self.vrings:
            vr.views = None
        with self.iotlb_lock:
            self.iotlb.clear()
            self.exposed.clear()
            self.mem.set_iova_map([] if on else None)
            self.map_generation = self.iotlb.generation
        if on and not self.protocol_features & (1 << PF.BACKEND_REQ):
            log.warning(
                "VIRTIO_F_ACCESS_PLATFORM without VHOST_USER_PROTOCOL_F_BACKEND_REQ: IOTLB misses cannot be "
                "reported, the front-end must send every UPDATE unasked"
            )

    def set_backend_req_fd(self, msg: P.Message) -> None:
        """The backend channel: a connected Unix stream socket on which MISS and ACCESS_FAIL are sent."""
        if not self.protocol_features & (1 << PF.BACKEND_REQ):
            raise ProtocolError("SET_BACKEND_REQ_FD without VHOST_USER_PROTOCOL_F_BACKEND_REQ negotiated")
        if len(msg.fds) != 1:
            raise ProtocolError(f"SET_BACKEND_REQ_FD with {len(msg.fds)} fds, expected 1")
        fd = msg.take_fd(0)
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            os.close(fd)
            raise ProtocolError(f"SET_BACKEND_REQ_FD: the fd is {fd_kind(fd)}, not a socket ({e.strerror})") from e
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            kind = f"{sock.family.name}/{sock.type.name}"
            sock.close()
            raise ProtocolError(f"SET_BACKEND_REQ_FD: the socket is {kind}, not a Unix stream socket")
        sock.setblocking(False)  # a front-end that is not reading it never blocks a worker (send_iotlb)
        with self.backend_lock:
            old, self.backend_sock = self.backend_sock, sock
        if old is not None:
            old.close()

    def send_iotlb(self, kind: int, iova: int, perm: int) -> bool:
        """Send a MISS or an ACCESS_FAIL for ``iova`` on the backend channel (from a worker's thread too); whether
        it was sent.  No NEED_REPLY: the front-end answers a MISS with an UPDATE on the main channel (as QEMU and
        DPDK do).  Never blocks: QEMU may be waiting for our ack of an INVALIDATE (which waits for this worker
        to stop) and read nothing meanwhile; a message the full channel does not take is dropped (the worker
        asks again ``MISS_INTERVAL`` later)."""
        with self.backend_lock:
            sock = self.backend_sock
            if sock is None:
                if not self.warned_no_channel:
                    self.warned_no_channel = True
                    log.error("IOTLB %s at iova %#x: no backend channel to send it on", _IOTLB_NAMES[kind], iova)
                return False
            data = P.pack_message(P.BackendRequest.IOTLB_MSG, P.IotlbMsg(iova, 0, 0, perm, kind).pack())
            try:
                # one small message on a Unix stream socket: taken whole or not at all
                sent = sock.send(data)
            except BlockingIOError:
                log.debug("IOTLB %s at iova %#x: the backend channel is full, not sent", _IOTLB_NAMES[kind], iova)
                return False
            except OSError as e:
                log.error("sending IOTLB %s at iova %#x on the backend channel failed: %s", _IOTLB_NAMES[kind], iova, e)
                return False
            if sent != len(data):  # cannot happen for a message this small; the channel's framing would be lost
                log.error(
                    "IOTLB %s: the backend channel took %d of %d bytes; closing it", _IOTLB_NAMES[kind], sent, len(data)
                )
                self.backend_sock = None
                sock.close()
                return False
            if kind in self.iotlb_counts:
                self.iotlb_counts[kind] += 1
        log.debug("-> IOTLB %s iova %#x perm %d", _IOTLB_NAMES[kind], iova, perm)
        return True

    def send_miss(self, iova: int, perm: int) -> bool:
        return self.send_iotlb(P.VHOST_IOTLB_MISS, iova, perm)

    def iotlb_msg(self, msg: P.Message) -> None:
        """VHOST_USER_IOTLB_MSG: UPDATE or INVALIDATE (acknowledged only once no queue can reach what an
        INVALIDATE removed)."""
        if not self.iommu:
            raise ProtocolError("IOTLB_MSG before VIRTIO_F_ACCESS_PLATFORM was negotiated (addresses are not IOVAs)")
        m = msg.iotlb()
        if m.type in self.iotlb_counts:
            self.iotlb_counts[m.type] += 1
        if m.type == P.VHOST_IOTLB_UPDATE:
            self._iotlb_update(m)
        elif m.type == P.VHOST_IOTLB_INVALIDATE:
            self._iotlb_invalidate(m.iova, m.size)
        else:
            raise ProtocolError(f"IOTLB_MSG of type {_IOTLB_NAMES[m.type]}: a front-end sends UPDATE or INVALIDATE")

    def _in_memory(self, uaddr: int, size: int) -> bool:
        """Whether front-end addresses [uaddr, uaddr+size) lie whole in the memory regions (adjacent ones may
        share the range) -- the check CVE-2018-1059's class of bugs did only in part."""
        at, end = uaddr, uaddr + size
        for r in sorted(self.mem.regions, key=lambda r: r.desc.userspace_addr):
            if r.desc.userspace_addr <= at < r.uva_end:
                at = r.uva_end
                if at >= end:
                    return True
        return False

    def _iotlb_update(self, m: P.IotlbMsg) -> None:
        if not self._in_memory(m.uaddr, m.size):
            raise MemoryError_(
                f"IOTLB UPDATE iova {m.iova:#x}: uaddr {m.uaddr:#x} + size {m.size:#x} does not lie whole in guest "
                "memory"
            )
        with self.iotlb_lock:
            # a running worker's table may map part of this range otherwise (another address, more permission):
            # then the UPDATE invalidates that first
            held = self.exposed.overlapping(m.iova, m.size)
            conflict = any(e.uaddr - e.iova != m.uaddr - m.iova or e.perm & ~m.perm for e in held)
            if not conflict:
                self.iotlb.update(m.iova, m.size, m.uaddr, m.perm)
        if conflict:
            self._iotlb_change(lambda: self.iotlb.update(m.iova, m.size, m.uaddr, m.perm))
        else:
            self.wake_waiting()

    def _iotlb_invalidate(self, iova: int, size: int) -> None:
        with self.iotlb_lock:
            exposed = bool(self.exposed.overlapping(iova, size))
            if not exposed:  # no worker's table maps any of it: nothing to quiesce
                self.iotlb.invalidate(iova, size)
        if exposed:
            self._iotlb_change(lambda: self.iotlb.invalidate(iova, size))
        else:
            self.wake_waiting()

    def _iotlb_change(self, change) -> None:
        """Stop every worker (their requests finished or given back), drop every view, apply ``change`` to the
        IOTLB, restart with tables composed from it -- all before the message is acknowledged."""
        self.stop_workers()
        for vr in self.vrings:
            vr.views = None
        if not self.settled():
            log.error(
                "IOTLB change acknowledged while requests of queue(s) %s are still in flight on the old "
                "translation (their queues are broken)",
                self._stuck_queues(),
            )
        try:
            with self.iotlb_lock:
                change()
                self.exposed.clear()
                self.map_generation = -1
        finally:
            self.refresh()

    def _sync_map(self) -> None:
        """Compose the memory's translation table from the IOTLB if it changed since (before workers start)."""
        with self.iotlb_lock:
            if self.map_generation == self.iotlb.generation:
                return
            entries = self.iotlb.entries()
            generation = self.iotlb.generation
        if len(self.exposed) + len(entries) > EXPOSED_MAX and (self.workers or self.discarding):
            self.stop_workers()  # start afresh rather than remember ever more old mappings
        with self.iotlb_lock:
            if not (self.workers or self.discarding):
                self.exposed.clear()
            for e in entries:
                self.exposed.update(*e)
        self.mem.set_iova_map([(e.iova, e.size, e.uaddr, e.perm) for e in entries])
        self.map_generation = generation

    def _ring_parts(self, vr: Vring) -> list[tuple[int, int, int]]:
        """(iova, length, permission) of each part of ``vr``."""
        a, n = vr.addr, vr.size
        assert a is not None
        if self.packed:
            return [
                (a.desc, PK.ring_bytes(n), P.VHOST_ACCESS_RW),
                (a.avail, PK.EVENT_BYTES, P.VHOST_ACCESS_RO),
                (a.used, PK.EVENT_BYTES, P.VHOST_ACCESS_WO),
            ]
        return [
            (a.desc, desc_bytes(n), P.VHOST_ACCESS_RO),
            (a.avail, avail_bytes(n), P.VHOST_ACCESS_RO),
            (a.used, used_bytes(n), P.VHOST_ACCESS_WO),
        ]

    def _fault_range(self, vr: Vring, code: int) -> tuple[int, int, int] | None:
        q = vr.q
        if code == QueueError.BAD_ADDRESS:
            return int(q[Q_ERROR_VALUE]), 1, P.VHOST_ACCESS_WO if q[Q_FAULT_WRITE] else P.VHOST_ACCESS_RO
        if code == QueueError.INDIRECT_UNMAPPED:
            return int(q[Q_ERROR_VALUE]), max(1, int(q[Q_FAULT_LEN])), P.VHOST_ACCESS_RO
        if vr.addr is None or not vr.size:
            return None
        parts = self._ring_parts(vr)
        for part in parts:
            if not self.iotlb.covers(*part):
                return part
        return parts[0]

    def iotlb_fault(self, w: Worker) -> str | None:
        """(Worker's thread) A ring of ``w`` faulted behind a vIOMMU.  None: an IOTLB miss -- ``w.waiting`` is
        set and the fault cleared, the worker asks and waits; otherwise what breaks the queue ("": the queue
        state says why)."""
        vr = next((r for r in w.rings if r.q[Q_ERROR]), None)
        if vr is None or int(vr.q[Q_ERROR]) not in _ADDRESS_FAULTS:
            return ""
        with self.iotlb_lock:
            want = self._fault_range(vr, int(vr.q[Q_ERROR]))
            if want is None:
                return ""
            iova, length, perm = want
            t = self.iotlb.translate(iova, length, perm)
            if t.status == IOTLB_OK:
                if w.map_generation == self.iotlb.generation:
                    return ""  # mapped, and still it did not translate: not into guest memory (or split)
                w.waiting = (iova, length, perm, True)  # an UPDATE came since the worker's table was made
            elif t.status == IOTLB_MISS:
                w.waiting = (t.at, 1, perm, False)
            elif t.status == IOTLB_DENIED:
                self.send_iotlb(P.VHOST_IOTLB_ACCESS_FAIL, t.at, perm)
                return f"iova {t.at:#x} is mapped without {_PERM_NAMES[perm]} permission (IOTLB ACCESS_FAIL sent)"
            else:
                return ""
            vr.q[Q_ERROR] = vr.q[Q_ERROR_VALUE] = 0
        log.info(
            "vring %d: iova %#x (%s) %s",
            vr.index,
            w.waiting[0],
            _PERM_NAMES[perm],
            "mapped since the queue started: restarting it" if w.waiting[3] else "not in the IOTLB: MISS sent",
        )
        if w.waiting[3]:
            os.eventfd_write(self.resume_fd, 1)
        return None

    def wake_waiting(self) -> None:
        """After an IOTLB change (or a worker's resume_fd): restart the workers waiting for what the IOTLB now
        maps; tell the others to count their MISS tries afresh."""
        if self.resume_fd >= 0:
            try:
                os.eventfd_read(self.resume_fd)
            except BlockingIOError:
                pass
        restart: list[int] = []
        with self.iotlb_lock:
            waiting = [(g, w) for g, w in self.workers.items()] + [((i,), w) for i, w in self.discarding.items()]
            for group, w in waiting:
                if w.waiting is None:
                    continue
                iova, length, perm, covered = w.waiting
                # mapped now (or mapped without the permission: the restarted worker reports ACCESS_FAIL)
                if covered or self.iotlb.translate(iova, length, perm).status != IOTLB_MISS:
                    restart.extend(group)
                else:
                    w.iotlb_changed()
        if restart:
            self.stop_workers(restart)
            self.refresh()

    def close(self) -> None:
        """Release what outlives teardown (the connection is over): the backend channel and the resume fd."""
        with self.backend_lock:
            if self.backend_sock is not None:
                self.backend_sock.close()
                self.backend_sock = None
        if self.resume_fd >= 0:
            os.close(self.resume_fd)
            self.resume_fd = -1

    def get_queue_num(self, msg: P.Message) -> bytes:
        return P.U64.pack(len(self.vrings))

    def set_status(self, msg: P.Message) -> None:
        self.status = msg.u64() & 0xFF

    def get_status(self, msg: P.Message) -> bytes:
        return P.U64.pack(self.status)

    def get_config(self, msg: P.Message) -> bytes:
        offset, size, flags, _ = msg.config()
        space = self.device.config_space()
        if offset + size > len(space):
            raise ProtocolError(f"GET_CONFIG offset {offset} size {size} beyond the {len(space)}-byte config")
        return P.CONFIG_HDR.pack(offset, size, flags) + space[offset : offset + size]

    def set_config(self, msg: P.Message) -> None:
        offset, size, _flags, data = msg.config()
        if len(data) != size:
            raise ProtocolError(f"SET_CONFIG size {size} but {len(data)} bytes of data")
        self.device.write_config(offset, data)

    # -- dirty logging (live migration) ----------------------------------------------------------------
    @property
    def logging(self) -> bool:
        """Whether writes into guest memory are logged now: VHOST_F_LOG_ALL negotiated and a log given."""
        return bool(self.features & (1 << P.VHOST_F_LOG_ALL)) and self.log is not None

    def set_log_base(self, msg: P.Message) -> None:
        """Map the log (at its offset, size checked against its fd and against guest memory), then switch the
        workers to it: stopped, given the new log, restarted -- no write falls between the two logs."""
        if not self.protocol_features & (1 << PF.LOG_SHMFD):
            raise ProtocolError("SET_LOG_BASE without VHOST_USER_PROTOCOL_F_LOG_SHMFD negotiated")
        req = P.log_base(msg)
        new = DirtyLog(msg.fds[0], req.mmap_size, req.mmap_offset, self.fault_fd, arena=self.mem.arena)
        try:
            new.check_covers(guest_end(self.mem))
        except Exception:
            new.close()
            raise
        self.stop_workers()
        old, self.log = self.log, new
        self._release_log(old)
        self.refresh()
        log.info("dirty log: %d bytes (covers %d MiB of guest memory)", new.size, new.covers >> 20)

    def set_log_fd(self, msg: P.Message) -> None:
        if len(msg.fds) != 1:
            raise ProtocolError(f"SET_LOG_FD with {len(msg.fds)} fds, expected 1")
        kind = fd_kind(msg.fds[0])
        if kind != EVENTFD_KIND:
            raise ProtocolError(f"SET_LOG_FD: the fd is {kind}, not an eventfd")
        if self.log_fd >= 0:
            os.close(self.log_fd)
        self.log_fd = os.dup(msg.fds[0])

    def _release_log(self, old: DirtyLog | None) -> None:
        """Unmap a log no worker uses any more -- unless requests of a stuck worker may still complete (and log):
        then it stays mapped (with their memory) until the arena goes."""
        if old is None:
            return
        if self.settled():
            old.close()
        else:
            log.error("the old dirty log stays mapped: requests in flight on queue(s) %s", self._stuck_queues())

    def _close_log(self) -> None:
        self._release_log(self.log)
        self.log = None
        if self.log_fd >= 0:
            os.close(self.log_fd)
            self.log_fd = -1

    # -- memory -----------------------------------------------------------------------------------------
    def get_max_mem_slots(self, msg: P.Message) -> bytes:
        return P.U64.pack(P.MAX_MEM_SLOTS)

    def _memory_change(self, change) -> None:
        """Stop every worker, drop every view, apply ``change`` (which returns regions to unmap), unmap, rebind."""
        self.stop_workers()
        for vr in self.vrings:
            vr.views = None
        try:
            old = change()
        except BaseException:
            self.refresh()  # the change was refused and memory is unchanged: restart the stopped workers
            raise
        self._unmap(old)
        if self.log is not None:  # QEMU grows the log before the table; a table past it is a front-end's bug
            try:
                self.log.check_covers(guest_end(self.mem))
            except DirtyLogError as e:
                log.error("the memory table outgrew the dirty log (writes past it are not logged): %s", e)
        self.refresh()

    def _unmap(self, old: list[MappedRegion]) -> None:
        """Unmap regions no queue uses any more -- unless requests of a stuck worker may still touch guest
        memory: then every region stays mapped (deliberately leaked, logged) until they have all completed, and
        the next memory change after that unmaps them.  Never an unmap under a view in use."""
        self.kept.extend((self.mem, r) for r in old)
        if self.settled():
            for mem, r in self.kept:
                mem.unmap(r)
            self.kept.clear()
            for mem in self.kept_memory:
                mem.close()
            self.kept_memory.clear()
        elif old:
            log.error(
                "%d replaced region(s) left mapped: requests in flight on queue(s) %s may still use them",
                len(old),
                self._stuck_queues(),
            )

    def settled(self) -> bool:
        """No worker's requests hold guest memory any more (workers that were stuck are forgotten once quiet)."""
        self.stuck = [w for w in self.stuck if w.holding() != []]
        return not self.stuck

    def _stuck_queues(self) -> str:
        return ",".join(str(vr.index) for w in self.stuck for vr in w.rings)

    def set_mem_table(self, msg: P.Message) -> None:
        regions = msg.mem_table()
        fds = list(msg.fds)
        self._memory_change(lambda: self.mem.set_table(regions, fds))
        log.info("memory table: %d regions, %d MiB", len(regions), sum(r.memory_size for r in regions) >> 20)

    def _mapped(self, region: P.MemRegion) -> bool:
        """A region with exactly this GPA, size, front-end address and file offset is in the table."""
        return any(r.desc == region for r in self.mem.regions)

    def add_mem_reg(self, msg: P.Message) -> None:
        if len(msg.fds) != 1:
            raise ProtocolError(f"ADD_MEM_REG with {len(msg.fds)} fds, expected 1")
        region = msg.single_region()
        if self._mapped(region):
            # QEMU before 8.1 sends ADD/REM_MEM_REG once per vhost_dev, i.e. once per queue pair of a
            # multiqueue net device: the same region again is one more holder, unmapped at its last REM_MEM_REG
            self.region_holders[region] = self.region_holders.get(region, 1) + 1
            return

        def add() -> list:
            self.mem.add_region(region, msg.fds[0])
            self.region_holders.pop(region, None)
            return []  # nothing to unmap

        self._memory_change(add)
        log.info(
            "memory region added: guest-physical %#x, %d MiB (%d regions)",
            region.guest_phys_addr,
            region.memory_size >> 20,
            self.mem.nregions,
        )

    def rem_mem_reg(self, msg: P.Message) -> None:
        region = msg.single_region()
        holders = self.region_holders.pop(region, 1)
        if holders > 1 and self._mapped(region):
            self.region_holders[region] = holders - 1
            return
        self._memory_change(lambda: [self.mem.remove_region(region)])
        log.info(
            "memory region removed: guest-physical %#x, %d MiB (%d regions)",
            region.guest_phys_addr,
            region.memory_size >> 20,
            self.mem.nregions,
        )

    # -- vrings -----------------------------------------------------------------------------------------
    def set_vring_num(self, msg: P.Message) -> None:
        index, num = msg.vring_state()
        vr = self.vring(index)
        if vr.started:
            raise VringError(f"SET_VRING_NUM on running vring {index}")
        if self.packed:
            if num == 0 or num > PK.MAX_QUEUE_SIZE:
                raise VringError(f"vring {index}: packed ring size {num} not in 1..{PK.MAX_QUEUE_SIZE}")
            if vr.base_given:
                self._check_packed_base(index, vr.base, num)
        elif num == 0 or num > MAX_QUEUE_SIZE or num & (num - 1):
            raise VringError(f"vring {index}: size {num} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        vr.size = num
        vr.views = None
        self._new_state(vr)

    @property
    def iommu(self) -> bool:
        """VIRTIO_F_ACCESS_PLATFORM negotiated: ring and buffer addresses are IOVAs (a vIOMMU)."""
        return bool(self.features & (1 << VIRTIO_F_ACCESS_PLATFORM))

    @property
    def packed(self) -> bool:
        """VIRTIO_F_RING_PACKED negotiated: every ring of the device is packed."""
        return bool(self.features & (1 << VIRTIO_F_RING_PACKED))

    def _new_state(self, vr: Vring) -> None:
        """Fresh queue state for ``vr.size`` starting from ``vr.base``; the call fd stays."""
        callfd = vr.q[Q_CALLFD]
        if any(queue_stats(vr.q).values()):
            self.record_totals(vr)
        if self.packed:
            vr.q = PK.new_packed_state(vr.size)
            if vr.base_given:
                self._apply_packed_base(vr)
        else:
            vr.q = new_queue_state(vr.size)
            vr.q[Q_LAST_AVAIL] = vr.q[Q_USED_IDX] = vr.base
        vr.q[Q_CALLFD] = callfd

    @staticmethod
    def _check_packed_base(index: int, num: int, size: int) -> None:
        avail, aw, used, uw = PK.decode_base(num)
        if avail >= size or used >= size:
            raise VringError(f"vring {index}: packed base {num:#x} has a position beyond the ring size {size}")
        lead = (PK.linear(avail, aw, size) - PK.linear(used, uw, size)) % (2 * size)
        if lead > size:
            raise VringError(
                f"vring {index}: packed base {num:#x}: the avail cursor is {lead} descriptors ahead "
                f"of the used one, more than the ring holds ({size})"
            )

    @staticmethod
    def _apply_packed_base(vr: Vring) -> None:
        avail, aw, used, uw = PK.decode_base(vr.base)
        vr.q[Q_LAST_AVAIL], vr.q[Q_AVAIL_WRAP], vr.q[Q_USED_IDX], vr.q[Q_USED_WRAP] = avail, aw, used, uw

    def set_vring_addr(self, msg: P.Message) -> None:
        addr = msg.vring_addr()
        vr = self.vring(addr.index)
        bad = check_alignment(addr, self.packed)
        if bad:
            raise VringError(f"vring {addr.index}: {bad}")
        for name, value in (("descriptor table", addr.desc), ("used ring", addr.used), ("avail ring", addr.avail)):
            if value >= P.ADDR_LIMIT:  # also keeps the value inside the int64 queue state
                raise VringError(f"vring {addr.index}: {name} address {value:#x} out of range")
        if addr.flags & (1 << P.VHOST_VRING_F_LOG) and not self.iommu:
            # the used ring's guest-physical address: writes are logged by the pages they reach, but a front-end
            # that names a used ring outside guest memory is wrong about something (behind a vIOMMU, QEMU gives
            # an IOVA here: not checked)
            length = PK.EVENT_BYTES if self.packed else used_bytes(vr.size or 1)
            check_ring_log_addr(self.mem, addr.log, length)
        self.stop_workers([vr.index])
        vr.views = None
        vr.addr = addr
        self.refresh()

    def set_vring_base(self, msg: P.Message) -> None:
        index, num = msg.vring_state()
        vr = self.vring(index)
        if vr.started:
            raise VringError(f"SET_VRING_BASE on running vring {index}")
        if self.packed:
            if vr.size:
                self._check_packed_base(index, num, vr.size)
            vr.base, vr.base_given = num, True
            if vr.size:
                self._apply_packed_base(vr)
            return
        if num > 0xFFFF:
            raise VringError(f"vring {index}: base {num:#x} has bits above 15 (split ring)")
        vr.base = num
        vr.q[Q_LAST_AVAIL] = vr.q[Q_USED_IDX] = num

    def get_vring_base(self, msg: P.Message) -> bytes:
        index, _ = msg.vring_state()
        vr = self.vring(index)
        self.stop_workers([index])
        vr.started = False
        vr.views = None
        if self.packed:
            q = vr.q
            base = PK.encode_base(int(q[Q_LAST_AVAIL]), int(q[Q_AVAIL_WRAP]), int(q[Q_USED_IDX]), int(q[Q_USED_WRAP]))
            vr.base_given = True
        else:
            base = int(vr.q[Q_LAST_AVAIL])
        vr.base = base
        vr.close_fds()
        self.refresh()
        return P.VRING_STATE.pack(index, base)

    def _vring_fd(self, msg: P.Message) -> tuple[Vring, int]:
        value = msg.u64()
        if value & ~(P.VHOST_USER_VRING_IDX_MASK | P.VHOST_USER_VRING_NOFD_MASK):
            # an index over 255 would be silently truncated to another ring (the CVE-2020-10723 class)
            raise ProtocolError(f"{msg.name}: payload {value:#x} has bits set besides the vring index and NOFD")
        vr = self.vring(value & P.VHOST_USER_VRING_IDX_MASK)
        if value & P.VHOST_USER_VRING_NOFD_MASK:
            if msg.fds:
                raise ProtocolError(f"{msg.name}: NOFD flag set but {len(msg.fds)} fds sent")
            return vr, -1
        if len(msg.fds) != 1:
            raise ProtocolError(f"{msg.name}: expected 1 fd, got {len(msg.fds)}")
        kind = fd_kind(msg.fds[0])
        if kind != EVENTFD_KIND:  # a socket or pipe here could block the worker, a file would spin it
            raise ProtocolError(f"{msg.name}: fd is {kind}, not an eventfd")
        return vr, msg.take_fd(0)

    def set_vring_kick(self, msg: P.Message) -> None:
        vr, fd = self._vring_fd(msg)
        self.stop_workers([vr.index])
        if vr.kick_fd >= 0:
            os.close(vr.kick_fd)
        vr.kick_fd = fd
        if vr.broken:
            log.warning("vring %d is broken; SET_VRING_KICK does not restart it", vr.index)
        vr.started = True
        self.refresh()

    def set_vring_call(self, msg: P.Message) -> None:
        vr, fd = self._vring_fd(msg)
        workers = self.stop_workers([vr.index])
        if vr.call_fd >= 0:
            os.close(vr.call_fd)
        vr.call_fd = fd
        vr.q[Q_CALLFD] = fd
        if fd >= 0 and vr.q[Q_CALL_MISSED]:
            # completions were published while the ring had no call fd -- QEMU sends SET_VRING_CALL after the
            # ring has started, without waiting for replies, and its guest goes on meanwhile: tell the driver
            # now, or it waits for them forever (Linux's virtio_scsi never times a command out)
            vr.q[Q_CALL_MISSED] = 0
            os.eventfd_write(fd, 1)
            log.info("vring %d: completions published before its call fd came are signalled now", vr.index)
        if workers:
            self.refresh()

    def set_vring_err(self, msg: P.Message) -> None:
        vr, fd = self._vring_fd(msg)
        with self.lock:  # not while a worker signals it (ring_broken): a closed fd's number is soon reused
            old, vr.err_fd = vr.err_fd, fd
        if old >= 0:
            os.close(old)

    def set_vring_enable(self, msg: P.Message) -> None:
        index, num = msg.vring_state()
        vr = self.vring(index)
        if not self.features & (1 << P.VHOST_USER_F_PROTOCOL_FEATURES):
            log.warning("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES negotiated")
        if num not in (0, 1):
            raise VringError(f"SET_VRING_ENABLE {index}: value {num} is not 0 or 1")
        if bool(num) != vr.enabled:  # a disabled ring's worker (if any) is not an enabled one's
            self.stop_workers([index])
        vr.enabled = bool(num)
        self.device.ring_enabled(index, vr.enabled)
        self.refresh()

    # -- inflight I/O tracking (inflight.py) -----------------------------------------------------------
    def get_inflight_fd(self, msg: P.Message) -> tuple[bytes, list[int]]:
        _, _, num_queues, queue_size = inflight.unpack_description(msg.payload)
        fd, size = inflight.new_area_fd(num_queues, queue_size)
        return inflight.pack_description(size, 0, num_queues, queue_size), [fd]

    def set_inflight_fd(self, msg: P.Message) -> None:
        if len(msg.fds) != 1:
            raise ProtocolError(f"SET_INFLIGHT_FD with {len(msg.fds)} fds, expected 1")
        size, offset, num_queues, queue_size = inflight.unpack_description(msg.payload)
        area = inflight.InflightArea(msg.fds[0], size, offset, num_queues, queue_size)
        self.stop_workers()  # no ring keeps a view of the area it had
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = area
        log.info("inflight area: %d queues of %d, %d bytes", num_queues, queue_size, size)
        self.refresh()

    # -- workers ----------------------------------------------------------------------------------------
    def stop_workers(self, indices: list[int] | None = None) -> list[Worker]:
        """Stop (and join) the workers serving any of ``indices`` (all if None), all within one
        ``stop_timeout``.  A worker that does not end in time, or whose requests still hold guest memory,
        breaks its queues (logged, ERR signalled) and pins guest memory until it is quiet (see ``_unmap``)."""
        chosen: list[Worker] = []
        tables: tuple[dict[Any, Worker], ...] = (self.workers, self.discarding)
        for table in tables:
            for key, w in list(table.items()):
                group = key if isinstance(key, tuple) else (key,)
                if indices is None or any(i in group for i in indices):
                    del table[key]
                    chosen.append(w)
        deadline = time.monotonic() + self.stop_timeout
        for w in chosen:
            w.request_stop(deadline)
        for w in chosen:
            if not w.wait_stopped(deadline):
                self._stuck(w)
        return chosen

    def _stuck(self, w: Worker) -> None:
        queues = "/".join(str(vr.index) for vr in w.rings)
        if w.is_alive():
            why = f"its worker did not stop within {self.stop_timeout:.1f} s"
        elif w.held is None:
            why = "its worker could not drain its requests"
        else:
            why = (
                f"request(s) still in flight after {self.stop_timeout:.1f} s (queue {queues}, head(s) "
                f"{' '.join(map(str, w.held))})"
            )
        log.error("queues %s: %s; the queue is broken and guest memory stays mapped until it is quiet", queues, why)
        self.ring_broken([vr for vr in w.rings if not vr.broken], why)
        self.stuck.append(w)

    def _ring(self, vr: Vring) -> Ring:
        """Views for the current memory (bound again after a change) and a fresh start of ``vr``'s state."""
        assert vr.addr is not None
        if vr.views is None or vr.views.generation != self.mem.generation:
            if self.packed:  # both cursors come from SET_VRING_BASE: nothing to load from the ring
                vr.views = bind_packed(self.mem, vr.addr, vr.size, self.metadata, vr.q)
            else:
                vr.views = bind(self.mem, vr.addr, vr.size, self.metadata, vr.q)
                self._load_used_idx(vr)
        self.device.prepare_queue(vr.index, vr.q)
        vr.q[Q_EVENT_IDX] = 1 if self.features & (1 << VIRTIO_RING_F_EVENT_IDX) else 0
        vr.q[Q_BATCH] = self.batch
        if self.logging:
            assert self.log is not None
            vr.q[Q_LOG_OFF], vr.q[Q_LOG_SIZE] = self.log.at, self.log.size
        else:
            vr.q[Q_LOG_OFF] = vr.q[Q_LOG_SIZE] = 0
        # unknown: the ring may hold NO_NOTIFY or a stale avail_event (left by a worker stopped while
        # polling, or by a previous back-end), so the first set_notify() must write it either way
        vr.q[Q_NOTIFY_ON] = -1
        vr.q[Q_SIGNALLED_VALID] = 0
        vr.q[Q_STOP] = 0
        region = self.inflight.queue(vr.index, vr.size) if self.inflight is not None else None
        return Ring(vr.index, vr.q, vr.views, self.mem, kick_fd=vr.kick_fd, inflight=region)

    def _cpu(self, index: int) -> int | None:
        """The CPU of the worker(s) of ring ``index``: that of its queue group (None: not pinned)."""
        if not self.cpus:
            return None
        groups = self.device.workers()
        k = next((k for k, g in enumerate(groups) if index in g), index)
        return self.cpus[k % len(self.cpus)]

    def _start(self, rings: list[Vring], step) -> Worker:
        w = Worker(self, rings, step, self.budget, self.stop_timeout, self._cpu(rings[0].index))
        w.start()
        return w

    def refresh(self) -> None:
        """Start a worker for every group whose rings are all ready and that has none, and one for every ring
        that is started but disabled and that the device processes then (``Device.discard_step``)."""
        if self.iommu:
            self._sync_map()
        if self.mem.nregions == 0:
            return
        for group in self.device.workers():
            if group in self.workers:
                continue
            rings = [self.vrings[i] for i in group]
            if not all(vr.ready for vr in rings):
                continue
            discarding = [vr.index for vr in rings if vr.index in self.discarding]
            if discarding:  # never two workers on one ring
                self.stop_workers(discarding)
            handles = [self._ring(vr) for vr in rings]
            w = self.workers[group] = self._start(rings, self.device.make_step(handles))
            log.info(
                "queues %s started (%s path, %s rings)%s",
                group,
                "/".join("direct" if vr.q[2] else "copy" for vr in rings),
                "packed" if self.packed else "split",
                "" if w.cpu is None else f" on CPU {w.cpu}",
            )
        for vr in self.vrings:
            if (
                vr.index in self.discarding
                or not vr.started
                or vr.enabled
                or vr.broken
                or not vr.size
                or vr.addr is None
            ):
                continue
            if not self.device.discards_when_disabled(vr.index):
                continue
            step = self.device.discard_step(self._ring(vr))
            self.discarding[vr.index] = self._start([vr], step)
            log.info("queue %d started but disabled: its buffers are processed and discarded", vr.index)

    def _load_used_idx(self, vr: Vring) -> None:
        """The used index lives in the ring; start from it, as vhost does."""
        assert vr.addr is not None
        view = self.mem.view(SPACE_UVA, vr.addr.used + 2, 2)
        if view is not None:
            used = int(view.view(np.uint16)[0])
            if used != vr.q[Q_LAST_AVAIL]:
                log.info("vring %d: used index %d, last avail %d", vr.index, used, vr.q[Q_LAST_AVAIL])
            vr.q[Q_USED_IDX] = used

    def ring_broken(self, rings: list[Vring], reason: str | None = None) -> None:
        """A ring broke (its queue state says why, or ``reason``): log it, signal ERR, leave the other queues
        running.  Called by the worker, or by the control plane for a worker that did not stop."""
        for vr in rings:
            if reason is None and not vr.q[Q_ERROR]:
                continue  # a ring of the group that is not the broken one
            vr.broken = True
            why = reason if reason is not None else describe(int(vr.q[Q_ERROR]), int(vr.q[Q_ERROR_VALUE]))
            log.error("vring %d broken: %s", vr.index, why)
            with self.lock:  # SET_VRING_ERR may replace (and close) the fd meanwhile
                if vr.err_fd >= 0:
                    try:
                        os.eventfd_write(vr.err_fd, 1)
                    except OSError as e:
                        log.error("vring %d: signalling the err fd failed: %s", vr.index, e)

    def bus_fault(self) -> str | None:
        """What the SIGBUS guard recovered in this connection's memory (a truncated region file), or None."""
        return self.mem.bus_fault()

    # -- stats and teardown -----------------------------------------------------------------------------
    def record_totals(self, vr: Vring) -> None:
        """Fold the counters of ``vr``'s queue state, about to be replaced, into the totals."""
        self.totals[vr.index] = add_stats(self.totals.get(vr.index), queue_stats(vr.q))

    def stats(self) -> dict[int, dict[str, int]]:
        """Per-queue counters since the connection began (over ring restarts and RESET_OWNER)."""
        out = dict(self.totals)
        for vr in self.vrings:
            if vr.size:
                out[vr.index] = add_stats(out.get(vr.index), queue_stats(vr.q))
        return out

    def teardown(self) -> None:
        """Stop everything, drop views, unmap memory (unless requests of a stuck worker may still use it: then
        it stays mapped, logged, and is freed only when the last view of it goes), close every fd."""
        self.stop_workers()
        for vr in self.vrings:
            if vr.size:
                self.record_totals(vr)
            vr.views = None
            vr.close_fds()
        self._close_log()
        self.kept_memory.append(self.mem)
        self._unmap(self.mem.clear())
        if self.kept_memory:
            log.error(
                "guest memory left mapped: requests in flight on queue(s) %s may still use it", self._stuck_queues()
            )
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        self.vrings = [Vring(i) for i in range(self.device.num_queues)]
        try:
            self.device.driver_gone()
        except Exception:
            log.exception("device %s: forgetting the driver failed", type(self.device).__name__)


EVENTFD_KIND = "anon_inode:[eventfd]"
_IOTLB_NAMES = {
    P.VHOST_IOTLB_MISS: "MISS",
    P.VHOST_IOTLB_UPDATE: "UPDATE",
    P.VHOST_IOTLB_INVALIDATE: "INVALIDATE",
    P.VHOST_IOTLB_ACCESS_FAIL: "ACCESS_FAIL",
}


def fd_kind(fd: int) -> str:
    """What an fd refers to, as /proc names it (``anon_inode:[eventfd]``, ``socket:[…]``, a path, …)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        return f"unreadable ({e.strerror})"


def add_stats(old: dict[str, int] | None, new: dict[str, int]) -> dict[str, int]:
    """Counters of two successive queue states of one ring: summed, except ``error``: the last one seen."""
    if old is None:
        return new
    out = {k: v + old.get(k, 0) for k, v in new.items()}
    out["error"] = new["error"] or old.get("error", 0)
    return out


def queue_stats(q: np.ndarray) -> dict[str, int]:
    return {
        "packets": int(q[Q_PACKETS]),
        "bytes": int(q[Q_BYTES]),
        "drops": int(q[Q_DROPS]),
        "chains": int(q[Q_CHAINS]),
        "calls": int(q[Q_CALLS]),
        "wakeups": int(q[Q_WAKEUPS]),
        "error": int(q[Q_ERROR]),
    }


class Server:
    """Listen on a Unix socket and serve one front-end at a time; a disconnect tears the device down and the
    next connection gets a fresh one."""

    def __init__(
        self,
        device: Device,
        socket_path: str | None,
        metadata: Metadata = Metadata.DIRECT,
        batch: int = 256,
        listener: socket.socket | None = None,
        stop_timeout: float = STOP_TIMEOUT,
        cpus: tuple[int, ...] = (),
    ) -> None:
        """Listen on ``socket_path`` (created, replacing what is there), or on ``listener``, a listening Unix
        socket passed in (socket activation: its path belongs to whoever made it and is left in place)."""
        if listener is None and socket_path is None:
            raise ValueError("a socket path or a listening socket is needed")
        self.device = device
        self.metadata = Metadata(metadata)
        self.batch = batch
        #: how long stopping a connection's workers may take (STOP_TIMEOUT)
        self.stop_timeout = stop_timeout
        #: CPUs the datapath workers pin themselves to (Connection.cpus)
        self.cpus = tuple(cpus)
        device.warm_up()  # a worker's first call then loads no code: stopping it is never slowed by the compiler
        sigbus.install()  # a front-end truncating a region's file under us breaks its connection, not the process
        self.stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        #: written by the SIGBUS guard when it recovered a fault in the connection's memory
        self.fault_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.connection: Connection | None = None
        #: connections accepted so far (the live one's number)
        self.accepted = 0
        #: counters of the connections that ended, the most recent last (bounded: a server runs for long)
        self.history: collections.deque[dict[int, dict[str, int]]] = collections.deque(maxlen=HISTORY)
        self.owns_path = listener is None
        if listener is None:
            assert socket_path is not None
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            if os.path.exists(socket_path):
                os.unlink(socket_path)
            listener.bind(socket_path)
            listener.listen(1)
        self.listener = listener
        name = listener.getsockname()
        self.socket_path: str = socket_path or (name if isinstance(name, str) and name else f"fd {listener.fileno()}")

    def stop(self) -> None:
        """Ask serve() to return (safe from a signal handler or another thread)."""
        os.eventfd_write(self.stop_fd, 1)

    def serve(self, connections: int | None = None) -> None:
        """Serve until stop() (or after ``connections`` connections have ended)."""
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, "listen")
        sel.register(self.stop_fd, selectors.EVENT_READ, "stop")
        sel.register(self.fault_fd, selectors.EVENT_READ, "bus")
        served = 0
        try:
            while connections is None or served < connections:
                events = sel.select()
                kinds = {key.data for key, _ in events}
                if "stop" in kinds:
                    return
                if "listen" in kinds and self.connection is None:
                    sock, _ = self.listener.accept()
                    # a message is read only once select() says it has begun; a peer that stalls in the
                    # middle of one is dropped after this long instead of blocking the server
                    sock.settimeout(MESSAGE_TIMEOUT)
                    self.connection = Connection(
                        sock,
                        self.device,
                        self.metadata,
                        batch=self.batch,
                        fault_fd=self.fault_fd,
                        stop_timeout=self.stop_timeout,
                        cpus=self.cpus,
                    )
                    self.accepted += 1
                    sel.unregister(self.listener)
                    sel.register(sock, selectors.EVENT_READ, "conn")
                    sel.register(self.connection.resume_fd, selectors.EVENT_READ, "resume")
                    log.info("front-end connected")
                end = False
                if "bus" in kinds:
                    try:
                        os.eventfd_read(self.fault_fd)
                    except BlockingIOError:
                        pass
                    fault = self.connection.bus_fault() if self.connection is not None else None
                    if fault is not None:
                        log.error("%s: closing the connection", fault)
                        end = True
                if not end and "resume" in kinds and self.connection is not None:
                    self.connection.wake_waiting()  # a worker's IOVA was mapped after its table was made
                if not end and "conn" in kinds and self.connection is not None:
                    end = not self._read_one(self.connection)
                if end:
                    assert self.connection is not None
                    sel.unregister(self.connection.sock)
                    sel.unregister(self.connection.resume_fd)
                    self._end_connection()
                    served += 1
                    sel.register(self.listener, selectors.EVENT_READ, "listen")
        finally:
            if self.connection is not None:
                self._end_connection()
            sel.close()

    def _read_one(self, conn: Connection) -> bool:
        try:
            msg = P.recv_message(conn.sock)
        except P.ConnectionClosed as e:
            log.info("front-end disconnected (%s)", e)
            return False
        except ProtocolError as e:
            log.error("bad message: %s", e)
            conn.failed += 1
            if e.message is not None:  # rejected before dispatch: still answer, or a waiting front-end hangs
                conn.answer(e.message, None, False)
            return True
        except OSError as e:
            log.error("socket error: %s", e)
            return False
        log.debug("<- %s %s", msg.name, msg.payload.hex())
        try:
            conn.handle(msg)
        except OSError as e:  # the peer went away while we replied
            log.error("replying to %s failed: %s", msg.name, e)
            return False
        return True

    def _end_connection(self) -> None:
        conn = self.connection
        assert conn is not None
        conn.teardown()
        conn.close()
        stats = conn.stats()
        self.history.append(stats)
        log.info("connection closed; queue stats %s", json.dumps(stats))
        if conn.iommu or any(conn.iotlb_counts.values()):
            n = conn.iotlb_counts
            log.info(
                "IOTLB: %d updates, %d invalidates, %d misses sent",
                n[P.VHOST_IOTLB_UPDATE],
                n[P.VHOST_IOTLB_INVALIDATE],
                n[P.VHOST_IOTLB_MISS],
            )
        conn.sock.close()
        self.connection = None

    def stats(self) -> dict:
        """Per-queue counters: those of the live connection, and of every one that ended."""
        live = self.connection.stats() if self.connection else {}
        return {"live": live, "ended": list(self.history)}

    def close(self) -> None:
        self.listener.close()
        os.close(self.stop_fd)
        os.close(self.fault_fd)
        if self.owns_path:
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
