"""Invariant 1, no stale view: memory and ring-address changes hammered while traffic runs.

A Frontend transmits from a background thread (``fe.run`` touches only shared memory, never the socket) while
the main thread sends SET_MEM_TABLE, SET_VRING_ADDR and ADD/REM_MEM_REG.  Each change makes the back-end stop
the ring's worker, drop its views, remap and rebind.  Nothing may crash or be logged as an error, traffic must go
on after every change, and at the end the frontend's completions must equal the server's count exactly.

Invariant 8 (stale access is observable): the tests below ``Driver`` move the front-end's RAM to a different
memfd on every SET_MEM_TABLE, RESET_OWNER and reconnection, and poison the old file once the back-end has let
go of it; a stale read or write then shows as a broken queue or as non-poison bytes in an old file.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import threading
import time

import numpy as np
import pytest

from pyvhost.frontend.net import Frontend
from pyvhost.frontend.split import D_AVAIL_IDX, D_DONE, D_POSTED, drive_tx
from pyvhost.protocol import SINGLE_REGION_HDR, U64, VRING_ADDR, MemRegion
from pyvhost.protocol import ProtocolFeature as PF
from pyvhost.protocol import Request as R
from pyvhost.ring.split import VRING_USED_F_NO_NOTIFY
from pyvhost.ring.state import Q_DIRECT

PATHS = ["direct", "copy"]
TX = 1
RAM = 16 << 20
EXTRA_SIZE = 2 << 20
EXTRA = MemRegion(0x1_0000_0000, EXTRA_SIZE, 0x10_0000_0000, 0)  # GPA/UVA far from the frontend's RAM
TIMEOUT = 10.0


class MemSlotsFrontend(Frontend):
    """A Frontend that also negotiates CONFIGURE_MEM_SLOTS (ADD_MEM_REG / REM_MEM_REG)."""

    def negotiate(self) -> None:
        super().negotiate()
        offered = U64.unpack(self.request(R.GET_PROTOCOL_FEATURES))[0]
        assert offered & (1 << PF.CONFIGURE_MEM_SLOTS)
        self.protocol_features |= 1 << PF.CONFIGURE_MEM_SLOTS
        self.command(R.SET_PROTOCOL_FEATURES, U64.pack(self.protocol_features))
        assert U64.unpack(self.request(R.GET_MAX_MEM_SLOTS))[0] >= 2

    def add_region(self, region: MemRegion, fd: int) -> None:
        self.command(R.ADD_MEM_REG, SINGLE_REGION_HDR.pack(0) + region.pack(), [fd])

    def rem_region(self, region: MemRegion) -> None:
        self.command(R.REM_MEM_REG, SINGLE_REGION_HDR.pack(0) + region.pack())

    def resend_vring_addr(self, index: int) -> None:
        a = self.rings[index].addr()
        self.command(R.SET_VRING_ADDR, VRING_ADDR.pack(index, a.flags, a.desc, a.used, a.avail, a.log))


class Traffic:
    """``fe.run("tx")`` in a background thread; the main thread keeps the socket."""

    def __init__(self, fe: Frontend, seconds: float) -> None:
        self.fe = fe
        self.ring = fe.rings[TX]
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(seconds,), name="tx-traffic", daemon=True)
        self.thread.start()

    def _run(self, seconds: float) -> None:
        try:
            self.result = self.fe.run("tx", seconds=seconds)
        except BaseException as e:  # noqa: BLE001 - reported by join()
            self.error = e

    @property
    def done(self) -> int:
        return int(self.ring.d[D_DONE])

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def wait_progress(self, since: int, timeout: float = TIMEOUT) -> int:
        """Wait until more than ``since`` completions were seen; return the count."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = self.done
            if n > since:
                return n
            if not self.running:
                break
            time.sleep(0.001)
        raise AssertionError(f"no completion after {since} within {timeout} s (traffic running: {self.running})")

    def join(self) -> dict:
        self.thread.join(TIMEOUT + 30)
        assert not self.thread.is_alive(), "traffic thread did not finish"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def finish(fe: Frontend, traffic: Traffic, srv) -> tuple[int, dict]:
    """Join the traffic, drain TX, close; return (frontend completions, server stats of the TX queue)."""
    traffic.join()
    final = fe.drain("tx")
    fe.close()
    stats = srv.ended()[-1]
    return final["packets"], stats[TX]


def hammer(traffic: Traffic, changes, seconds: float) -> int:
    """Apply the changes in turn while the traffic runs for ``seconds``; after each one, see traffic go on."""
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline and traffic.running:
        before = traffic.done
        changes[n % len(changes)]()
        n += 1
        traffic.wait_progress(before)
    return n


# -- remapping to different memory, with the old pages poisoned (invariant 8) ---------------------------------
POISON = 0xA5  # a descriptor of it points far past ADDR_LIMIT, an index of it jumps past any queue size
SWITCH_RAM = 4 << 20
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_MAP_FIXED = 0x10


class Driver:
    """The TX driver loop in a background thread that the main thread can hold: while held it touches no guest
    memory, so the main thread may copy the RAM to another file and switch the driver's mapping to it."""

    def __init__(self, fe: Frontend) -> None:
        self.fe, self.ring = fe, fe.rings[TX]
        self.length = fe.fill_tx_frames(self.ring, 64)
        self.cv = threading.Condition()
        self.want_hold = self.held = self.stopping = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="tx-driver", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        gpa = self.ring.buf_gpa(0)
        try:
            while True:
                with self.cv:
                    if self.want_hold:
                        self.held = True
                        self.cv.notify_all()
                        self.cv.wait_for(lambda: not self.want_hold or self.stopping)
                        self.held = False
                    if self.stopping:
                        return
                drive_tx(*self.ring.views(), gpa, self.length, 16)
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.error = e

    @property
    def done(self) -> int:
        return int(self.ring.d[D_DONE])

    def hold(self) -> None:
        with self.cv:
            self.want_hold = True
            assert self.cv.wait_for(lambda: self.held, TIMEOUT), "driver did not stop"

    def release(self) -> None:
        with self.cv:
            self.want_hold = False
            self.cv.notify_all()

    def wait_progress(self, since: int, why) -> int:
        deadline = time.monotonic() + TIMEOUT
        while self.done <= since:
            assert self.error is None and time.monotonic() < deadline, f"no completion after {since}: {why()}"
            time.sleep(0.001)
        return self.done

    def wait_consumed(self, why) -> None:
        """Wait (held) until the back-end has completed every chain posted: it has nothing left to write."""
        deadline = time.monotonic() + TIMEOUT
        while int(self.ring.used16[1]) != int(self.ring.d[D_AVAIL_IDX]):
            assert time.monotonic() < deadline, f"the back-end did not complete what was posted: {why()}"
            time.sleep(0.001)

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify_all()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


def move_ram(fe: Frontend) -> int:
    """Copy the front-end's RAM into a new memfd and map that at the same address (the driver must be held and
    the back-end done writing); return the old file's fd.  From here on the driver uses the new file only."""
    ram = fe.ram
    new = os.memfd_create("pyvhost-next", os.MFD_CLOEXEC)
    os.ftruncate(new, ram.size)
    os.pwrite(new, bytes(ram.buf), 0)
    got = _libc.mmap(ram.uva_base, ram.size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED, new, 0)
    assert got == ram.uva_base, os.strerror(ctypes.get_errno())
    old, ram.fd = ram.fd, new
    return old


def poison(fd: int, size: int) -> None:
    os.pwrite(fd, bytes([POISON]) * size, 0)


def unpoisoned(fds: list[int], size: int) -> int:
    """Bytes of the old files that are no longer poison: writes the back-end made to memory it had given up."""
    return sum(int(np.count_nonzero(np.frombuffer(os.pread(fd, size, 0), np.uint8) != POISON)) for fd in fds)


@pytest.mark.parametrize("metadata", PATHS)
def test_set_mem_table_to_new_memory_never_touches_the_old(serve, sock_path, errors, metadata):
    """SET_MEM_TABLE hammered during traffic, each time onto a different memfd; once the change is
    acknowledged the old file is overwritten with poison.  A stale read of it (avail index, descriptors) would
    break the queue (an error, a non-zero error counter); a stale write (a used entry) would show as non-poison
    bytes in the old file.  Both counts must be 0, and traffic must go on after every change, counts exact."""
    srv = serve("sink", metadata)
    fe = Frontend(sock_path, ram_size=SWITCH_RAM)
    fe.setup()
    driver = Driver(fe)
    old: list[int] = []
    why = lambda: f"errors {errors()}, {unpoisoned(old, SWITCH_RAM)} stale bytes written"  # noqa: E731
    try:
        driver.wait_progress(0, why)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline or len(old) < 10:
            before = driver.done
            driver.hold()
            driver.wait_consumed(why)
            prev = move_ram(fe)
            driver.release()  # the driver posts into the new file while the back-end still has the old one
            fe.set_mem_table()  # acknowledged: the back-end has let go of the old file
            poison(prev, SWITCH_RAM)
            old.append(prev)
            driver.wait_progress(before, why)
            assert srv.connection.vrings[TX].q[Q_DIRECT] == (metadata == "direct")
        driver.stop()
        done = fe.drain("tx")["packets"]
        fe.close()
        stats = srv.ended()[-1][TX]
        assert errors() == []
        assert unpoisoned(old, SWITCH_RAM) == 0
        assert stats["error"] == 0 and done == stats["packets"] == stats["chains"] > len(old)
    finally:
        for fd in old:
            os.close(fd)


@pytest.mark.parametrize("metadata", PATHS)
def test_reset_owner_during_traffic_never_touches_the_old_memory(serve, sock_path, errors, metadata):
    """RESET_OWNER sent while the driver transmits; once acknowledged the RAM moves to a new memfd, the old one
    is poisoned and the device is set up again on the same connection, several times: no stale access."""
    srv = serve("sink", metadata)
    fe = Frontend(sock_path, ram_size=SWITCH_RAM)
    fe.setup()
    tx = fe.rings[TX]
    driver = Driver(fe)
    old: list[int] = []
    why = lambda: f"errors {errors()}, {unpoisoned(old, SWITCH_RAM)} stale bytes written"  # noqa: E731
    try:
        for _ in range(5):
            before = driver.wait_progress(driver.done, why)  # traffic is flowing
            fe.command(R.RESET_OWNER)  # acknowledged (REPLY_ACK): every worker stopped, memory unmapped
            driver.hold()
            prev = move_ram(fe)
            poison(prev, SWITCH_RAM)
            old.append(prev)
            fe.negotiate()
            fe.set_mem_table()
            for ring in fe.rings:  # the sink completes each chain it takes: resume where the used index is
                fe.start_ring(ring, int(ring.used16[1]))
            driver.release()
            driver.wait_progress(before, why)
            assert srv.connection.vrings[TX].q[Q_DIRECT] == (metadata == "direct")
        driver.stop()
        driver.wait_consumed(why)
        final = fe.drain("tx")
        fe.close()
        srv.ended()
        assert errors() == []
        assert unpoisoned(old, SWITCH_RAM) == 0
        assert final["packets"] == final["posted"] == int(tx.d[D_POSTED])
    finally:
        for fd in old:
            os.close(fd)


@pytest.mark.parametrize("metadata", PATHS)
def test_disconnect_during_traffic_never_touches_the_old_memory(serve, sock_path, errors, metadata):
    """The front-end disconnects while it transmits; once the server has ended the connection its memory file
    is poisoned and kept open, and the next front-end (another memfd) runs traffic: the old file stays poison."""
    srv = serve("sink", metadata)
    old: list[int] = []
    try:
        for _ in range(3):
            ended = len(srv.server.history)
            fe = Frontend(sock_path, ram_size=SWITCH_RAM)
            fe.setup()
            driver = Driver(fe)
            driver.wait_progress(0, errors)
            driver.wait_progress(driver.done, errors)
            fe.sock.close()  # mid-traffic: the driver keeps posting and kicking
            srv.ended()
            assert len(srv.server.history) == ended + 1 and srv.connection is None
            driver.stop()
            old.append(os.dup(fe.ram.fd))
            poison(old[-1], SWITCH_RAM)
            fe.close(stop_rings=False)
        with Frontend(sock_path, ram_size=SWITCH_RAM) as fe:
            fe.setup()
            fe.run("tx", count=2000, timeout=TIMEOUT)
        srv.ended()
        assert errors() == []
        assert unpoisoned(old, SWITCH_RAM) == 0
        assert all(h[TX]["error"] == 0 for h in srv.server.history)
    finally:
        for fd in old:
            os.close(fd)


@pytest.mark.parametrize("metadata", PATHS)
def test_vring_addr_and_mem_slots_hammered(serve, sock_path, errors, metadata):
    srv = serve("sink", metadata)
    fe = MemSlotsFrontend(sock_path, ram_size=RAM)
    fe.setup()
    extra_fd = os.memfd_create("pyvhost-extra", os.MFD_CLOEXEC)
    os.ftruncate(extra_fd, EXTRA_SIZE)
    try:
        traffic = Traffic(fe, seconds=4.0)
        traffic.wait_progress(0)
        changes = hammer(
            traffic,
            [
                lambda: fe.resend_vring_addr(TX),
                lambda: fe.add_region(EXTRA, extra_fd),
                lambda: fe.resend_vring_addr(TX),
                lambda: fe.resend_vring_addr(0),  # the idle RX ring: must not disturb TX
                lambda: fe.rem_region(EXTRA),
                fe.set_mem_table,  # a whole new table: drops the extra region if present
            ],
            seconds=3.0,
        )
        assert changes >= 10
        conn = srv.connection
        assert conn is not None and conn.mem.nregions in (1, 2)
        done, stats = finish(fe, traffic, srv)
    finally:
        os.close(extra_fd)
    assert errors() == []
    assert done > changes and stats["error"] == 0
    assert done == stats["packets"] == stats["chains"]


def _wait_idle(traffic: Traffic, quiet: float = 0.3, timeout: float = TIMEOUT) -> int:
    """Wait until no completion has appeared for ``quiet`` seconds; return the count."""
    deadline = time.monotonic() + timeout
    last, since = traffic.done, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.01)
        n = traffic.done
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return n
    raise AssertionError("completions kept coming")


@pytest.mark.parametrize("metadata", PATHS)
def test_removing_the_rings_region_stops_the_queue_and_re_adding_restarts_it(serve, sock_path, errors, metadata):
    """The region holding the rings (the only one) is removed: the worker stops and is not restarted (no
    memory), no completion appears while it is gone; re-adding it restarts the queue where it was."""
    srv = serve("sink", metadata)
    fe = MemSlotsFrontend(sock_path, ram_size=RAM)
    fe.setup()
    traffic = Traffic(fe, seconds=3.0)
    traffic.wait_progress(0)
    region = fe.ram.region()
    for _ in range(3):
        fe.rem_region(region)
        conn = srv.connection
        assert conn.mem.nregions == 0 and not conn.workers
        gone = _wait_idle(traffic)
        time.sleep(0.2)
        assert traffic.done == gone and traffic.running
        assert int(fe.rings[TX].d[D_POSTED]) > gone  # the driver still had chains waiting
        fe.add_region(region, fe.ram.fd)
        traffic.wait_progress(gone)
    done, stats = finish(fe, traffic, srv)
    assert errors() == []
    assert done == stats["packets"] == stats["chains"] and stats["error"] == 0


@pytest.mark.parametrize("metadata", PATHS)
def test_removing_the_rings_region_with_other_memory_left_breaks_the_queue(serve, sock_path, errors, caplog, metadata):
    """With another region still mapped, removing the rings' region leaves the ring's addresses untranslatable:
    the queue breaks cleanly with RING_UNMAPPED (logged, ERR signalled), completes nothing more, and stays
    broken when the region comes back; the connection and the counts stay exact."""
    srv = serve("sink", metadata)
    fe = MemSlotsFrontend(sock_path, ram_size=RAM)
    fe.setup()
    err_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    fe.command(R.SET_VRING_ERR, U64.pack(TX), [err_fd])
    extra_fd = os.memfd_create("pyvhost-extra", os.MFD_CLOEXEC)
    os.ftruncate(extra_fd, EXTRA_SIZE)
    try:
        fe.add_region(EXTRA, extra_fd)
        traffic = Traffic(fe, seconds=2.0)
        traffic.wait_progress(0)
        fe.rem_region(fe.ram.region())
        gone = _wait_idle(traffic)
        conn = srv.connection
        deadline = time.monotonic() + TIMEOUT
        while not conn.vrings[TX].broken and time.monotonic() < deadline:
            time.sleep(0.01)
        assert conn.vrings[TX].broken
        # the ERR eventfd is written as the ring breaks, not necessarily before ``broken`` reads true here
        assert select.select([err_fd], [], [], 10)[0], "no ERR signal within 10 s of the ring breaking"
        assert os.eventfd_read(err_fd) == 1
        msgs = errors()
        assert len(msgs) == 1 and f"vring {TX} broken: RING_UNMAPPED" in msgs[0], msgs
        fe.add_region(fe.ram.region(), fe.ram.fd)
        time.sleep(0.3)
        assert traffic.done == gone and not conn.workers  # a broken ring is not restarted by memory coming back
        done, stats = finish(fe, traffic, srv)
    finally:
        os.close(extra_fd)
        os.close(err_fd)
    assert done == gone == stats["packets"] == stats["chains"]
    assert stats["error"] == 1  # QueueError.RING_UNMAPPED
    assert len(errors()) == 1


def _asks_for_kicks(ring, event_idx: bool, last_avail: int) -> bool:
    if event_idx:
        return int(ring.used16[2 + 4 * ring.size]) == last_avail
    return int(ring.used16[0]) & VRING_USED_F_NO_NOTIFY == 0


@pytest.mark.parametrize("metadata", PATHS)
@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
@pytest.mark.parametrize("restart", ["set_mem_table", "get_vring_base"])
def test_restarted_worker_asks_for_kicks_before_sleeping(serve, sock_path, errors, metadata, event_idx, restart):
    """A worker stopped while it polled leaves kicks suppressed in the ring (used flags NO_NOTIFY, or an
    avail_event left behind); so does a previous back-end.  A restarted worker that finds nothing to do must
    ask for kicks again before it sleeps, or the driver never kicks it (the 1 s select timeout was all that
    woke it).  ``spins`` below the budget, so the worker does go to sleep."""
    srv = serve("sink", metadata, spins=64)
    fe = Frontend(sock_path, ram_size=RAM, event_idx=event_idx)
    fe.setup()
    tx = fe.rings[TX]
    fe.run("tx", count=1000)
    base = int(tx.d[D_AVAIL_IDX])
    deadline = time.monotonic() + TIMEOUT
    while not _asks_for_kicks(tx, event_idx, base) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert _asks_for_kicks(tx, event_idx, base)  # idle and asleep
    if restart == "get_vring_base":
        assert fe.stop_ring(tx) == base
        tx.stopped = False
    # kicks suppressed, as a worker stopped while polling (or another back-end) leaves them
    tx.used16[0] = VRING_USED_F_NO_NOTIFY
    tx.used16[2 + 4 * tx.size] = (base - 100) & 0xFFFF
    if restart == "get_vring_base":
        fe.start_ring(tx, base)
    else:
        fe.set_mem_table()
    deadline = time.monotonic() + 0.5
    while not _asks_for_kicks(tx, event_idx, base) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert _asks_for_kicks(tx, event_idx, base), "the restarted worker sleeps with kicks suppressed"
    r = fe.run("tx", count=1000)
    assert r["kicks"] > 0
    final = fe.drain("tx")
    fe.close()
    stats = srv.ended()[-1][TX]
    # counters are cumulative over a ring restart (SET_VRING_NUM starts a fresh queue state)
    assert final["packets"] == 2000 and errors() == []
    assert stats["packets"] == 2000
