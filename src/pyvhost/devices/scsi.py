"""virtio-scsi (virtio 1.2 §5.6): one target whose logical units are raw image files or block devices.

Queues: the controlq (0) answers task management functions and asynchronous-notification queries; the eventq
(1) is left alone (no hot-plug or change events are offered, so its buffers are never taken, as Linux's
vhost-scsi does); each request queue (2, 3, ...) carries commands: ``virtio_scsi_cmd_req`` (LUN, tag, task
attribute, a 32-byte CDB) then data-out, device-writable ``virtio_scsi_cmd_resp`` (sense length, residual,
status, response, 96 bytes of sense) then data-in.

A command is checked in the queue's worker -- header whole, response room present, the LUN (format 1, target,
LUN) on this target, the CDB (``scsi_cdb.py``), the data buffers long enough (else VIRTIO_SCSI_S_OVERRUN) --
and READ/WRITE/SYNCHRONIZE CACHE/UNMAP/WRITE SAME go to a pool of I/O threads that do ``os.preadv``/
``os.pwritev`` straight into and out of the chain's memoryviews of guest memory (no copy), as blk does.  A
refused command gets CHECK CONDITION with fixed-format sense data (ILLEGAL REQUEST and the ASC the specs name);
an absent target VIRTIO_SCSI_S_BAD_TARGET; a malformed chain VIRTIO_SCSI_S_FAILURE (or, without room for a
response, a used length of 0).  Nothing is written outside the chain's writable buffers.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import threading
import time
from dataclasses import dataclass, field

from ..ring.state import Q_STOP
from . import scsi_cdb as C
from .base import Ring, Step, StepFn
from .blk import (
    BLKDISCARD,
    BLKGETSIZE64,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    IOV_MAX,
    IOPool,
    _release,
    _skip,
    _total,
)
from .blk import _libc as libc
from .chain_device import ChainDevice, Request

log = logging.getLogger(__name__)

VIRTIO_ID_SCSI = 8
# feature bits (§5.6.3)
VIRTIO_SCSI_F_INOUT = 0
VIRTIO_SCSI_F_HOTPLUG = 1
VIRTIO_SCSI_F_CHANGE = 2
VIRTIO_SCSI_F_T10_PI = 3
# queues (§5.6.2)
CONTROLQ, EVENTQ, REQUESTQ = 0, 1, 2
# sizes the device uses (the config's defaults, §5.6.4)
VIRTIO_SCSI_CDB_SIZE = 32
VIRTIO_SCSI_SENSE_SIZE = 96
VIRTIO_SCSI_EVENT_SIZE = 16
#: struct virtio_scsi_config: num_queues, seg_max, max_sectors, cmd_per_lun, event_info_size, sense_size,
#: cdb_size, max_channel, max_target, max_lun
CONFIG = struct.Struct("<IIIIIIIHHI")
#: struct virtio_scsi_req_cmd without the CDB: lun[8], id, task_attr, prio, crn
CMD_REQ = struct.Struct("<8sQBBB")
CMD_REQ_SIZE = CMD_REQ.size + VIRTIO_SCSI_CDB_SIZE
#: struct virtio_scsi_resp_cmd without the sense: sense_len, residual, status_qualifier, status, response
CMD_RESP = struct.Struct("<IIHBB")
CMD_RESP_SIZE = CMD_RESP.size + VIRTIO_SCSI_SENSE_SIZE
# response codes (§5.6.6.1)
VIRTIO_SCSI_S_OK = 0
VIRTIO_SCSI_S_FUNCTION_COMPLETE = 0
VIRTIO_SCSI_S_OVERRUN = 1
VIRTIO_SCSI_S_ABORTED = 2
VIRTIO_SCSI_S_BAD_TARGET = 3
VIRTIO_SCSI_S_RESET = 4
VIRTIO_SCSI_S_BUSY = 5
VIRTIO_SCSI_S_TRANSPORT_FAILURE = 6
VIRTIO_SCSI_S_TARGET_FAILURE = 7
VIRTIO_SCSI_S_NEXUS_FAILURE = 8
VIRTIO_SCSI_S_FAILURE = 9
VIRTIO_SCSI_S_FUNCTION_SUCCEEDED = 10
VIRTIO_SCSI_S_FUNCTION_REJECTED = 11
VIRTIO_SCSI_S_INCORRECT_LUN = 12
# controlq (§5.6.6.2)
VIRTIO_SCSI_T_TMF = 0
VIRTIO_SCSI_T_AN_QUERY = 1
VIRTIO_SCSI_T_AN_SUBSCRIBE = 2
VIRTIO_SCSI_T_TMF_ABORT_TASK = 0
VIRTIO_SCSI_T_TMF_ABORT_TASK_SET = 1
VIRTIO_SCSI_T_TMF_CLEAR_ACA = 2
VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET = 3
VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET = 4
VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET = 5
VIRTIO_SCSI_T_TMF_QUERY_TASK = 6
VIRTIO_SCSI_T_TMF_QUERY_TASK_SET = 7
TMF_REQ = struct.Struct("<II8sQ")  # type, subtype, lun, id
AN_REQ = struct.Struct("<I8sI")  # type, lun, event_requested
AN_RESP = struct.Struct("<IB")  # event_actual, response
CTRL_TYPE = struct.Struct("<I")
#: the one target this device is (LUN byte 1)
TARGET = 0
MAX_LUN = 16383
#: how long a TMF waits for the commands it aborts or resets to finish (they cannot be cancelled mid-syscall)
TMF_WAIT = 10.0


@dataclass
class Unit:
    """One logical unit: an open image and what the emulated commands say about it."""

    path: str
    fd: int
    info: C.UnitInfo
    is_blockdev: bool


def open_unit(path: str, readonly: bool, serial: str | None = None, block_size: int = 512) -> Unit:
    fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        blockdev = stat.S_ISBLK(st.st_mode)
        if blockdev:
            buf = bytearray(8)
            fcntl.ioctl(fd, BLKGETSIZE64, buf)
            size = struct.unpack("<Q", buf)[0]
        elif stat.S_ISREG(st.st_mode):
            size = st.st_size
        else:
            raise ValueError(f"{path} is neither a regular file nor a block device")
        if size < block_size:
            raise ValueError(f"{path}: {size} bytes, less than one {block_size}-byte block")
    except BaseException:
        os.close(fd)
        raise
    if size % block_size:
        log.warning("%s: the last %d bytes (a partial block) are not exposed", path, size % block_size)
    name = (serial if serial is not None else os.path.basename(path)).encode("ascii", "replace")[:32]
    info = C.UnitInfo(blocks=size // block_size, block_size=block_size, readonly=readonly, serial=name)
    return Unit(path, fd, info, blockdev)


def decode_lun(lun: bytes) -> int | None:
    """The LUN of an 8-byte virtio-scsi LUN field (1, target, then the SAM LUN), or None if not on our target."""
    if lun[0] != 1 or lun[1] != TARGET:
        return None
    return ((lun[2] << 8) | lun[3]) & 0x3FFF


def _take(views: list[memoryview], n: int) -> list[memoryview]:
    """The first ``n`` bytes of the views (slices, no copy)."""
    out = []
    for v in views:
        if n <= 0:
            break
        out.append(v if len(v) <= n else v[:n])
        n -= len(v)
    return out


def _scatter(views: list[memoryview], data: bytes) -> int:
    """Copy ``data`` into the views, in order, as far as they reach; the bytes copied."""
    done = 0
    for v in views:
        if done >= len(data):
            break
        k = min(len(v), len(data) - done)
        v[:k] = data[done : done + k]
        done += k
    return done


def _gather(views: list[memoryview], n: int) -> bytes:
    """The first ``n`` bytes of the views, copied (once: later changes by the guest are not seen)."""
    parts, left = [], n
    for v in views:
        if left <= 0:
            break
        parts.append(bytes(v[:left]))
        left -= len(v)
    return b"".join(parts)


class _Refused(Exception):
    """A command answered without reaching the unit: a virtio-scsi response code other than OK."""

    def __init__(self, response: int, why: str) -> None:
        super().__init__(why)
        self.response = response


class ScsiDevice(ChainDevice):
    """virtio-scsi: target 0 with ``luns`` (LUN number -> image path)."""

    device_id = VIRTIO_ID_SCSI
    access_platform = True

    def __init__(
        self,
        luns: dict[int, str],
        readonly: bool = False,
        request_queues: int = 1,
        io_threads: int = 4,
        seg_max: int = 126,
        max_sectors: int = 0xFFFF,
        cmd_per_lun: int = 128,
        nowait: bool = True,
    ) -> None:
        if not luns:
            raise ValueError("a SCSI target needs at least one LUN")
        bad = [n for n in luns if not 0 <= n <= MAX_LUN]
        if bad:
            raise ValueError(f"LUN {bad[0]} is outside 0..{MAX_LUN}")
        if request_queues < 1:
            raise ValueError("at least one request queue")
        self.units: dict[int, Unit] = {}
        try:
            for n, path in sorted(luns.items()):
                self.units[n] = open_unit(path, readonly)
        except BaseException:
            self.close()
            raise
        self.readonly = readonly
        self.request_queues = request_queues
        self.num_queues = REQUESTQ + request_queues
        self.seg_max, self.max_sectors, self.cmd_per_lun = seg_max, max_sectors, cmd_per_lun
        # CHANGE: QEMU's vhost-user-scsi asks for it (a device may report parameter changes; none is ever
        # reported here); no hot-plug, no T10 PI, no bidirectional commands
        self.features = 1 << VIRTIO_SCSI_F_CHANGE
        self.negotiated = 0
        self.pool: IOPool | None = IOPool(io_threads, "pyvhost-scsi-io") if io_threads > 0 else None
        self.lock = threading.Lock()
        self.counts = {
            "commands": 0,
            "read": 0,
            "write": 0,
            "read_bytes": 0,
            "write_bytes": 0,
            "sync": 0,
            "unmap": 0,
            "write_same": 0,
            "check_condition": 0,
            "bad_target": 0,
            "overrun": 0,
            "failure": 0,
            "tmf": 0,
            "an": 0,
        }
        #: tasks (LUN, tag) being done by the I/O threads: what a TMF aborts or queries
        self.tasks: dict[tuple[int, int], int] = {}
        self.tasks_done = threading.Condition(self.lock)
        self.nowait = nowait
        self.nowait_max = 64 << 10

    # -- configuration ----------------------------------------------------------------------------------
    def config_space(self) -> bytes:
        return CONFIG.pack(
            self.request_queues,
            self.seg_max,
            self.max_sectors,
            self.cmd_per_lun,
            VIRTIO_SCSI_EVENT_SIZE,
            VIRTIO_SCSI_SENSE_SIZE,
            VIRTIO_SCSI_CDB_SIZE,
            0,  # max_channel
            TARGET,  # max_target
            MAX_LUN,
        )

    def write_config(self, offset: int, data: bytes) -> None:
        """Drivers write sense_size and cdb_size (Linux writes the defaults); only the values in use are taken."""
        cur = self.config_space()
        if offset < 20 or offset + len(data) > 28 or data != cur[offset : offset + len(data)]:
            raise ValueError(
                f"config write of {data.hex()} at {offset}: only sense_size {VIRTIO_SCSI_SENSE_SIZE} and "
                f"cdb_size {VIRTIO_SCSI_CDB_SIZE} are supported"
            )

    def make_step(self, rings: list[Ring]) -> StepFn:
        (ring,) = rings
        if ring.index != EVENTQ:
            return super().make_step(rings)
        q = ring.q

        def idle(budget: int) -> int:  # no event is ever reported: the driver's event buffers stay with it
            return Step.STOPPED if q[Q_STOP] else Step.IDLE

        return idle

    # -- requests -----------------------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        if req.queue == CONTROLQ:
            req.complete(self._control(req))
            return
        if _total(req.writable) < CMD_RESP_SIZE:
            log.error(
                "queue %d: command %d has %d writable bytes, the response needs %d; completed with length 0",
                req.queue,
                req.head,
                _total(req.writable),
                CMD_RESP_SIZE,
            )
            self._count("failure")
            req.complete(0)
            return
        resp = _take(req.writable, CMD_RESP_SIZE)
        datain = _skip(req.writable, CMD_RESP_SIZE)
        try:
            job = self._parse(req, datain)
        except _Refused as e:
            log.debug("queue %d: command %d: %s", req.queue, req.head, e)
            self._finish(req, resp, datain, [], response=e.response, residual=_total(datain))
            return
        except C.Sense as e:
            log.debug("queue %d: command %d: CHECK CONDITION: %s", req.queue, req.head, e)
            self._finish(req, resp, datain, [], sense=e.data(), residual=_total(datain))
            return
        if isinstance(job, bytes):  # an emulated command's data-in
            n = _scatter(datain, job)
            self._finish(req, resp, datain, [], residual=_total(datain) - n, written=n)
            return
        if job.kind in ("read", "write") and self._try_nowait(req, resp, datain, job):
            return
        if self.pool is None:
            self._run(req, resp, datain, job)
            return
        with self.lock:
            self.tasks[job.task] = self.tasks.get(job.task, 0) + 1
        self.pool.put(self._run, req, resp, datain, job)

    def _parse(self, req: Request, datain: list[memoryview]) -> bytes | _Job:
        raw = _gather(req.readable, CMD_REQ_SIZE)
        if len(raw) < CMD_REQ_SIZE:
            raise _Refused(VIRTIO_SCSI_S_FAILURE, f"request header of {len(raw)} bytes, expected {CMD_REQ_SIZE}")
        lun8, tag, _attr, _prio, _crn = CMD_REQ.unpack_from(raw)
        lun = decode_lun(lun8)
        if lun is None:
            self._count("bad_target")
            raise _Refused(VIRTIO_SCSI_S_BAD_TARGET, f"LUN field {lun8.hex()} is not on target {TARGET}")
        cdb = raw[CMD_REQ.size :]
        self._count("commands")
        op = cdb[0]
        if not C.cdb_length(op):
            raise C.illegal(C.ASC_INVALID_COMMAND_OPERATION_CODE, f"operation code {op:#04x}")
        if cdb[C.cdb_length(op) - 1] & 0x04:  # NACA in the CONTROL byte (no ACA support)
            raise C.illegal(C.ASC_INVALID_FIELD_IN_CDB, "NACA")
        unit = self.units.get(lun)
        if op == C.REPORT_LUNS:
            return C.report_luns(cdb, list(self.units))
        if op == C.INQUIRY:
            return C.inquiry(cdb, unit.info if unit else None)
        if op == C.REQUEST_SENSE:
            if unit is None:
                return C.fixed_sense(C.ILLEGAL_REQUEST, C.ASC_LOGICAL_UNIT_NOT_SUPPORTED)[: cdb[4]]
            return C.request_sense(cdb)
        if unit is None:
            raise C.Sense(C.ILLEGAL_REQUEST, C.ASC_LOGICAL_UNIT_NOT_SUPPORTED, f"no logical unit {lun}")
        info = unit.info
        if op in (C.TEST_UNIT_READY, C.START_STOP_UNIT, C.PREVENT_ALLOW_MEDIUM_REMOVAL, C.VERIFY_10):
            return b""
        if op == C.READ_CAPACITY_10:
            return C.read_capacity_10(cdb, info)
        if op == C.SERVICE_ACTION_IN_16:
            if cdb[1] & 0x1F != C.SAI_READ_CAPACITY_16:
                raise C.illegal(C.ASC_INVALID_FIELD_IN_CDB, f"SERVICE ACTION IN(16) action {cdb[1] & 0x1F:#x}")
            return C.read_capacity_16(cdb, info)
        if op in (C.MODE_SENSE_6, C.MODE_SENSE_10):
            return C.mode_sense(cdb, info)
        dataout = _skip(req.readable, CMD_REQ_SIZE)
        bs = info.block_size
        if op in (C.READ_10, C.READ_16, C.WRITE_10, C.WRITE_16):
            t = C.decode_rw(cdb, info)
            if t.write and info.readonly:
                raise C.Sense(C.DATA_PROTECT, C.ASC_WRITE_PROTECTED, "write to a read-only unit")
            need = t.blocks * bs
            have = _total(dataout if t.write else datain)
            if have < need:
                self._count("overrun")
                raise _Refused(VIRTIO_SCSI_S_OVERRUN, f"{need} bytes to transfer, {have} in the data buffers")
            views = _take(dataout if t.write else datain, need)
            return _Job("write" if t.write else "read", unit, (lun, tag), t.lba * bs, views, fua=t.fua)
        if op in (C.SYNCHRONIZE_CACHE_10, C.SYNCHRONIZE_CACHE_16):
            if op == C.SYNCHRONIZE_CACHE_10:
                lba, blocks = int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big")
            else:
                lba, blocks = int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")
            C.check_range(lba, blocks, info)
            return _Job("sync", unit, (lun, tag))
        if op == C.UNMAP and info.provisioning:
            plen = int.from_bytes(cdb[7:9], "big")
            have = _total(dataout)
            if have < plen:
                self._count("overrun")
                raise _Refused(VIRTIO_SCSI_S_OVERRUN, f"UNMAP parameter list of {plen} bytes, {have} given")
            ranges = C.decode_unmap(cdb, _gather(dataout, plen), info)
            return _Job("unmap", unit, (lun, tag), ranges=[(a * bs, n * bs) for a, n in ranges])
        if op in (C.WRITE_SAME_10, C.WRITE_SAME_16) and info.provisioning:
            ws = C.decode_write_same(cdb, info)
            if ws.ndob:
                block = bytes(bs)
            else:
                if _total(dataout) < bs:
                    self._count("overrun")
                    raise _Refused(VIRTIO_SCSI_S_OVERRUN, f"WRITE SAME with {_total(dataout)} bytes of data-out")
                block = _gather(dataout, bs)
            unmap = ws.unmap and not any(block)
            return _Job(
                "write_same", unit, (lun, tag), ws.lba * bs, ranges=[(ws.lba * bs, ws.blocks * bs)], block=block,
                unmap=unmap,
            )  # fmt: skip
        raise C.illegal(C.ASC_INVALID_COMMAND_OPERATION_CODE, f"operation code {op:#04x}")

    def _try_nowait(self, req: Request, resp, datain, job: _Job) -> bool:
        """In the queue's worker: a short read or write the page cache serves without blocking (RWF_NOWAIT)."""
        views = job.views
        if not self.nowait or job.fua or len(views) > IOV_MAX or _total(views) > self.nowait_max:
            return False
        try:
            if job.kind == "read":
                n = os.preadv(job.unit.fd, views, job.offset, os.RWF_NOWAIT)
            else:
                n = os.pwritev(job.unit.fd, views, job.offset, os.RWF_NOWAIT)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self.nowait = False
            return False
        if n != _total(views):
            return False
        self._done_io(req, resp, datain, job, n)
        return True

    def _run(self, req: Request, resp, datain, job: _Job) -> None:
        """In an I/O thread (or the worker without threads): do the command, answer, complete."""
        fd = job.unit.fd
        try:
            if job.kind == "read":
                n = self._rw(os.preadv, fd, job.views, job.offset)
            elif job.kind == "write":
                n = self._rw(os.pwritev, fd, job.views, job.offset)
                if job.fua:
                    os.fdatasync(fd)
            else:
                n = 0
                if job.kind == "sync":
                    if not job.unit.info.readonly:
                        os.fdatasync(fd)
                elif job.kind == "unmap":
                    for off, length in job.ranges:
                        self._punch(job.unit, off, length)
                else:
                    self._write_same(job)
        except OSError as e:
            log.error("queue %d: %s at byte %d of %s failed: %s", req.queue, job.kind, job.offset, job.unit.path, e)
            key, asc = (
                (C.MEDIUM_ERROR, C.ASC_UNRECOVERED_READ_ERROR)
                if job.kind == "read"
                else (C.MEDIUM_ERROR, C.ASC_WRITE_ERROR)
            )
            self._end_task(job)
            self._finish(req, resp, datain, job.views, sense=C.fixed_sense(key, asc), residual=_total(datain))
            return
        except Exception:
            log.exception("queue %d: %s failed", req.queue, job.kind)
            sense = C.fixed_sense(C.HARDWARE_ERROR, C.ASC_INTERNAL_TARGET_FAILURE)
            self._end_task(job)
            self._finish(req, resp, datain, job.views, sense=sense, residual=_total(datain))
            return
        self._end_task(job)
        self._done_io(req, resp, datain, job, n)

    def _done_io(self, req: Request, resp, datain, job: _Job, n: int) -> None:
        if job.kind == "read":
            self._count("read", "read_bytes", n)
            self._finish(req, resp, datain, job.views, residual=_total(datain) - n, written=n)
        else:
            if job.kind == "write":
                self._count("write", "write_bytes", n)
            else:
                self._count(job.kind)
            self._finish(req, resp, datain, job.views, residual=_total(datain))

    def _end_task(self, job: _Job) -> None:
        with self.lock:
            left = self.tasks.get(job.task, 0) - 1
            if left > 0:
                self.tasks[job.task] = left
            else:
                self.tasks.pop(job.task, None)
            self.tasks_done.notify_all()

    def _finish(
        self,
        req: Request,
        resp: list[memoryview],
        datain: list[memoryview],
        views: list[memoryview],
        *,
        response: int = VIRTIO_SCSI_S_OK,
        sense: bytes = b"",
        residual: int = 0,
        written: int = 0,
    ) -> None:
        """Write the response (status GOOD, or CHECK CONDITION with ``sense``) and complete the chain."""
        status = C.CHECK_CONDITION if sense else C.GOOD
        if sense:
            self._count("check_condition")
        if response == VIRTIO_SCSI_S_FAILURE:
            self._count("failure")
        sense = sense[:VIRTIO_SCSI_SENSE_SIZE]
        body = CMD_RESP.pack(len(sense), max(residual, 0), 0, status, response) + sense
        _scatter(resp, body.ljust(CMD_RESP_SIZE, b"\0"))
        _release(views)
        _release(resp)
        _release(datain)
        req.complete(CMD_RESP_SIZE + written)

    # -- control queue ----------------------------------------------------------------------------------
    def _control(self, req: Request) -> int:
        """One controlq request; the bytes written into its response."""
        raw = _gather(req.readable, TMF_REQ.size)
        wlen = _total(req.writable)
        if len(raw) < CTRL_TYPE.size:
            log.error("controlq: request %d of %d bytes; completed with length 0", req.head, len(raw))
            return 0
        (rtype,) = CTRL_TYPE.unpack_from(raw)
        if rtype == VIRTIO_SCSI_T_TMF:
            if len(raw) < TMF_REQ.size or wlen < 1:
                log.error("controlq: TMF %d: %d bytes in, %d out; completed with length 0", req.head, len(raw), wlen)
                return 0
            _t, subtype, lun8, tag = TMF_REQ.unpack_from(raw)
            response = self._tmf(subtype, lun8, tag)
            self._count("tmf")
            return _scatter(req.writable, bytes([response]))
        if rtype in (VIRTIO_SCSI_T_AN_QUERY, VIRTIO_SCSI_T_AN_SUBSCRIBE):
            if len(raw) < AN_REQ.size or wlen < AN_RESP.size:
                log.error("controlq: AN %d: %d bytes in, %d out; completed with length 0", req.head, len(raw), wlen)
                return 0
            _t, lun8, _events = AN_REQ.unpack_from(raw)
            response = VIRTIO_SCSI_S_OK if decode_lun(lun8) is not None else VIRTIO_SCSI_S_BAD_TARGET
            self._count("an")
            return _scatter(req.writable, AN_RESP.pack(0, response))  # no event is ever reported
        log.error("controlq: request %d of unknown type %d; completed with length 0", req.head, rtype)
        return 0

    def _tmf(self, subtype: int, lun8: bytes, tag: int) -> int:
        lun = decode_lun(lun8)
        if lun is None:
            return VIRTIO_SCSI_S_BAD_TARGET
        if lun not in self.units and subtype != VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET:
            return VIRTIO_SCSI_S_INCORRECT_LUN
        log.info("TMF %d on LUN %d (tag %#x)", subtype, lun, tag)
        if subtype == VIRTIO_SCSI_T_TMF_ABORT_TASK:
            wanted = lambda t: t == (lun, tag)  # noqa: E731
        elif subtype in (
            VIRTIO_SCSI_T_TMF_ABORT_TASK_SET,
            VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET,
            VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
        ):
            wanted = lambda t: t[0] == lun  # noqa: E731
        elif subtype == VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET:
            wanted = lambda t: True  # noqa: E731
        elif subtype in (VIRTIO_SCSI_T_TMF_QUERY_TASK, VIRTIO_SCSI_T_TMF_QUERY_TASK_SET):
            one = subtype == VIRTIO_SCSI_T_TMF_QUERY_TASK
            with self.lock:
                found = any(t == (lun, tag) if one else t[0] == lun for t in self.tasks)
            return VIRTIO_SCSI_S_FUNCTION_SUCCEEDED if found else VIRTIO_SCSI_S_FUNCTION_COMPLETE
        else:  # CLEAR ACA (no ACA) and anything unknown
            return VIRTIO_SCSI_S_FUNCTION_REJECTED
        # a command in a system call cannot be cancelled: the abort or reset is done once it has finished
        deadline = time.monotonic() + TMF_WAIT
        with self.lock:
            while any(wanted(t) for t in self.tasks):
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("TMF %d on LUN %d: commands still running after %.0f s", subtype, lun, TMF_WAIT)
                    return VIRTIO_SCSI_S_FAILURE
                self.tasks_done.wait(left)
        return VIRTIO_SCSI_S_FUNCTION_COMPLETE

    # -- system calls -----------------------------------------------------------------------------------
    @staticmethod
    def _rw(call, fd: int, views: list[memoryview], offset: int) -> int:
        done, total = 0, _total(views)
        while done < total:
            n = call(fd, _skip(views, done)[:IOV_MAX], offset + done)
            if n == 0:
                raise OSError(errno.EIO, f"no progress at byte {offset + done}")
            done += n
        return done

    @staticmethod
    def _punch(unit: Unit, offset: int, length: int) -> None:
        """UNMAP: best effort (unmapped data reads as zeros here: holes, or BLKDISCARD on a zeroing device)."""
        try:
            if unit.is_blockdev:
                fcntl.ioctl(unit.fd, BLKDISCARD, struct.pack("<QQ", offset, length))
            elif libc.fallocate(unit.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
                raise OSError(errno.EIO, "fallocate")
        except OSError as e:
            log.debug("unmap %d+%d of %s: %s", offset, length, unit.path, e)

    def _write_same(self, job: _Job) -> None:
        ((offset, length),) = job.ranges
        if job.unmap and not job.unit.is_blockdev:
            if libc.fallocate(job.unit.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
                return
        chunk = job.block * max(1, (1 << 20) // len(job.block))
        done = 0
        while done < length:
            done += os.pwrite(job.unit.fd, chunk[: min(len(chunk), length - done)], offset + done)

    def _count(self, name: str, bytes_name: str | None = None, n: int = 0) -> None:
        with self.lock:
            self.counts[name] += 1
            if bytes_name:
                self.counts[bytes_name] += n

    # -- lifetime -----------------------------------------------------------------------------------------
    def stats(self) -> dict:
        with self.lock:
            return dict(self.counts)

    def close(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.close()
            self.pool = None
        for unit in self.units.values():
            if unit.fd >= 0:
                os.close(unit.fd)
                unit.fd = -1


@dataclass
class _Job:
    """A command for the I/O threads: ``kind`` on ``unit`` at byte ``offset`` with ``views`` (read/write) or
    ``ranges`` (unmap, write same)."""

    kind: str
    unit: Unit
    task: tuple[int, int]
    offset: int = 0
    views: list[memoryview] = field(default_factory=list)
    fua: bool = False
    ranges: list[tuple[int, int]] = field(default_factory=list)
    block: bytes = b""
    unmap: bool = False
