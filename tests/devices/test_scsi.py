"""virtio-scsi byte for byte, without a VM: a small driver for the test builds each chain as guest buffers
(``virtio_scsi_cmd_req`` + data-out readable, ``virtio_scsi_cmd_resp`` + data-in writable), hands it to the
device as the queue's worker does (``submit``), and checks every byte written back -- and that malformed chains
(short headers, bad LUNs, data in the wrong direction, no room for a response) get the spec's answer and nothing
is written outside the chain's writable buffers."""

from __future__ import annotations

import os
import select
import struct
from pathlib import Path

import pytest

from pyvhost import protocol as P
from pyvhost.devices import scsi as S
from pyvhost.devices import scsi_cdb as C
from pyvhost.devices.chain_device import Request, _Completions
from pyvhost.frontend.scsi import ScsiFrontend, rw16
from pyvhost.protocol import Request as R

from .test_blk import server

MiB = 1 << 20
BLOCKS = (4 * MiB) // 512
GUARD = 64  # bytes past each writable buffer that must stay untouched


def lun_field(lun: int, target: int = 0, first: int = 1) -> bytes:
    return bytes([first, target, 0x40 | (lun >> 8), lun & 0xFF]) + bytes(4)


class Driver:
    """Builds chains for one ScsiDevice and collects what the device completes."""

    def __init__(self, dev: S.ScsiDevice) -> None:
        self.dev = dev
        self.sink = _Completions()
        self.head = 0

    def chain(self, queue: int, readable: list[bytes], writable: list[int]) -> tuple[int, list[bytes]]:
        """Submit a chain; (used length, each writable buffer's bytes), checking nothing past them changed."""
        wbufs = [bytearray(b"\xee" * (n + GUARD)) for n in writable]
        rviews = [memoryview(bytearray(b)) for b in readable]
        wviews = [memoryview(b)[:n] for b, n in zip(wbufs, writable)]
        self.head += 1
        req = Request(queue, self.head, rviews, wviews, self.sink, sum(writable))
        self.dev.submit(req)
        assert req.done
        head, n, _rows = self.sink.items.popleft()
        assert head == self.head and not self.sink.items
        for b, k in zip(wbufs, writable):
            assert b[k:] == b"\xee" * GUARD, "written past a writable buffer"
        return n, [bytes(b[:k]) for b, k in zip(wbufs, writable)]

    def cmd(
        self, cdb: bytes, lun: bytes | int = 0, dataout: bytes = b"", datain: int = 0, header: bytes | None = None
    ) -> tuple[int, dict, bytes]:
        """One command: (used length, response fields, data-in)."""
        lun8 = lun_field(lun) if isinstance(lun, int) else lun
        hdr = header if header is not None else S.CMD_REQ.pack(lun8, 7, 0, 0, 0) + cdb.ljust(32, b"\0")
        readable = [hdr] + ([dataout] if dataout else [])
        writable = [S.CMD_RESP_SIZE] + ([datain] if datain else [])
        n, out = self.chain(S.REQUESTQ, readable, writable)
        sense_len, residual, _q, status, response = S.CMD_RESP.unpack_from(out[0])
        resp = {
            "sense_len": sense_len,
            "residual": residual,
            "status": status,
            "response": response,
            "sense": out[0][S.CMD_RESP.size : S.CMD_RESP.size + sense_len],
        }
        return n, resp, out[1] if datain else b""

    def close(self) -> None:
        self.sink.close()


def check_sense(resp: dict, key: int, asc: tuple[int, int]) -> None:
    assert resp["response"] == S.VIRTIO_SCSI_S_OK and resp["status"] == C.CHECK_CONDITION, resp
    assert resp["sense_len"] == 18 and resp["sense"] == C.fixed_sense(key, asc), resp
    assert resp["sense"][0] == 0x70 and resp["sense"][2] == key and resp["sense"][12:14] == bytes(asc)


@pytest.fixture
def images(tmp_path: Path) -> dict[int, str]:
    out = {}
    for lun, size in ((0, 4 * MiB), (1, 2 * MiB)):
        p = tmp_path / f"lun{lun}.img"
        with open(p, "wb") as f:
            f.truncate(size)
        out[lun] = str(p)
    return out


@pytest.fixture
def drv(images):
    # no I/O threads: each command completes inside submit() (the threads are exercised by the VM test)
    dev = S.ScsiDevice(images, io_threads=0, nowait=False)
    d = Driver(dev)
    yield d
    d.close()
    dev.close()


def test_inquiry_standard_and_vpd(drv):
    n, r, data = drv.cmd(bytes([C.INQUIRY, 0, 0, 0, 96, 0]), datain=96)
    assert r["status"] == C.GOOD and r["response"] == 0 and r["sense_len"] == 0
    assert data[:8] == bytes([0, 0, 6, 0x12, 31, 0, 0, 2]) and data[8:36] == C.VENDOR + C.PRODUCT + C.REVISION
    assert r["residual"] == 96 - 36 and n == S.CMD_RESP_SIZE + 36
    _, r, data = drv.cmd(bytes([C.INQUIRY, 1, 0, 0, 64, 0]), datain=64)
    assert data[:4] == bytes([0, 0, 0, 6]) and data[4:10] == bytes([0, 0x80, 0x83, 0xB0, 0xB1, 0xB2])
    _, r, data = drv.cmd(bytes([C.INQUIRY, 1, 0x80, 0, 64, 0]), datain=64)
    assert data[1] == 0x80 and data[4 : 4 + data[3]] == b"lun0.img"
    _, r, data = drv.cmd(bytes([C.INQUIRY, 1, 0x83, 0, 64, 0]), datain=64)
    assert data[4:8] == bytes([2, 1, 0, 16]) and data[8:24] == C.VENDOR + b"lun0.img"
    _, r, data = drv.cmd(bytes([C.INQUIRY, 1, 0xB0, 0, 64, 0]), datain=64)
    assert data[:4] == bytes([0, 0xB0, 0, 0x3C]) and struct.unpack_from(">I", data, 8)[0] == 0xFFFF
    assert struct.unpack_from(">II", data, 20) == (C.UnitInfo(1).max_unmap_blocks, 32)
    _, r, data = drv.cmd(bytes([C.INQUIRY, 1, 0xB1, 0, 64, 0]), datain=64)
    assert data[1] == 0xB1 and data[4:6] == b"\x00\x01"
    _, r, data = drv.cmd(bytes([C.INQUIRY, 1, 0xB2, 0, 8, 0]), datain=8)
    assert data == bytes([0, 0xB2, 0, 4, 0, 0xE0, 2, 0])
    _, r, _ = drv.cmd(bytes([C.INQUIRY, 1, 0x99, 0, 64, 0]), datain=64)
    check_sense(r, C.ILLEGAL_REQUEST, C.ASC_INVALID_FIELD_IN_CDB)
    _, r, data = drv.cmd(bytes([C.INQUIRY, 0, 0, 0, 36, 0]), lun=5, datain=36)  # no unit at LUN 5
    assert r["status"] == C.GOOD and data[0] == 0x7F


def test_capacity_mode_sense_report_luns(drv):
    _, r, data = drv.cmd(bytes([C.READ_CAPACITY_10]) + bytes(9), datain=8)
    assert data == struct.pack(">II", BLOCKS - 1, 512)
    cdb = bytes([C.SERVICE_ACTION_IN_16, C.SAI_READ_CAPACITY_16]) + bytes(8) + struct.pack(">I", 32) + bytes(2)
    _, r, data = drv.cmd(cdb, lun=1, datain=32)
    assert data[:12] == struct.pack(">QI", 2 * MiB // 512 - 1, 512) and data[14] == 0xC0
    _, r, data = drv.cmd(bytes([C.MODE_SENSE_6, 0, 0x08, 0, 64, 0]), datain=64)
    assert data[:4] == bytes([31, 0, 0x10, 8]) and data[12:14] == bytes([0x08, 18]) and data[14] & 0x04
    _, r, _ = drv.cmd(bytes([C.MODE_SENSE_10, 0, 0xC8, 0, 0, 0, 0, 0, 64, 0]), datain=64)
    check_sense(r, C.ILLEGAL_REQUEST, C.ASC_SAVING_PARAMETERS_NOT_SUPPORTED)
    _, r, data = drv.cmd(bytes([C.REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), datain=256)
    assert data[:24] == struct.pack(">I4x", 16) + bytes([0, 0]) + bytes(6) + bytes([0, 1]) + bytes(6)


def test_write_read_and_errors(drv, images):
    payload = os.urandom(8 * 512)
    wcdb = bytes([C.WRITE_10, 0]) + struct.pack(">I", 100) + bytes([0]) + struct.pack(">H", 8) + bytes([0])
    n, r, _ = drv.cmd(wcdb, dataout=payload)
    assert r["status"] == C.GOOD and r["response"] == 0 and n == S.CMD_RESP_SIZE
    with open(images[0], "rb") as f:
        f.seek(100 * 512)
        assert f.read(len(payload)) == payload
    rcdb = bytes([C.READ_16, 0]) + struct.pack(">Q", 100) + struct.pack(">I", 8) + bytes(2)
    n, r, data = drv.cmd(rcdb, datain=8 * 512 + 100)
    assert data[: len(payload)] == payload and r["residual"] == 100 and n == S.CMD_RESP_SIZE + len(payload)
    # past the end: LBA OUT OF RANGE
    _, r, _ = drv.cmd(bytes([C.READ_16, 0]) + struct.pack(">QI", BLOCKS - 1, 2) + bytes(2), datain=1024)
    check_sense(r, C.ILLEGAL_REQUEST, C.ASC_LBA_OUT_OF_RANGE)
    # unknown operation codes
    for op in (0x3B, 0xC0, 0x60):
        _, r, _ = drv.cmd(bytes([op]) + bytes(15))
        check_sense(r, C.ILLEGAL_REQUEST, C.ASC_INVALID_COMMAND_OPERATION_CODE)
    # an absent LUN, another target, a LUN field not in virtio's format
    _, r, _ = drv.cmd(bytes(6), lun=9)
    check_sense(r, C.ILLEGAL_REQUEST, C.ASC_LOGICAL_UNIT_NOT_SUPPORTED)
    for lun8 in (lun_field(0, target=1), lun_field(0, first=0)):
        _, r, _ = drv.cmd(bytes(6), lun=lun8)
        assert r["response"] == S.VIRTIO_SCSI_S_BAD_TARGET and r["sense_len"] == 0
    # data in the wrong direction: a READ with data-out only, a WRITE with data-in only
    _, r, _ = drv.cmd(rcdb, dataout=bytes(4096))
    assert r["response"] == S.VIRTIO_SCSI_S_OVERRUN
    _, r, _ = drv.cmd(wcdb, datain=4096)
    assert r["response"] == S.VIRTIO_SCSI_S_OVERRUN
    # a short header
    _, r, _ = drv.cmd(b"", header=lun_field(0) + bytes(10))
    assert r["response"] == S.VIRTIO_SCSI_S_FAILURE
    # no room for the response: nothing written, used length 0
    n, out = drv.chain(S.REQUESTQ, [S.CMD_REQ.pack(lun_field(0), 1, 0, 0, 0) + bytes(32)], [50])
    assert n == 0 and out == [b"\xee" * 50]
    assert drv.dev.stats()["failure"] >= 2


def test_unmap_and_sync(drv, images):
    with open(images[0], "r+b") as f:
        f.write(os.urandom(MiB))
        f.flush()
    params = struct.pack(">HH4x", 6 + 16, 16) + C.UNMAP_DESCRIPTOR.pack(0, MiB // 512)
    _, r, _ = drv.cmd(bytes([C.UNMAP, 0, 0, 0, 0, 0, 0]) + struct.pack(">H", len(params)) + bytes(1), dataout=params)
    assert r["status"] == C.GOOD
    with open(images[0], "rb") as f:
        assert f.read(MiB) == bytes(MiB)
    bad = struct.pack(">HH4x", 22, 16) + C.UNMAP_DESCRIPTOR.pack(BLOCKS, 1)
    _, r, _ = drv.cmd(bytes([C.UNMAP]) + bytes(6) + struct.pack(">H", len(bad)) + bytes(1), dataout=bad)
    check_sense(r, C.ILLEGAL_REQUEST, C.ASC_LBA_OUT_OF_RANGE)
    _, r, _ = drv.cmd(bytes([C.SYNCHRONIZE_CACHE_10]) + bytes(9))
    assert r["status"] == C.GOOD and drv.dev.stats()["sync"] == 1


def test_readonly(images):
    dev = S.ScsiDevice(images, readonly=True, io_threads=0)
    d = Driver(dev)
    try:
        cdb = bytes([C.WRITE_10, 0, 0, 0, 0, 0, 0, 0, 1, 0])
        _, r, _ = d.cmd(cdb, dataout=bytes(512))
        check_sense(r, C.DATA_PROTECT, C.ASC_WRITE_PROTECTED)
        _, r, data = d.cmd(bytes([C.MODE_SENSE_6, 0x08, 0x3F, 0, 64, 0]), datain=64)
        assert data[2] & 0x80  # WP
    finally:
        d.close()
        dev.close()


def test_controlq(drv):
    def tmf(subtype: int, lun8: bytes) -> tuple[int, bytes]:
        n, out = drv.chain(S.CONTROLQ, [S.TMF_REQ.pack(S.VIRTIO_SCSI_T_TMF, subtype, lun8, 1)], [1])
        return n, out[0]

    assert tmf(S.VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, lun_field(0)) == (1, b"\x00")
    assert tmf(S.VIRTIO_SCSI_T_TMF_ABORT_TASK, lun_field(1)) == (1, b"\x00")
    assert tmf(S.VIRTIO_SCSI_T_TMF_QUERY_TASK, lun_field(0)) == (1, b"\x00")
    assert tmf(S.VIRTIO_SCSI_T_TMF_CLEAR_ACA, lun_field(0)) == (1, bytes([S.VIRTIO_SCSI_S_FUNCTION_REJECTED]))
    assert tmf(99, lun_field(0)) == (1, bytes([S.VIRTIO_SCSI_S_FUNCTION_REJECTED]))
    assert tmf(S.VIRTIO_SCSI_T_TMF_ABORT_TASK, lun_field(0, target=3)) == (1, bytes([S.VIRTIO_SCSI_S_BAD_TARGET]))
    assert tmf(S.VIRTIO_SCSI_T_TMF_ABORT_TASK, lun_field(7)) == (1, bytes([S.VIRTIO_SCSI_S_INCORRECT_LUN]))
    n, out = drv.chain(S.CONTROLQ, [S.AN_REQ.pack(S.VIRTIO_SCSI_T_AN_QUERY, lun_field(0), 0xFF)], [5])
    assert (n, out[0]) == (5, S.AN_RESP.pack(0, 0))
    # unknown type, short request: length 0, nothing written
    assert drv.chain(S.CONTROLQ, [struct.pack("<I", 9) + bytes(20)], [8]) == (0, [b"\xee" * 8])
    assert drv.chain(S.CONTROLQ, [b"\x00\x00"], [1]) == (0, [b"\xee"])


def test_config():
    assert S.CONFIG.size == 36


@pytest.mark.parametrize("metadata", ["direct", "copy"])
def test_frontend_over_the_ring(images, tmp_path, metadata):
    """pyvhost's SCSI front-end against the served device, through the request queue (I/O threads, RWF_NOWAIT):
    the capacity it reads, writes read back and found in the image, a batch in flight at once, a bad LBA."""
    dev = S.ScsiDevice(images)
    sock = str(tmp_path / "scsi.sock")
    try:
        with server(dev, sock, metadata), ScsiFrontend(sock, queue_size=64, max_io=64 << 10) as fe:
            fe.setup()
            assert (fe.blocks, fe.block_size) == (BLOCKS, 512) and fe.config["num_queues"] == 1
            data = os.urandom(64 << 10)
            c, _ = fe.command_io(rw16(True, 100, len(data) // 512), data=data)
            assert c.ok and c.residual == 0 and not c.sense, c
            c, got = fe.command_io(rw16(False, 100, len(data) // 512), datain=len(data))
            assert c.ok and got == data and c.length == S.CMD_RESP_SIZE + len(data), c
            with open(images[0], "rb") as f:
                f.seek(100 * 512)
                assert f.read(len(data)) == data
            fe.fill_slots(data)
            slots = [fe.post_rw(k % 2 == 0, 8 * k, 4096, publish=False) for k in range(fe.queue.slots)]
            fe.publish()
            done = []
            while len(done) < len(slots):
                done += fe.wait()
            assert sorted(c.slot for c in done) == sorted(slots) and all(c.ok for c in done), done
            c, _ = fe.command_io(rw16(False, BLOCKS, 1), datain=512)
            assert c.response == S.VIRTIO_SCSI_S_OK and c.status == C.CHECK_CONDITION, c
            assert c.sense == C.fixed_sense(C.ILLEGAL_REQUEST, C.ASC_LBA_OUT_OF_RANGE), c
            assert not fe.anomalies, fe.anomalies
    finally:
        dev.close()


class LateCallFrontend(ScsiFrontend):
    """QEMU's order: a ring is kicked and enabled before its call fd comes (SET_VRING_CALL without waiting for
    replies), and the guest goes on meanwhile."""

    def start_ring(self, ring, base=None) -> None:
        i = ring.index
        self.command(R.SET_VRING_NUM, P.VRING_STATE.pack(i, ring.size))
        self.command(R.SET_VRING_BASE, P.VRING_STATE.pack(i, 0))
        self.set_vring_addr(ring)
        self.command(R.SET_VRING_KICK, P.U64.pack(i), [ring.kick_fd])
        self.command(R.SET_VRING_ENABLE, P.VRING_STATE.pack(i, 1))


def readable(fd: int, timeout: float) -> bool:
    if not select.select([fd], [], [], timeout)[0]:
        return False
    os.eventfd_read(fd)
    return True


def test_completion_before_the_call_fd_is_signalled_when_it_comes(images, tmp_path):
    """A command completed while the ring had no call fd (setup's READ CAPACITY, taken by polling the used ring
    here) is signalled on the call fd SET_VRING_CALL brings -- once: Linux's virtio_scsi, whose first INQUIRY
    raced QEMU's late SET_VRING_CALL, waited for that interrupt forever.  A call fd with nothing missed gets
    nothing; later completions are signalled as usual."""
    dev = S.ScsiDevice(images)
    sock = str(tmp_path / "scsi.sock")
    try:
        with server(dev, sock), LateCallFrontend(sock, queue_size=64, max_io=4096) as fe:
            fe.setup()
            (ring,) = fe.rings
            assert not readable(ring.call_fd, 0.2)
            fe.command(R.SET_VRING_CALL, P.U64.pack(ring.index), [ring.call_fd])
            assert readable(ring.call_fd, 5.0), "the completion published without a call fd was not signalled"
            fe.command(R.SET_VRING_CALL, P.U64.pack(ring.index), [ring.call_fd])
            assert not readable(ring.call_fd, 0.2), "a call fd with no completion missed was signalled"
            fe.post(bytes(6), tag="tur")  # TEST UNIT READY
            assert readable(ring.call_fd, 5.0)
            assert [(c.tag, c.ok) for c in fe.reap()] == [("tur", True)]
    finally:
        dev.close()
