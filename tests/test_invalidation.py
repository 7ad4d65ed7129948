"""Invariant 1, no stale view: memory and ring-address changes hammered while traffic runs.

A Frontend transmits from a background thread (``fe.run`` touches only shared memory, never the socket) while
the main thread sends SET_MEM_TABLE, SET_VRING_ADDR and ADD/REM_MEM_REG.  Each change makes the back-end stop
the ring's worker, drop its views, remap and rebind.  Nothing may crash or be logged as an error, traffic must go
on after every change, and at the end the frontend's completions must equal the server's count exactly.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from pyvhost.frontend import D_AVAIL_IDX, D_DONE, D_POSTED, Frontend
from pyvhost.protocol import SINGLE_REGION_HDR, U64, VRING_ADDR, MemRegion, ProtocolFeature as PF, Request as R
from pyvhost.ring.split import VRING_USED_F_NO_NOTIFY

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


@pytest.mark.parametrize("metadata", PATHS)
def test_set_mem_table_hammered(serve, sock_path, errors, metadata):
    srv = serve("sink", metadata)
    fe = Frontend(sock_path, ram_size=RAM)
    fe.setup()
    traffic = Traffic(fe, seconds=3.0)
    traffic.wait_progress(0)
    changes = hammer(traffic, [fe.set_mem_table], seconds=2.0)
    assert changes >= 10
    done, stats = finish(fe, traffic, srv)
    assert errors() == []
    assert done > changes and stats["error"] == 0 and stats["drops"] == 0
    assert done == stats["packets"] == stats["chains"]
    assert stats["bytes"] == 64 * done


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
        changes = hammer(traffic, [
            lambda: fe.resend_vring_addr(TX),
            lambda: fe.add_region(EXTRA, extra_fd),
            lambda: fe.resend_vring_addr(TX),
            lambda: fe.resend_vring_addr(0),  # the idle RX ring: must not disturb TX
            lambda: fe.rem_region(EXTRA),
            fe.set_mem_table,  # a whole new table: drops the extra region if present
        ], seconds=3.0)
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
def test_removing_the_rings_region_with_other_memory_left_breaks_the_queue(serve, sock_path, errors, caplog,
                                                                        metadata):
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
