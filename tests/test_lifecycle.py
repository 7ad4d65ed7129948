"""The datapath lifecycle: every way a worker ends drains it, waits on the control plane are bounded, a ring
that is started but disabled is processed without side effects, features change at a quiescent point, and
counters survive a ring restart.

A stale view is made observable: guest memory is remapped twice, to *different* memfds of the same size; the
second lands where the first table was (the arena places first fit, and a new table is mapped before the old
one is unmapped), so a write through a view that outlived its mapping lands in that memory and shows up there
as a pattern.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np
import pytest

from pyvhost import protocol as P
from pyvhost.devices.base import Device, Ring, Step, StepFn
from pyvhost.devices.chain_device import ChainDevice, Request
from pyvhost.frontend.net import Frontend
from pyvhost.frontend.ram import BUF_SIZE, GuestRam
from pyvhost.frontend.split import D_LIMIT, drive_rx
from pyvhost.protocol import Request as R
from pyvhost.ring.split import VRING_DESC_F_WRITE
from pyvhost.ring.state import Q_HDR_LEN
from tests.devices.test_tap import frame, ns, vnet_hdr  # noqa: F401 (ns is a fixture)
from tests.devices.test_tap import tap as tap  # the fixture the tests below take

#: a short stop timeout keeps the tests quick (the default is STOP_TIMEOUT)
STOP = 3.0
RAM = 16 << 20
TIMEOUT = 20.0
PATTERN = 0xAB


def wait_for(cond, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def post_writable(fe: Frontend, count: int) -> None:
    """``count`` one-buffer device-writable chains on ring 0 (heads 0..count-1), then a kick."""
    ring = fe.rings[0]
    for i in range(count):
        ring.desc[2 * i] = ring.buf_gpa(i)
        ring.desc[2 * i + 1] = BUF_SIZE | (VRING_DESC_F_WRITE << 32)
        ring.avail[2 + i] = i
    ring.avail[1] = count
    os.eventfd_write(ring.kick_fd, 1)


def remap(fe: Frontend, *rams: GuestRam) -> None:
    """SET_MEM_TABLE with each of ``rams`` in turn as the only region (the rings stay in the old memory)."""
    for ram in rams:
        fe.command(R.SET_MEM_TABLE, P.MEM_TABLE_HDR.pack(1, 0) + ram.region().pack(), [ram.fd])


def count_pattern(ram: GuestRam) -> int:
    return int(np.count_nonzero(ram.buf == PATTERN))


def answers(fe: Frontend) -> bool:
    """The control plane still answers: GET_FEATURES comes back with the features offered."""
    return P.U64.unpack(fe.request(R.GET_FEATURES))[0] & (1 << 32) != 0


class Holding(ChainDevice):
    """Keeps every request until the test (its "I/O thread") finishes them; its step raises when told to."""

    num_queues = 1

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.explode = threading.Event()

    def submit(self, req: Request) -> None:
        self.requests.append(req)

    def finish_all(self) -> None:
        """Write the pattern into each request's buffers and complete it (what an I/O thread does late)."""
        for req in self.requests:
            for v in req.writable:
                v[:] = bytes([PATTERN]) * len(v)
            req.complete(sum(len(v) for v in req.writable))

    def make_step(self, rings: list[Ring]) -> StepFn:
        inner = super().make_step(rings)

        def step(budget: int) -> int:
            if self.explode.is_set():
                raise RuntimeError("injected failure")
            return inner(budget)

        step.drain = inner.drain  # type: ignore[attr-defined]
        step.held = inner.held  # type: ignore[attr-defined]
        return step


class Hung(Device):
    """A step that never returns until released (a device bug): it ignores Q_STOP."""

    num_queues = 1

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def make_step(self, rings: list[Ring]) -> StepFn:
        def step(budget: int) -> int:
            self.entered.set()
            self.release.wait()
            return Step.STOPPED

        return step


@pytest.fixture
def server(serve):
    """``server(device=None, mode="sink", **kw)``: an in-process server whose stop timeout is STOP."""

    def start(device=None, mode: str = "sink", **kw):
        srv = serve(mode, "direct", device=device, **kw)
        srv.server.stop_timeout = STOP
        return srv

    return start


def frontend(sock_path: str, **kw) -> Frontend:
    fe = Frontend(sock_path, ram_size=RAM, **kw)
    fe.sock.settimeout(TIMEOUT)  # a control plane that stops answering fails the test instead of hanging it
    return fe


# =========================================================================================================
# item 3: every exit of a worker drains
@pytest.mark.parametrize("late", [False, True], ids=["finished_in_the_drain", "finished_after_the_remap"])
def test_failing_step_drains_its_requests_before_memory_is_remapped(server, sock_path, errors, late):
    """The step raises while the device holds four requests.  The worker still drains: requests finished
    within the bound are published; requests finished later (after a SET_MEM_TABLE to other memory) write
    into the old memory, which stayed mapped -- never into the new memory placed where it was."""
    dev = Holding()
    srv = server(dev)
    fe = frontend(sock_path, num_queues=1)
    ram2, ram3 = GuestRam(RAM), GuestRam(RAM)
    try:
        fe.setup()
        post_writable(fe, 4)
        wait_for(lambda: len(dev.requests) == 4, "the device to hold 4 requests")
        dev.explode.set()
        os.eventfd_write(fe.rings[0].kick_fd, 1)
        wait_for(lambda: any("worker pyvhost-q0 failed" in m for m in errors()), "the worker's failure")
        if not late:
            dev.finish_all()  # while the worker drains: published
            wait_for(lambda: int(fe.rings[0].used16[1]) == 4, "the 4 completions")
            assert [int(x) for x in fe.rings[0].used32[2:10:2]] == [BUF_SIZE] * 4
        vr = srv.connection.vrings[0]
        wait_for(lambda: vr.broken, "the queue to be broken")
        remap(fe, ram2, ram3)
        assert answers(fe)
        if late:
            dev.finish_all()  # the device's I/O finishes after the memory changes
        assert count_pattern(ram2) == count_pattern(ram3) == 0  # nothing through a stale view
        assert count_pattern(fe.ram) == 4 * BUF_SIZE  # written where the requests pointed
        msgs = errors()
        assert any("vring 0 broken: its worker failed (RuntimeError: injected failure)" in m for m in msgs)
        if late:
            assert any("head(s) 0 1 2 3" in m for m in msgs)
            assert any("replaced region(s) left mapped" in m for m in msgs)
            assert srv.connection.kept  # the old region waits for the requests
            remap(fe, fe.ram)  # the next change, once they completed, unmaps it
            assert not srv.connection.kept and not srv.connection.stuck
        else:
            assert not srv.connection.kept and not srv.connection.stuck
    finally:
        fe.close()
        ram2.close()
        ram3.close()
    assert srv.ended()


def test_kick_fd_read_error_breaks_the_queue_and_memory_changes_go_on(server, sock_path, errors):
    """The kick fd's number comes to name something that fails to read (here a directory): the worker stops
    with the queue broken and the reason logged; the connection answers and remaps memory."""
    srv = server()
    fe = frontend(sock_path)
    ram2 = GuestRam(RAM)
    dirfd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fe.setup()
        assert fe.run("tx", count=500)["packets"] == 500
        vr = srv.connection.vrings[1]
        os.dup2(dirfd, vr.kick_fd)  # select() says readable, read() fails with EISDIR
        wait_for(lambda: vr.broken, "the queue to be broken")
        assert any("vring 1 broken: reading its kick fd failed" in m for m in errors())
        assert answers(fe)
        remap(fe, ram2)
        assert not srv.connection.kept and not srv.connection.stuck  # nothing held: unmapped at once
        assert P.VRING_STATE.unpack(fe.request(R.GET_VRING_BASE, P.VRING_STATE.pack(1, 0)))[1] == 500
        fe.rings[1].stopped = True
    finally:
        os.close(dirfd)
        fe.close()
        ram2.close()
    assert srv.ended()[-1][1]["packets"] == 500


# =========================================================================================================
# item 4: bounded waits on the control plane
def test_request_that_never_completes_breaks_only_its_queue(server, sock_path, errors):
    """GET_VRING_BASE with two requests that never complete: answered after the bound, the queue broken (ERR
    signalled), the stuck heads logged; the memory they point into stays mapped across SET_MEM_TABLE until
    they complete, and is unmapped at the next change after that."""
    dev = Holding()
    srv = server(dev)
    fe = frontend(sock_path, num_queues=1)
    ram2, ram3 = GuestRam(RAM), GuestRam(RAM)
    err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        fe.setup()
        fe.command(R.SET_VRING_ERR, P.U64.pack(0), [err])
        post_writable(fe, 2)
        wait_for(lambda: len(dev.requests) == 2, "the device to hold 2 requests")
        _, base = P.VRING_STATE.unpack(fe.request(R.GET_VRING_BASE, P.VRING_STATE.pack(0, 0)))
        fe.rings[0].stopped = True
        assert base == 2
        assert answers(fe)
        conn = srv.connection
        assert conn.vrings[0].broken and conn.stuck
        assert os.eventfd_read(err) >= 1
        msgs = errors()
        assert any("queue 0, head(s) 0 1" in m and "the queue is broken" in m for m in msgs), msgs
        remap(fe, ram2, ram3)
        assert conn.kept and answers(fe)
        dev.finish_all()  # long after: into the old memory, still mapped
        assert count_pattern(ram2) == count_pattern(ram3) == 0 and count_pattern(fe.ram) == 2 * BUF_SIZE
        assert int(fe.rings[0].used16[1]) == 0  # a stopped ring gets no completion
        remap(fe, fe.ram)
        assert not conn.kept and not conn.stuck
    finally:
        os.close(err)
        fe.close()
        ram2.close()
        ram3.close()
    assert srv.ended()


def test_worker_that_never_returns_keeps_memory_mapped(server, sock_path, errors):
    """A step that never returns (a device bug): GET_VRING_BASE is answered after the bound, the worker is
    logged as not stopping, memory is not unmapped under it -- not at SET_MEM_TABLE, not at disconnect."""
    dev = Hung()
    srv = server(dev)
    fe = frontend(sock_path, num_queues=1)
    ram2 = GuestRam(RAM)
    closed = False
    try:
        fe.setup()
        assert dev.entered.wait(TIMEOUT)
        fe.request(R.GET_VRING_BASE, P.VRING_STATE.pack(0, 0))
        fe.rings[0].stopped = True
        assert answers(fe)
        conn = srv.connection
        assert conn.vrings[0].broken
        assert any("its worker did not stop within" in m for m in errors())
        remap(fe, ram2)
        assert conn.kept
        fe.close()
        closed = True
        wait_for(lambda: srv.connection is None, "the connection to end")
        assert any("guest memory left mapped" in m for m in errors())
        assert conn.kept_memory  # still held for the hung worker
    finally:
        dev.release.set()
        if not closed:
            fe.close()
        ram2.close()


# =========================================================================================================
# item 5: features, disabled rings, counters
def test_disabled_tx_ring_is_processed_and_discarded(server, sock_path):
    """vhost-user "Ring states": a started but disabled TX ring is processed and its frames discarded (counted
    as drops); enabled again, frames count as transmitted."""
    srv = server()
    fe = frontend(sock_path)
    try:
        fe.setup()
        assert fe.run("tx", count=1000)["packets"] == 1000
        fe.command(R.SET_VRING_ENABLE, P.VRING_STATE.pack(1, 0))
        assert fe.run("tx", count=700)["packets"] == 700  # completed: the ring is processed
        stats = srv.connection.stats()[1]
        assert (stats["packets"], stats["drops"], stats["chains"]) == (1000, 700, 1700)
        assert 1 in srv.connection.discarding and (1,) not in srv.connection.workers
        fe.command(R.SET_VRING_ENABLE, P.VRING_STATE.pack(1, 1))
        assert fe.run("tx", count=300)["packets"] == 300
        assert fe.drain("tx")["packets"] == 2000
    finally:
        fe.close()
    stats = srv.ended()[-1][1]
    assert (stats["packets"], stats["drops"], stats["chains"], stats["error"]) == (1300, 700, 2000, 0)


def test_disabled_rx_ring_gets_no_packets(server, sock_path):
    """A disabled RX ring is given nothing (no worker runs on it); enabled, it fills."""
    srv = server(mode="source", count=500)
    fe = frontend(sock_path)
    try:
        fe.setup()
        fe.command(R.SET_VRING_ENABLE, P.VRING_STATE.pack(0, 0))
        conn = srv.connection
        assert (0,) not in conn.workers and not conn.discarding  # (the source's TX queue has its sink)
        ring = fe.rings[0]
        drive_rx(*ring.views(), ring.buf_gpa(0), 1)  # post a batch of buffers and kick
        assert int(fe.rings[0].used16[1]) == 0 and conn.stats()[0]["packets"] == 0
        fe.command(R.SET_VRING_ENABLE, P.VRING_STATE.pack(0, 1))
        assert fe.run("rx", count=500)["packets"] == 500
    finally:
        fe.close()
    assert srv.ended()[-1][0]["packets"] == 500


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_counters_are_cumulative_over_a_ring_restart(server, sock_path, packed):
    srv = server()
    fe = frontend(sock_path, packed=packed)
    try:
        fe.setup()
        ring = fe.rings[1]
        assert fe.run("tx", count=1000)["packets"] == 1000
        base = fe.drain("tx")["base"]
        assert srv.connection.stats()[1]["packets"] == 1000  # stopped: still counted
        ring.d[D_LIMIT] = -1
        ring.stopped = False
        fe.start_ring(ring, base)
        assert fe.run("tx", count=500)["packets"] == 500
        assert fe.drain("tx")["packets"] == 1500
        assert srv.connection.stats()[1]["packets"] == 1500
    finally:
        fe.close()
    stats = srv.ended()[-1][1]
    assert (stats["packets"], stats["chains"], stats["bytes"]) == (1500, 1500, 1500 * 64)


def test_features_change_restarts_workers_with_the_new_header(server, sock_path, caplog):
    """SET_FEATURES while the rings run: the workers stop, the device applies the features, they restart (a
    NetDevice's queues then use the new header length)."""
    caplog.set_level(logging.INFO, logger="pyvhost")
    srv = server()
    fe = frontend(sock_path)
    try:
        fe.setup()
        assert fe.run("tx", count=100)["packets"] == 100
        starts = sum("queues (1,) started" in r.getMessage() for r in caplog.records)
        legacy = fe.features & ~((1 << 32) | (1 << 15))  # no VERSION_1, no MRG_RXBUF: a 10-byte header
        fe.command(R.SET_FEATURES, P.U64.pack(legacy))
        assert sum("queues (1,) started" in r.getMessage() for r in caplog.records) == starts + 1
        assert srv.connection.vrings[1].q[Q_HDR_LEN] == 10
        fe.features = legacy
        assert fe.run("tx", count=100)["packets"] == 100
        assert fe.drain("tx")["packets"] == 200
    finally:
        fe.close()
    assert srv.ended()[-1][1]["packets"] == 200


# -- the same on a tap (devices/tap.py) --------------------------------------------------------------------
needs_tap = pytest.mark.skipif(
    not os.path.exists("/dev/net/tun") or os.geteuid() != 0, reason="taps need /dev/net/tun and root"
)


@needs_tap
def test_tap_header_size_follows_set_features_while_running(tap):
    """SET_FEATURES dropping VERSION_1 and MRG_RXBUF while the queues run: the tap's vnet header becomes 10
    bytes and the restarted workers use that size (no num_buffers written into the frame)."""
    fe, rx, tx, wire, dev, srv = tap()
    buf = rx.buffer(2048)
    rx.post([buf], write=True)
    wire.send(frame(100, 1))
    ((_, ln),) = rx.used(1)
    assert rx.read(buf[0], ln) == vnet_hdr(1) + frame(100, 1)
    fe.command(R.SET_FEATURES, P.U64.pack(fe.features & ~((1 << 32) | (1 << 15))))
    buf = rx.buffer(2048)
    rx.post([buf], write=True)
    wire.send(frame(100, 2))
    ((_, ln),) = rx.used(1)
    assert rx.read(buf[0], ln) == bytes(10) + frame(100, 2)
    tx.post([tx.buffer(bytes(10) + frame(200, 3))], write=False)
    assert wire.recv(1) == [frame(200, 3)]


@needs_tap
def test_tap_disabled_tx_ring_discards_its_frames(tap):
    """A disabled TX ring's chains are completed but their frames never reach the tap."""
    fe, rx, tx, wire, dev, srv = tap()
    fe.command(R.SET_VRING_ENABLE, P.VRING_STATE.pack(1, 0))
    tx.post([tx.buffer(vnet_hdr() + frame(200, 4))], write=False)
    assert len(tx.used(1)) == 1
    assert srv.connection.stats()[1]["drops"] == 1
    fe.command(R.SET_VRING_ENABLE, P.VRING_STATE.pack(1, 1))
    tx.post([tx.buffer(vnet_hdr() + frame(200, 5))], write=False)
    assert wire.recv(1) == [frame(200, 5)]  # the first of ours the tap saw: frame 4 never went out
