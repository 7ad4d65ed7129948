"""A virtio-scsi driver over vhost-user (pyvhost's front-end for SCSI targets, virtio 1.2 §5.6).

It negotiates, reads the config space, lays out one request queue (queue 2, as SeaBIOS does: the controlq and
the eventq are left unset) with its request buffers in a memfd, and issues commands to one LUN of target 0:
each request slot ``s`` owns descriptors ``3s``, ``3s+1`` and ``3s+2`` -- ``virtio_scsi_cmd_req`` (device-
readable), then for a write the data-out and ``virtio_scsi_cmd_resp`` (device-writable), for a read the response
and the data-in -- so a completion's head names its slot.  Completions are taken from the used ring and checked
(a head that is not outstanding, a response never written) before they are returned.
"""

from __future__ import annotations

import os
import select
import struct
import time
from dataclasses import dataclass, field

from .. import protocol as P
from ..devices.scsi import (
    CMD_REQ,
    CMD_REQ_SIZE,
    CMD_RESP,
    CMD_RESP_SIZE,
    CONFIG,
    REQUESTQ,
    TARGET,
    VIRTIO_SCSI_CDB_SIZE,
    VIRTIO_SCSI_S_OK,
)
from ..devices.scsi_cdb import GOOD, READ_16, SAI_READ_CAPACITY_16, SERVICE_ACTION_IN_16, WRITE_16
from ..protocol import ProtocolFeature as PF
from ..protocol import Request as R
from ..ring.split import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    avail_bytes,
    desc_bytes,
    used_bytes,
)
from .blk import _publish
from .net import Frontend, FrontendError
from .ram import PAGE
from .split import DriverRing

#: task attribute SIMPLE (virtio_scsi_cmd_req.task_attr)
VIRTIO_SCSI_S_SIMPLE = 0
#: the response byte before the device writes it (no virtio-scsi response code has this value)
RESPONSE_UNSET = 0xFF
#: offset of ``response`` in virtio_scsi_cmd_resp
RESPONSE_AT = CMD_RESP.size - 1
#: slot strides of the request headers and responses
REQ_STRIDE, RESP_STRIDE = 64, 128
FIELDS = (
    "num_queues",
    "seg_max",
    "max_sectors",
    "cmd_per_lun",
    "event_info_size",
    "sense_size",
    "cdb_size",
    "max_channel",
    "max_target",
    "max_lun",
)


def lun_field(lun: int) -> bytes:
    """The 8-byte virtio-scsi LUN of ``lun`` on target 0 (flat space addressing, as Linux sends it)."""
    return bytes([1, TARGET, 0x40 | (lun >> 8), lun & 0xFF]) + bytes(4)


def rw16(write: bool, lba: int, blocks: int) -> bytes:
    """READ(16) or WRITE(16) of ``blocks`` blocks at ``lba`` (SBC-3 5.16, 5.40)."""
    return bytes([WRITE_16 if write else READ_16, 0]) + struct.pack(">QI", lba, blocks) + bytes(2)


@dataclass
class ScsiCompletion:
    tag: object
    response: int
    status: int
    residual: int
    sense: bytes
    length: int
    slot: int

    @property
    def ok(self) -> bool:
        return self.response == VIRTIO_SCSI_S_OK and self.status == GOOD


@dataclass
class _Queue:
    ring: DriverRing
    slots: int
    req_off: int
    resp_off: int
    data_off: int
    max_io: int
    free: list[int] = field(default_factory=list)
    busy: dict[int, object] = field(default_factory=dict)  # slot -> tag
    avail_idx: int = 0
    published: int = 0
    last_used: int = 0


class ScsiFrontend(Frontend):
    """Driver side of one vhost-user connection to a SCSI target: one request queue, commands to ``lun``."""

    def __init__(
        self,
        socket_path: str,
        *,
        queue_size: int = 128,
        max_io: int = 128 << 10,
        lun: int = 0,
        poll: bool = False,
        connect_timeout: float = 10.0,
    ) -> None:
        slots = queue_size // 3
        ram = (
            desc_bytes(queue_size)
            + avail_bytes(queue_size)
            + used_bytes(queue_size)
            + slots * (REQ_STRIDE + RESP_STRIDE + max_io)
            + 8 * PAGE
        )
        super().__init__(
            socket_path,
            queue_size=queue_size,
            ram_size=-(-(ram + (1 << 20)) // (2 << 20)) * (2 << 20),
            event_idx=False,
            mrg_rxbuf=False,
            connect_timeout=connect_timeout,
            num_queues=REQUESTQ + 1,
        )
        self.max_io, self.lun8, self.poll = max_io, lun_field(lun), poll
        self.config: dict[str, int] = {}
        self.queue: _Queue | None = None
        self.block_size = 512
        self.blocks = 0
        #: problems seen in the used ring (completions not outstanding, responses never written)
        self.anomalies: list[str] = []
        self.tags = 0

    def setup(self) -> None:
        """Negotiate, read the config, share memory, start the request queue, read the unit's capacity."""
        self.negotiate()
        if not self.protocol_features & (1 << PF.CONFIG):
            raise FrontendError("back-end does not offer VHOST_USER_PROTOCOL_F_CONFIG")
        reply = self.request(R.GET_CONFIG, P.CONFIG_HDR.pack(0, CONFIG.size, 0) + bytes(CONFIG.size))
        if len(reply) < P.CONFIG_HDR.size + CONFIG.size:
            raise FrontendError(f"GET_CONFIG answered {len(reply)} bytes")
        self.config = dict(zip(FIELDS, CONFIG.unpack_from(reply, P.CONFIG_HDR.size)))
        n = self.queue_size
        desc = self.ram.alloc(desc_bytes(n), PAGE)
        avail = self.ram.alloc(avail_bytes(n), 64)
        used = self.ram.alloc(used_bytes(n), PAGE)
        slots = n // 3
        req = self.ram.alloc(REQ_STRIDE * slots, 64)
        resp = self.ram.alloc(RESP_STRIDE * slots, 64)
        data = self.ram.alloc(slots * self.max_io, PAGE)
        ring = DriverRing(
            REQUESTQ,
            n,
            desc,
            avail,
            used,
            data,
            self.ram,
            os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
            os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
        )
        ring.avail[0] = VRING_AVAIL_F_NO_INTERRUPT if self.poll else 0
        self.rings.append(ring)
        self.queue = _Queue(ring, slots, req, resp, data, self.max_io, list(range(slots))[::-1])
        self.set_mem_table()
        self.start_ring(ring)
        c = self.command_io(bytes([SERVICE_ACTION_IN_16, SAI_READ_CAPACITY_16]) + bytes(8) + struct.pack(">I", 32), 32)
        if not c[0].ok:
            raise FrontendError(f"READ CAPACITY(16): response {c[0].response}, status {c[0].status:#x}")
        last, self.block_size = struct.unpack_from(">QI", c[1])
        self.blocks = last + 1

    # -- commands -------------------------------------------------------------------------------------------
    def post(
        self,
        cdb: bytes,
        dataout: int = 0,
        datain: int = 0,
        data: bytes | None = None,
        tag: object = None,
        publish: bool = True,
    ) -> int:
        """Queue one command with ``dataout`` bytes of the slot's data sent (``data`` written there first) or
        ``datain`` bytes of room for the device's; return its slot."""
        bq = self.queue
        assert bq is not None, "setup() first"
        if not bq.free:
            raise FrontendError("no free request slot")
        if data is not None:
            dataout = len(data)
        if dataout and datain or max(dataout, datain) > bq.max_io or len(cdb) > VIRTIO_SCSI_CDB_SIZE:
            raise FrontendError(f"command of {dataout} bytes out, {datain} in, CDB of {len(cdb)} bytes")
        s = bq.free.pop()
        self.tags += 1
        r_off, p_off, d_off = bq.req_off + REQ_STRIDE * s, bq.resp_off + RESP_STRIDE * s, bq.data_off + s * bq.max_io
        mm = self.ram.mm
        mm[r_off : r_off + CMD_REQ_SIZE] = CMD_REQ.pack(self.lun8, self.tags, VIRTIO_SCSI_S_SIMPLE, 0, 0) + cdb.ljust(
            VIRTIO_SCSI_CDB_SIZE, b"\0"
        )
        mm[p_off + RESPONSE_AT] = RESPONSE_UNSET
        if data is not None:
            mm[d_off : d_off + len(data)] = data
        segs = [(r_off, CMD_REQ_SIZE, 0)]
        if dataout:
            segs.append((d_off, dataout, 0))
        segs.append((p_off, CMD_RESP_SIZE, VRING_DESC_F_WRITE))
        if datain:
            segs.append((d_off, datain, VRING_DESC_F_WRITE))
        desc, gpa = bq.ring.desc, self.ram.gpa
        for k, (off, length, flags) in enumerate(segs):
            d = 3 * s + k
            more = k + 1 < len(segs)
            if more:
                flags |= VRING_DESC_F_NEXT
            desc[2 * d] = gpa(off)
            desc[2 * d + 1] = length | (flags << 32) | ((d + 1 if more else 0) << 48)
        ring = bq.ring
        ring.avail[2 + (bq.avail_idx & (ring.size - 1))] = 3 * s
        bq.avail_idx = (bq.avail_idx + 1) & 0xFFFF
        bq.busy[s] = tag
        if publish:
            self.publish()
        return s

    def post_rw(self, write: bool, lba: int, nbytes: int, publish: bool = True) -> int:
        """READ(16) into, or WRITE(16) of what is in, the slot's data buffer: ``nbytes`` at block ``lba``."""
        cdb = rw16(write, lba, nbytes // self.block_size)
        return self.post(cdb, dataout=nbytes if write else 0, datain=0 if write else nbytes, publish=publish)

    def publish(self) -> None:
        """Make the posted commands visible and kick the device unless it said it is polling."""
        bq = self.queue
        assert bq is not None
        if bq.published == bq.avail_idx:
            return
        bq.published = bq.avail_idx
        if not _publish(bq.ring.avail, bq.ring.used16, bq.avail_idx) & VRING_USED_F_NO_NOTIFY:
            os.eventfd_write(bq.ring.kick_fd, 1)

    def reap(self) -> list[ScsiCompletion]:
        """Completions published since the last call, checked against what is outstanding."""
        bq = self.queue
        assert bq is not None
        ring = bq.ring
        used = int(ring.used16[1])
        mm = self.ram.mm
        out = []
        while bq.last_used != used:
            e = bq.last_used & (ring.size - 1)
            head, length = int(ring.used32[1 + 2 * e]), int(ring.used32[2 + 2 * e])
            bq.last_used = (bq.last_used + 1) & 0xFFFF
            s = head // 3
            if head % 3 or s >= bq.slots or s not in bq.busy:
                self.anomalies.append(f"completion of head {head} that is not outstanding")
                continue
            tag = bq.busy.pop(s)
            p_off = bq.resp_off + RESP_STRIDE * s
            sense_len, residual, _qual, status, response = CMD_RESP.unpack_from(mm, p_off)
            if response == RESPONSE_UNSET:
                self.anomalies.append(f"command {tag!r} completed without a response")
            sense = bytes(mm[p_off + CMD_RESP.size : p_off + CMD_RESP.size + min(sense_len, CMD_RESP_SIZE)])
            out.append(ScsiCompletion(tag, response, status, residual, sense, length, s))
            bq.free.append(s)
        return out

    def wait(self, timeout: float = 10.0) -> list[ScsiCompletion]:
        """Completions, waiting (on the call fd, or polling) until there is at least one."""
        bq = self.queue
        assert bq is not None
        deadline = time.monotonic() + timeout
        while True:
            done = self.reap()
            if done:
                return done
            if time.monotonic() > deadline:
                raise FrontendError(f"no completion in {timeout} s ({len(bq.busy)} outstanding)")
            if self.poll:
                continue
            ready, _, _ = select.select([bq.ring.call_fd], [], [], 0.05)
            if ready:
                try:
                    os.eventfd_read(bq.ring.call_fd)
                except BlockingIOError:
                    pass

    def command_io(
        self, cdb: bytes, datain: int = 0, data: bytes | None = None, timeout: float = 10.0
    ) -> tuple[ScsiCompletion, bytes]:
        """One command, waited for: its completion and the data-in it returned."""
        s = self.post(cdb, datain=datain, data=data, tag="io")
        bq = self.queue
        assert bq is not None
        while True:
            for c in self.wait(timeout):
                if c.slot == s:
                    got = max(0, datain - c.residual)
                    off = bq.data_off + s * bq.max_io
                    return c, bytes(self.ram.mm[off : off + got])

    def fill_slots(self, data: bytes) -> None:
        """Write ``data`` at the start of every slot's data buffer (what writes posted by ``post_rw`` send)."""
        bq = self.queue
        assert bq is not None and len(data) <= bq.max_io
        for s in range(bq.slots):
            off = bq.data_off + s * bq.max_io
            self.ram.mm[off : off + len(data)] = data

    def __enter__(self) -> ScsiFrontend:
        return self
