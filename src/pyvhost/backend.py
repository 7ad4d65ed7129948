"""The vhost-user back-end: one handler per request id, the vring state machine, and the worker threads.

Ring lifecycle (docs/interop/vhost-user.rst "Ring states"): a ring is *started* by SET_VRING_KICK and
*stopped* by GET_VRING_BASE; it is *enabled* from the start when VHOST_USER_F_PROTOCOL_FEATURES is not
negotiated, otherwise by SET_VRING_ENABLE.  A worker runs over a group of rings while all of them are started,
enabled and have a size and addresses.

Invariant 1 (no stale view): anything that changes memory or ring addresses first stops the affected workers
(each acknowledges by leaving its compiled loop and being joined), then drops their views, then unmaps, then
bumps the generation; workers restart with views built for the new generation.
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
from dataclasses import dataclass, field

import numpy as np

from . import inflight
from . import protocol as P
from . import sigbus
from .access import Metadata, PackedViews, RingViews, bind, bind_packed, check_alignment
from .devices.base import (VIRTIO_F_ANY_LAYOUT, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
                           VIRTIO_RING_F_INDIRECT_DESC, Device, Ring, Step)
from .errors import describe
from .memory import SPACE_UVA, GuestMemory, MemoryError_
from .protocol import ProtocolError, ProtocolFeature as PF, Request as R
from .ring import packed as PK
from .ring.split import (MAX_QUEUE_SIZE, Q_BATCH, Q_BYTES, Q_CALLFD, Q_CALLS, Q_CHAINS, Q_DROPS, Q_ERROR,
                         Q_ERROR_VALUE, Q_EVENT_IDX, Q_LAST_AVAIL, Q_NOTIFY_ON, Q_PACKETS, Q_SIGNALLED_VALID,
                         Q_STOP, Q_USED_IDX, Q_WAKEUPS, Q_AVAIL_WRAP, Q_USED_WRAP, new_queue_state)

log = logging.getLogger(__name__)

TRANSPORT_FEATURES = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC)
                      | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_F_ANY_LAYOUT)
                      | (1 << VIRTIO_F_RING_PACKED) | (1 << P.VHOST_USER_F_PROTOCOL_FEATURES))
PROTOCOL_FEATURES = ((1 << PF.MQ) | (1 << PF.REPLY_ACK) | (1 << PF.CONFIG) | (1 << PF.CONFIGURE_MEM_SLOTS)
                     | (1 << PF.STATUS))
#: Passes a worker's compiled loop makes before it returns to Python (bounds the stop latency).
DEFAULT_BUDGET = 4096
#: Seconds a peer may take to send the rest of a message it has begun (and to take a reply).
MESSAGE_TIMEOUT = 5.0
#: Ended connections whose counters the server keeps.
HISTORY = 64


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
    """Runs a device's step function over a group of rings until stopped or a ring breaks."""

    def __init__(self, conn: "Connection", rings: list[Vring], step, budget: int) -> None:
        super().__init__(name=f"pyvhost-q{'-'.join(str(r.index) for r in rings)}", daemon=True)
        self.conn, self.rings, self.step, self.budget = conn, rings, step, budget
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.fault: str | None = None

    def run(self) -> None:
        try:
            while True:
                status = self.step(self.budget)
                if status == Step.MORE:
                    continue
                if status == Step.STOPPED:
                    return
                if status == Step.BROKEN:
                    self.conn.ring_broken([r for r in self.rings if r.q[Q_ERROR]])
                    return
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
                    except OSError:
                        return
        except Exception:  # a bug, not the guest's fault: say so, keep the process
            log.exception("worker %s failed", self.name)
            self.fault = "exception"

    def stop(self) -> None:
        for r in self.rings:
            r.q[Q_STOP] = 1
        os.eventfd_write(self.wake_fd, 1)
        self.join()
        os.close(self.wake_fd)
        for r in self.rings:
            r.q[Q_STOP] = 0


class Connection:
    """One front-end connection: message handlers and device state."""

    def __init__(self, sock: socket.socket, device: Device, metadata: Metadata, budget: int = DEFAULT_BUDGET,
                 batch: int = 256, fault_fd: int = -1) -> None:
        self.sock = sock
        self.device = device
        self.metadata = metadata
        self.budget = budget
        self.batch = batch
        #: eventfd the SIGBUS guard writes when a region's file was truncated under us (the server's; -1: none)
        self.fault_fd = fault_fd
        self.mem = GuestMemory(notify_fd=fault_fd)
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.status = 0
        self.vrings = [Vring(i) for i in range(device.num_queues)]
        self.workers: dict[tuple[int, ...], Worker] = {}
        self.lock = threading.Lock()
        self.handlers = {
            R.GET_FEATURES: self.get_features, R.SET_FEATURES: self.set_features,
            R.GET_PROTOCOL_FEATURES: self.get_protocol_features,
            R.SET_PROTOCOL_FEATURES: self.set_protocol_features,
            R.SET_OWNER: self.set_owner, R.RESET_OWNER: self.reset_owner,
            R.SET_MEM_TABLE: self.set_mem_table, R.GET_MAX_MEM_SLOTS: self.get_max_mem_slots,
            R.ADD_MEM_REG: self.add_mem_reg, R.REM_MEM_REG: self.rem_mem_reg,
            R.SET_VRING_NUM: self.set_vring_num, R.SET_VRING_ADDR: self.set_vring_addr,
            R.SET_VRING_BASE: self.set_vring_base, R.GET_VRING_BASE: self.get_vring_base,
            R.SET_VRING_KICK: self.set_vring_kick, R.SET_VRING_CALL: self.set_vring_call,
            R.SET_VRING_ERR: self.set_vring_err, R.SET_VRING_ENABLE: self.set_vring_enable,
            R.GET_QUEUE_NUM: self.get_queue_num, R.SET_STATUS: self.set_status,
            R.GET_STATUS: self.get_status, R.GET_CONFIG: self.get_config, R.SET_CONFIG: self.set_config,
            R.GET_INFLIGHT_FD: self.get_inflight_fd, R.SET_INFLIGHT_FD: self.set_inflight_fd,
        }
        #: requests whose reply is their answer (a failure still owes one, of the right shape)
        self.replies = {R.GET_FEATURES: 8, R.GET_PROTOCOL_FEATURES: 8, R.GET_VRING_BASE: 8, R.GET_QUEUE_NUM: 8,
                        R.GET_MAX_MEM_SLOTS: 8, R.GET_STATUS: 8, R.GET_CONFIG: None,
                        R.GET_INFLIGHT_FD: inflight.PAYLOAD_SIZE}
        self.inflight: inflight.InflightArea | None = None
        self.totals: dict[int, dict[str, int]] = {}

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
        self.answer(msg, reply, ok)

    def answer(self, msg: P.Message, reply: bytes | None, ok: bool) -> None:
        """Send what ``msg`` is owed: its reply (of the right shape even on failure), or a REPLY_ACK status."""
        if msg.request in self.replies:
            fds = None
            if isinstance(reply, tuple):  # a reply that carries fds
                reply, fds = reply
            if reply is None:
                size = self.replies[msg.request]
                reply = bytes(size if size is not None else len(msg.payload))
            try:
                P.send_message(self.sock, msg.request, reply, fds, flags=P.VHOST_USER_VERSION | P.VHOST_USER_REPLY_MASK)
            finally:
                for fd in fds or ():  # the peer has its own copies now
                    os.close(fd)
        elif msg.need_reply and self.protocol_features & (1 << PF.REPLY_ACK):
            P.send_reply(self.sock, msg.request, P.U64.pack(0 if ok else 1))

    def vring(self, index: int) -> Vring:
        if index >= len(self.vrings):
            raise VringError(f"vring index {index} out of range (device has {len(self.vrings)} queues)")
        return self.vrings[index]

    # -- features and ownership -------------------------------------------------------------------------
    @property
    def offered_features(self) -> int:
        return (self.device.features | TRANSPORT_FEATURES) & ~self.device.transport_features_off

    @property
    def offered_protocol_features(self) -> int:
        return PROTOCOL_FEATURES | ((1 << PF.INFLIGHT_SHMFD) if self.device.inflight_tracking else 0)

    def get_features(self, msg: P.Message) -> bytes:
        return P.U64.pack(self.offered_features)

    def set_features(self, msg: P.Message) -> None:
        features = msg.u64()
        extra = features & ~self.offered_features
        if extra:
            raise ProtocolError(f"SET_FEATURES asks for features not offered: {extra:#x}")
        if (features ^ self.features) & (1 << VIRTIO_F_RING_PACKED):
            self.stop_workers()  # the ring layout changes: no worker, view or state of the other one survives
            self.features = features
            for vr in self.vrings:
                vr.views = None
                vr.base, vr.base_given = 0, False
                if vr.size and not self.packed and vr.size & (vr.size - 1):
                    vr.size = 0  # not a split ring size: wait for SET_VRING_NUM
                if vr.size:
                    self._new_state(vr)
        self.features = features
        self.device.set_features(features)
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
        return P.CONFIG_HDR.pack(offset, size, flags) + space[offset:offset + size]

    def set_config(self, msg: P.Message) -> None:
        offset, size, _flags, data = msg.config()
        if len(data) != size:
            raise ProtocolError(f"SET_CONFIG size {size} but {len(data)} bytes of data")
        self.device.write_config(offset, data)

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
        for r in old:
            self.mem.unmap(r)
        self.refresh()

    def set_mem_table(self, msg: P.Message) -> None:
        regions = msg.mem_table()
        fds = list(msg.fds)
        self._memory_change(lambda: self.mem.set_table(regions, fds))
        log.info("memory table: %d regions, %d MiB", len(regions), sum(r.memory_size for r in regions) >> 20)

    def add_mem_reg(self, msg: P.Message) -> None:
        if len(msg.fds) != 1:
            raise ProtocolError(f"ADD_MEM_REG with {len(msg.fds)} fds, expected 1")
        region = msg.single_region()
        self._memory_change(lambda: (self.mem.add_region(region, msg.fds[0]), [])[1])

    def rem_mem_reg(self, msg: P.Message) -> None:
        region = msg.single_region()
        self._memory_change(lambda: [self.mem.remove_region(region)])

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
    def packed(self) -> bool:
        """VIRTIO_F_RING_PACKED negotiated: every ring of the device is packed."""
        return bool(self.features & (1 << VIRTIO_F_RING_PACKED))

    def _new_state(self, vr: Vring) -> None:
        """Fresh queue state for ``vr.size`` starting from ``vr.base``; the call fd stays."""
        callfd = vr.q[Q_CALLFD]
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
            raise VringError(f"vring {index}: packed base {num:#x}: the avail cursor is {lead} descriptors ahead "
                             f"of the used one, more than the ring holds ({size})")

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
        self.record_totals(vr)
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
        if not num:
            self.stop_workers([index])
        vr.enabled = bool(num)
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
        """Stop (and join) the workers serving any of ``indices`` (all if None)."""
        stopped = []
        for group, w in list(self.workers.items()):
            if indices is None or any(i in group for i in indices):
                w.stop()
                del self.workers[group]
                stopped.append(w)
        return stopped

    def refresh(self) -> None:
        """Start a worker for every group whose rings are all ready and that has none."""
        for group in self.device.workers():
            if group in self.workers:
                continue
            rings = [self.vrings[i] for i in group]
            if not all(vr.ready for vr in rings) or self.mem.nregions == 0:
                continue
            handles = []
            for vr in rings:
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
                # unknown: the ring may hold NO_NOTIFY or a stale avail_event (left by a worker stopped while
                # polling, or by a previous back-end), so the first set_notify() must write it either way
                vr.q[Q_NOTIFY_ON] = -1
                vr.q[Q_SIGNALLED_VALID] = 0
                vr.q[Q_STOP] = 0
                region = self.inflight.queue(vr.index, vr.size) if self.inflight is not None else None
                handles.append(Ring(vr.index, vr.q, vr.views, self.mem, kick_fd=vr.kick_fd, inflight=region))
            w = Worker(self, rings, self.device.make_step(handles), self.budget)
            self.workers[group] = w
            w.start()
            log.info("queues %s started (%s path, %s rings)", group,
                     "/".join("direct" if vr.q[2] else "copy" for vr in rings), "packed" if self.packed else "split")

    def _load_used_idx(self, vr: Vring) -> None:
        """The used index lives in the ring; start from it, as vhost does."""
        assert vr.addr is not None
        view = self.mem.view(SPACE_UVA, vr.addr.used + 2, 2)
        if view is not None:
            used = int(view.view(np.uint16)[0])
            if used != vr.q[Q_LAST_AVAIL]:
                log.info("vring %d: used index %d, last avail %d", vr.index, used, vr.q[Q_LAST_AVAIL])
            vr.q[Q_USED_IDX] = used

    def ring_broken(self, rings: list[Vring]) -> None:
        """Called by a worker whose ring broke: log why, signal ERR, leave the other queues running."""
        for vr in rings:
            vr.broken = True
            log.error("vring %d broken: %s", vr.index, describe(int(vr.q[Q_ERROR]), int(vr.q[Q_ERROR_VALUE])))
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
        self.totals[vr.index] = queue_stats(vr.q)

    def stats(self) -> dict[int, dict[str, int]]:
        out = dict(self.totals)
        for vr in self.vrings:
            if vr.size:
                out[vr.index] = queue_stats(vr.q)
        return out

    def teardown(self) -> None:
        """Stop everything, drop views, unmap memory, close every fd."""
        self.stop_workers()
        for vr in self.vrings:
            if vr.size:
                self.record_totals(vr)
            vr.views = None
            vr.close_fds()
        self.mem.close()
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        self.vrings = [Vring(i) for i in range(self.device.num_queues)]


EVENTFD_KIND = "anon_inode:[eventfd]"


def fd_kind(fd: int) -> str:
    """What an fd refers to, as /proc names it (``anon_inode:[eventfd]``, ``socket:[…]``, a path, …)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        return f"unreadable ({e.strerror})"


def queue_stats(q: np.ndarray) -> dict[str, int]:
    return {"packets": int(q[Q_PACKETS]), "bytes": int(q[Q_BYTES]), "drops": int(q[Q_DROPS]),
            "chains": int(q[Q_CHAINS]), "calls": int(q[Q_CALLS]), "wakeups": int(q[Q_WAKEUPS]),
            "error": int(q[Q_ERROR])}


class Server:
    """Listen on a Unix socket and serve one front-end at a time; a disconnect tears the device down and the
    next connection gets a fresh one."""

    def __init__(self, device: Device, socket_path: str | None, metadata: Metadata = Metadata.DIRECT,
                 batch: int = 256, listener: socket.socket | None = None) -> None:
        """Listen on ``socket_path`` (created, replacing what is there), or on ``listener``, a listening Unix
        socket passed in (socket activation: its path belongs to whoever made it and is left in place)."""
        if listener is None and socket_path is None:
            raise ValueError("a socket path or a listening socket is needed")
        self.device = device
        self.metadata = Metadata(metadata)
        self.batch = batch
        sigbus.install()  # a front-end truncating a region's file under us breaks its connection, not the process
        self.stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        #: written by the SIGBUS guard when it recovered a fault in the connection's memory
        self.fault_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.connection: Connection | None = None
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
                    self.connection = Connection(sock, self.device, self.metadata, batch=self.batch,
                                                 fault_fd=self.fault_fd)
                    sel.unregister(self.listener)
                    sel.register(sock, selectors.EVENT_READ, "conn")
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
                if not end and "conn" in kinds and self.connection is not None:
                    end = not self._read_one(self.connection)
                if end:
                    assert self.connection is not None
                    sel.unregister(self.connection.sock)
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
        stats = conn.stats()
        self.history.append(stats)
        log.info("connection closed; queue stats %s", json.dumps(stats))
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
