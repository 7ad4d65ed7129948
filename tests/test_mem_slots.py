"""Guest RAM shared as many memory regions (CONFIGURE_MEM_SLOTS: ADD_MEM_REG / REM_MEM_REG).

pyvhost's front-end splits its RAM in N regions (``regions=N``), rings and buffers spread over them, sent by
ADD_MEM_REG one by one: traffic stays exact with 509 regions on both metadata paths, split and packed, net and
blk.  REM_MEM_REG names a region by guest address, size and user address (docs/interop/vhost-user.rst; the mmap
offset is ignored, an fd sent along is closed unused); removing the region a ring's buffers live in stops that
ring cleanly while the other ring goes on; regions come and go while traffic runs.  (The 510th region, an
overlapping one and one never added are in test_limits.py and test_protocol.py.)
"""

from __future__ import annotations

import hashlib
import os
import random
import select
import time
from pathlib import Path

import pytest

from pyvhost import protocol as P
from pyvhost.devices.blk import BlkDevice
from pyvhost.frontend.blk import BlkFrontend
from pyvhost.frontend.net import Frontend, FrontendError
from pyvhost.protocol import SINGLE_REGION_HDR, U64, MemRegion
from pyvhost.protocol import ProtocolFeature as PF
from pyvhost.protocol import Request as R

from .conftest import assert_path, open_fds
from .devices.test_blk import server
from .test_invalidation import EXTRA, EXTRA_SIZE, Traffic, _wait_idle, finish, hammer

PATHS = ["direct", "copy"]
MiB = 1 << 20
RAM = 64 * MiB
COUNT = 20000
TIMEOUT = 60.0
RX, TX = 0, 1
NEED_REPLY = P.VHOST_USER_VERSION | P.VHOST_USER_NEED_REPLY_MASK


def ack(fe: Frontend, request: int, payload: bytes, fds: list[int] | None = None) -> int:
    """Send ``request`` asking for REPLY_ACK; the status."""
    with fe.lock:
        P.send_message(fe.sock, request, payload, fds, flags=NEED_REPLY)
        return U64.unpack(P.recv_reply(fe.sock, request).payload)[0]


def single(r: MemRegion) -> bytes:
    return SINGLE_REGION_HDR.pack(0) + r.pack()


def region_of(fe: Frontend, off: int) -> MemRegion:
    """The region holding RAM offset ``off``."""
    return fe.ram.regions()[min(off // fe.ram.region_size, fe.ram.nregions - 1)]


@pytest.mark.parametrize("metadata", PATHS)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("mode", ["sink-read", "source"])
def test_509_regions_net_traffic_exact(serve, sock_path, errors, metadata, packed, mode):
    """509 regions by ADD_MEM_REG (rings and buffers spread over several of them): every frame sent (read by
    the back-end) or received is counted once, on the path asked for."""
    srv = serve(mode, metadata)
    direction = "tx" if mode == "sink-read" else "rx"
    with Frontend(sock_path, ram_size=RAM, packed=packed, regions=P.MAX_MEM_SLOTS) as fe:
        fe.setup()
        assert fe.protocol_features & (1 << PF.CONFIGURE_MEM_SLOTS)
        assert srv.connection.mem.nregions == 509
        used = {o // fe.ram.region_size for r in fe.rings for o in (r.desc_off, r.bufs_off)}
        assert len(used) == 4  # each ring's descriptors and buffers in regions of their own
        srv.assert_path(metadata, [TX if direction == "tx" else RX])
        got = fe.run(direction, count=COUNT, timeout=TIMEOUT)
        assert got["packets"] >= COUNT
        final = fe.drain(direction)
        assert srv.connection.mem.nregions == 509
    stats = srv.ended()[-1][TX if direction == "tx" else RX]
    assert errors() == []
    assert stats["error"] == 0 and stats["packets"] == final["packets"] >= COUNT


def _block(seq: int, size: int) -> bytes:
    body = random.Random(seq).randbytes(size - 32)
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize("metadata", PATHS)
def test_509_regions_blk_data_exact(tmp_path: Path, sock_path, errors, metadata):
    """A block front-end with its RAM in 509 regions: 128 KiB writes and reads, each buffer across many region
    seams, read back checksummed."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    os.truncate(image, 16 * MiB)
    dev = BlkDevice(str(image))
    size = 128 << 10
    with server(dev, sock_path, metadata) as srv, BlkFrontend(sock_path, regions=P.MAX_MEM_SLOTS) as fe:
        fe.setup()
        assert srv.connection.mem.nregions == 509 and fe.ram.region_size < size // 4
        assert_path(srv, metadata, [0])
        for seq in range(48):
            assert fe.write(seq * size // 512, _block(seq, size)) == 0
        for seq in range(48):
            assert fe.read(seq * size // 512, size) == (0, _block(seq, size))
        assert fe.anomalies == []
    dev.close()
    assert errors() == []


def test_frontend_regions_without_mem_slots(serve, sock_path):
    """Up to 8 regions go in one SET_MEM_TABLE when CONFIGURE_MEM_SLOTS is not negotiated; more cannot."""

    class NoSlots(Frontend):
        def slots_pf(self) -> int:
            return 0

    srv = serve("sink")
    with NoSlots(sock_path, ram_size=16 * MiB, regions=8) as fe:
        fe.setup()
        assert srv.connection.mem.nregions == 8
        assert fe.run("tx", count=2000, timeout=TIMEOUT)["packets"] >= 2000
    with NoSlots(sock_path, ram_size=16 * MiB, regions=9) as fe:
        fe.negotiate()
        fe.setup_rings()
        with pytest.raises(FrontendError, match="need CONFIGURE_MEM_SLOTS"):
            fe.set_mem_table()


@pytest.mark.parametrize("metadata", PATHS)
def test_rem_mem_reg_matching_rules(serve, sock_path, errors, metadata):
    """REM_MEM_REG removes the region with that guest address, size and user address, whatever the mmap offset
    says; a region differing in any of the three is not removed (refused, nothing changes, traffic goes on); an
    fd sent along (older front-ends did) is closed unused."""
    srv = serve("sink", metadata)
    with Frontend(sock_path, ram_size=16 * MiB, regions=16) as fe:
        fe.setup()
        conn = srv.connection
        victim = fe.ram.regions()[-1]  # no ring lives there (the allocator used the first regions)
        assert all(o // fe.ram.region_size < 15 for r in fe.rings for o in (r.desc_off, r.bufs_off))
        g, n, u, o = victim.guest_phys_addr, victim.memory_size, victim.userspace_addr, victim.mmap_offset
        for bad in (MemRegion(g + 4096, n, u, o), MemRegion(g, n - 4096, u, o), MemRegion(g, n, u + 4096, o)):
            assert ack(fe, R.REM_MEM_REG, single(bad)) != 0
            assert conn.mem.nregions == 16
        assert len(errors()) == 3 and all("REM_MEM_REG: no region" in e for e in errors())
        fds0 = open_fds()
        extra = os.dup(fe.ram.fd)
        try:
            assert ack(fe, R.REM_MEM_REG, single(MemRegion(g, n, u, o + 12345 * 4096)), [extra]) == 0
        finally:
            os.close(extra)
        assert conn.mem.nregions == 15 and open_fds() == fds0  # the fd sent along was closed
        assert ack(fe, R.REM_MEM_REG, single(victim)) != 0  # gone already
        assert ack(fe, R.ADD_MEM_REG, single(victim), [fe.ram.fd]) == 0
        assert conn.mem.nregions == 16
        assert fe.run("tx", count=2000, timeout=TIMEOUT)["packets"] >= 2000
        final = fe.drain("tx")
    stats = srv.ended()[-1][TX]
    assert stats["error"] == 0 and stats["packets"] == final["packets"]


@pytest.mark.parametrize("metadata", PATHS)
def test_removing_the_region_of_a_rings_buffers_stops_that_ring_only(serve, sock_path, errors, metadata):
    """While TX runs, the region holding the TX ring's buffers (not its ring parts) goes: the TX queue stops
    cleanly (its next chain cannot be translated: broken, logged once, ERR signalled), never a crash or an
    access elsewhere; the RX ring is untouched; the counts stay exact."""
    srv = serve("sink", metadata)
    fe = Frontend(sock_path, ram_size=16 * MiB, regions=8)
    fe.setup()
    err_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    fe.command(R.SET_VRING_ERR, U64.pack(TX), [err_fd])
    tx = fe.rings[TX]
    assert region_of(fe, tx.bufs_off) != region_of(fe, tx.desc_off)
    traffic = Traffic(fe, seconds=3.0)
    traffic.wait_progress(0)
    fe.command(R.REM_MEM_REG, single(region_of(fe, tx.bufs_off)))
    conn = srv.connection
    deadline = time.monotonic() + TIMEOUT
    while not conn.vrings[TX].broken and time.monotonic() < deadline:
        time.sleep(0.01)
    assert conn.vrings[TX].broken
    # the ERR eventfd is written as the ring breaks, not necessarily before ``broken`` reads true here
    assert select.select([err_fd], [], [], 10)[0], "no ERR signal within 10 s of the ring breaking"
    assert os.eventfd_read(err_fd) == 1
    os.close(err_fd)
    msgs = errors()
    assert len(msgs) == 1 and f"vring {TX} broken: BAD_ADDRESS" in msgs[0], msgs
    assert not conn.vrings[RX].broken
    gone = _wait_idle(traffic)
    done, stats = finish(fe, traffic, srv)
    assert done == gone == stats["packets"] == stats["chains"] and stats["error"] != 0
    assert len(errors()) == 1


@pytest.mark.parametrize("metadata", PATHS)
def test_regions_come_and_go_while_traffic_runs(serve, sock_path, errors, metadata):
    """64 regions; while TX runs, an extra region and one of the 64 no ring uses are removed and added again
    and again (each change quiesces the workers, rebinds them): traffic goes on after each, exact at the end."""
    srv = serve("sink", metadata)
    fe = Frontend(sock_path, ram_size=RAM, regions=64)
    fe.setup()
    spare = fe.ram.regions()[40]
    extra_fd = os.memfd_create("pyvhost-extra", os.MFD_CLOEXEC)
    os.ftruncate(extra_fd, EXTRA_SIZE)
    try:
        traffic = Traffic(fe, seconds=4.0)
        traffic.wait_progress(0)
        changes = hammer(
            traffic,
            [
                lambda: fe.command(R.ADD_MEM_REG, single(EXTRA), [extra_fd]),
                lambda: fe.command(R.REM_MEM_REG, single(spare)),
                lambda: fe.command(R.REM_MEM_REG, single(EXTRA)),
                lambda: fe.command(R.ADD_MEM_REG, single(spare), [fe.ram.fd]),
            ],
            seconds=3.0,
        )
        assert changes >= 8
        assert srv.connection.mem.nregions in (63, 64, 65)
        done, stats = finish(fe, traffic, srv)
    finally:
        os.close(extra_fd)
    assert errors() == []
    assert done > changes and stats["error"] == 0
    assert done == stats["packets"] == stats["chains"]


def test_max_slots_handshake(serve, sock_path):
    """A front-end asking for more regions than GET_MAX_MEM_SLOTS gives is told so before anything is sent."""
    serve("sink")
    fe = Frontend(sock_path, ram_size=16 * MiB, regions=P.MAX_MEM_SLOTS + 1)
    try:
        fe.negotiate()
        with pytest.raises(FrontendError, match="510 regions, the back-end takes 509"):
            fe.set_mem_table()
    finally:
        fe.close(stop_rings=False)
