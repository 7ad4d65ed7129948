"""virtio-rng: the plain-Python device API (ChainDevice) end to end, both metadata paths; the rate limit, the
file source and hostile chains through pyvhost's front-end and a small driver."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from pyvhost.devices.chain_device import ChainDevice
from pyvhost.devices.rng import RngDevice
from pyvhost.frontend.chains import PackedRingDriver, ring_driver
from pyvhost.frontend.net import Frontend
from pyvhost.frontend.ram import BUF_SIZE
from pyvhost.ring.split import VRING_DESC_F_WRITE
from pyvhost.ring.state import Q_LAST_AVAIL

#: ring layouts a ChainDevice serves
LAYOUTS = ["split", "packed"]
#: what the driver leaves in its buffers, to see which bytes the device wrote
POISON = 0xA5


class Driver:
    """Hand-made chains on ring 0 of a started Frontend, split or packed (``frontend.chains``): every buffer
    of the ring is poisoned at the start, and a device-writable one again each time it is posted; completions
    are read off the used ring (descriptors) as (head or buffer id, used length)."""

    def __init__(self, fe: Frontend) -> None:
        self.fe, self.d = fe, ring_driver(fe, 0)
        ring = self.d.ring
        fe.ram.buf[ring.bufs_off : ring.bufs_off + ring.size * BUF_SIZE] = POISON

    def buf(self, d: int) -> np.ndarray:
        return self.d.buf(d)

    def post(self, *segments: tuple[int, bool], kick: bool = True) -> list[int]:
        """One chain of ``(length, device_writable)`` segments; returns its buffers (the head or id first)."""
        head = self.d.post(*(n if w else bytes([POISON]) * n for n, w in segments), kick=kick, fill=POISON)
        return list(self.d.chains[head])

    def completed(self) -> list[tuple[int, int]]:
        """(head or buffer id, used length) of the completions published since the last call."""
        return self.d.used()

    def wait(self, n: int, timeout: float = 30.0) -> list[tuple[int, int]]:
        """The next ``n`` completions (fails after ``timeout`` s: a lost completion, not a slow one)."""
        out: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            out += self.completed()
            assert time.monotonic() < deadline, f"{len(out)} of {n} completions after {timeout} s"
            time.sleep(0.002)
        return out


def assert_written(drv: Driver, d: int, n: int, expect: bytes | None = None) -> None:
    """Buffer ``d`` holds ``n`` device-written bytes (``expect`` if given) and the poison after them."""
    buf = drv.buf(d)
    if expect is not None:
        assert bytes(buf[:n]) == expect
    elif n >= 64:
        assert np.count_nonzero(buf[:n] != POISON) > 0.9 * n  # random, not what the driver left
    assert (buf[n:] == POISON).all(), f"buffer {d}: bytes written past the used length {n}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("metadata", ["direct", "copy"])
def test_rng_fills_every_buffer(serve, sock_path, metadata, layout):
    dev = RngDevice()
    srv = serve(metadata=metadata, device=dev)
    with Frontend(sock_path, num_queues=1, packed=layout == "packed") as fe:
        fe.setup()
        srv.assert_path(metadata, [0])
        r = fe.run("rx", count=5000)
        ring = fe.rings[0]
        assert r["packets"] == 5000
        if layout == "packed":  # the used descriptors' len (their id is that of the one buffer each)
            lens = ring.desc[1::2] & 0xFFFFFFFF
        else:
            lens = ring.used32[2::2][: ring.size]
        assert (lens == BUF_SIZE).all()  # every completion says the whole buffer was written
        bufs = fe.ram.buf[ring.bufs_off : ring.bufs_off + ring.size * BUF_SIZE]
        assert np.count_nonzero(bufs) > 0.99 * bufs.size  # random, not the zeros the driver left
        final = fe.drain("rx")
    assert final["packets"] == 5000
    assert dev.bytes_served == 5000 * BUF_SIZE
    stats = srv.ended()[-1][0]
    assert stats["chains"] == 5000 and stats["error"] == 0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("metadata", ["direct", "copy"])
def test_rng_rate_limit_holds_over_windows(serve, sock_path, metadata, errors, layout):
    """40 requests of 1000 bytes through a limit of 4096 bytes per 100 ms: every window gives at most 4096
    bytes (a request gets what is left of it, never 0), and the 40000 bytes span at least 10 windows --
    checked on the device's window counts and by a lower bound on the time taken, never an upper one."""
    max_bytes, period, size, count = 4096, 0.1, 1000, 40
    dev = RngDevice(max_bytes=max_bytes, period=period)
    srv = serve(metadata=metadata, device=dev)
    with Frontend(sock_path, num_queues=1, packed=layout == "packed") as fe:
        fe.setup()
        srv.assert_path(metadata, [0])
        drv = Driver(fe)
        t0 = time.monotonic()
        heads = [drv.post((size, True))[0] for _ in range(count)]
        done = drv.wait(count)
        elapsed = time.monotonic() - t0
        assert [h for h, _ in done] == heads  # in the order posted
        lens = [n for _, n in done]
        # the driver's view: a full window gives 4 whole requests and 96 bytes of the fifth
        total, cut = 0, []
        for h, n in done:
            assert 0 < n <= size
            assert_written(drv, h, n)
            total += n
            if n < size:
                cut.append(total)
        assert sum(lens) < count * size  # some were cut at a window's end
        assert all(c % max_bytes == 0 for c in cut), cut  # and only there: each window was used up exactly
        windows = dev.stats()["window_bytes"]
        assert all(b <= max_bytes for b in windows) and sum(windows) == total
        assert len(windows) >= -(-total // max_bytes)
        assert elapsed >= (-(-total // max_bytes) - 1) * period  # n windows cannot pass in less than n-1 periods
        assert dev.waited >= len(windows) - 1
    assert srv.ended()[-1][0]["error"] == 0
    assert errors() == []
    dev.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rng_stop_completes_waiting_requests_at_once(serve, sock_path, errors, layout):
    """A window of 1000 bytes per minute: 600, then the 400 left, then the third request waits; stopping the
    ring (GET_VRING_BASE) completes it at once, without waiting for the window, with 1 byte (virtio 1.2
    §5.4.7.2: one or more bytes; Linux's driver hangs on 0), counted beyond the limit."""
    dev = RngDevice(max_bytes=1000, period=60)
    srv = serve(device=dev)
    with Frontend(sock_path, num_queues=1, packed=layout == "packed") as fe:
        fe.setup()
        drv = Driver(fe)
        heads = [drv.post((600, True))[0] for _ in range(3)]
        assert drv.wait(2) == [(heads[0], 600), (heads[1], 400)]
        deadline = time.monotonic() + 10
        while dev.waited == 0:  # the third one is with the device, waiting for the next window
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert drv.completed() == []
        fe.stop_ring(fe.rings[0])
        assert drv.completed() == [(heads[2], 1)]
        assert_written(drv, heads[2], 1)
        assert dev.stats()["window_bytes"] == [1001] and dev.over_limit == 1
        assert dev.window.room() == -1  # taken from the window (and from the next one, when it comes)
    assert srv.ended()[-1][0]["error"] == 0
    assert errors() == []  # no "still in flight after the stop timeout"
    dev.close()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("limited", [False, True])
def test_rng_hostile_chains(serve, sock_path, errors, limited, layout):
    """Read-only chains complete with 0 bytes (logged once), a readable buffer before the writable one is
    left alone, and a zero-length buffer breaks the queue (as in QEMU) after the chains before it completed."""
    dev = RngDevice(max_bytes=1 << 20, period=1) if limited else RngDevice()
    srv = serve(device=dev)
    with Frontend(sock_path, num_queues=1, packed=layout == "packed") as fe:
        fe.setup()
        drv = Driver(fe)
        ro = drv.post((512, False))
        ro2 = drv.post((100, False), (200, False))
        mixed = drv.post((300, False), (700, True))
        assert drv.wait(3) == [(ro[0], 0), (ro2[0], 0), (mixed[0], 700)]
        for d in ro + ro2 + mixed[:1]:
            assert_written(drv, d, 0)  # nothing written into device-readable buffers
        assert_written(drv, mixed[1], 700)
        assert dev.bad_requests == 2
        msgs = errors()
        assert sum("no device-writable byte" in m for m in msgs) == 1
        zero = drv.post((0, True))
        deadline = time.monotonic() + 10
        while not srv.server.connection.stats()[0]["error"]:
            assert time.monotonic() < deadline, "a zero-length buffer did not break the queue"
            time.sleep(0.01)
        assert drv.completed() == []
        assert_written(drv, zero[0], 0)
    assert srv.ended()[-1][0]["error"] != 0
    assert dev.bytes_served == 700
    dev.close()


def test_rng_source_file_byte_for_byte_then_end(serve, sock_path, tmp_path, errors):
    """A short file is given out in order, byte for byte; its end is an error, logged once: the request that
    reaches it gets the bytes left, the next ones 0 (nothing is repeated)."""
    data = os.urandom(3000)
    src = tmp_path / "entropy"
    src.write_bytes(data)
    dev = RngDevice(str(src))
    srv = serve(device=dev)
    with Frontend(sock_path, num_queues=1) as fe:
        fe.setup()
        drv = Driver(fe)
        heads = [drv.post((1024, True))[0] for _ in range(3)]
        assert [n for _, n in drv.wait(3)] == [1024, 1024, 952]
        got = b"".join(bytes(drv.buf(h)[:n]) for h, n in zip(heads, (1024, 1024, 952)))
        assert got == data
        assert_written(drv, heads[2], 952)
        more = drv.post((1024, True))[0]
        assert drv.wait(1) == [(more, 0)]
        assert dev.stats()["source_eof"] is True
    assert srv.ended()[-1][0]["error"] == 0
    assert sum("end of file" in m for m in errors()) == 1
    dev.close()
    assert dev.source.fd == -1


def test_rng_source_fifo_waits_for_writers(serve, sock_path, tmp_path, errors):
    """A FIFO: a request gets what the writer has written so far, waits while there is nothing (a writer that
    closes is no end), and a ring stopped meanwhile completes it with what there is: 0 bytes."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    dev = RngDevice(str(fifo), max_bytes=1 << 20, period=1)
    srv = serve(device=dev)
    with Frontend(sock_path, num_queues=1) as fe:
        fe.setup()
        drv = Driver(fe)
        first = os.urandom(1500)
        with open(fifo, "wb") as w:
            w.write(first)
        a = drv.post((1024, True))[0]
        b = drv.post((1024, True))[0]
        assert drv.wait(2) == [(a, 1024), (b, 476)]
        assert bytes(drv.buf(a)[:1024]) + bytes(drv.buf(b)[:476]) == first
        c = drv.post((1024, True))[0]  # the writer has gone: this one waits for the next
        second = os.urandom(600)
        with open(fifo, "wb") as w:
            w.write(second)
        assert drv.wait(1) == [(c, 600)]
        assert bytes(drv.buf(c)[:600]) == second
        d = drv.post((1024, True))[0]
        deadline = time.monotonic() + 10
        while srv.server.connection.vrings[0].q[Q_LAST_AVAIL] != 4:  # taken: with the feeder, waiting for data
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert drv.completed() == []
        fe.stop_ring(fe.rings[0])
        assert drv.completed() == [(d, 0)]
    assert srv.ended()[-1][0]["error"] == 0
    assert errors() == []
    dev.close()


def test_serve_rng_arguments(tmp_path):
    """``serve rng`` takes --source/--max-bytes/--period; a source that cannot be opened is a clear error."""
    sock = str(tmp_path / "rng.sock")
    p = subprocess.run(
        [sys.executable, "-m", "pyvhost", "serve", "rng", "--socket-path", sock, "--source", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0 and "--source" in p.stderr and "No such file" in p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "pyvhost", "serve", "rng", "--socket-path", sock, "--period", "0", "--max-bytes", "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0 and "--period" in p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "pyvhost", "serve", "rng", "--help"], capture_output=True, text=True, timeout=120
    )
    assert "--max-bytes N" in p.stdout and "--period MS" in p.stdout and "--source FILE" in p.stdout


class Echo(ChainDevice):
    """Copies what the driver wrote (readable) into the writable buffers; raises on a magic request."""

    num_queues = 1

    def handle(self, queue, readable, writable):
        data = b"".join(bytes(b) for b in readable)
        if data.startswith(b"boom"):
            raise RuntimeError("device bug")
        out = writable[0]
        n = min(len(data), len(out))
        out[:n] = data[:n]
        return n


@pytest.mark.parametrize("layout", LAYOUTS)
def test_device_exception_completes_the_chain_and_goes_on(serve, sock_path, errors, layout):
    serve(device=Echo())
    with Frontend(sock_path, num_queues=1, packed=layout == "packed") as fe:
        fe.setup()
        drv = ring_driver(fe, 0)
        heads = [drv.post(payload, 64) for payload in (b"hello", b"boom!", b"again")]
        last = drv.chains[heads[2]][1]
        done: list[tuple[int, int]] = []
        deadline = time.monotonic() + 10
        while len(done) < 3 and time.monotonic() < deadline:
            done += drv.used()
            time.sleep(0.01)
        assert done == list(zip(heads, [5, 0, 5]))  # every chain completed, the failing one too
        assert bytes(drv.buf(last)[:5]) == b"again"
    assert any("handling a chain of queue 0 failed" in m for m in errors())


class Careless(ChainDevice):
    """Completes with a length that is not a number, and completes one chain twice."""

    num_queues = 1

    def submit(self, req):
        req.complete("lots" if req.head == 0 else len(req.writable[0]))
        if req.head == 2:
            req.complete(1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_device_completion_mistakes_do_not_lose_chains(serve, sock_path, errors, layout):
    serve(device=Careless())
    with Frontend(sock_path, num_queues=1, packed=layout == "packed") as fe:
        fe.setup()
        r = fe.run("rx", count=300)
        assert r["packets"] == 300  # every chain completed, the ones the device got wrong too
        final = fe.drain("rx")
    assert final["packets"] == 300
    msgs = errors()
    assert any("completing chain 0" in m for m in msgs) and any("completed twice" in m for m in msgs)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fault_at_the_first_chain_breaks_the_queue(serve, sock_path, errors, layout):
    """The only chain on the avail ring names a buffer outside guest memory: the queue breaks, logged.  (A fault
    at the first chain takes no chain, and ChainDevice took that for an idle ring: the queue hung silently --
    behind a vIOMMU, where such a fault is an IOTLB miss, no MISS was ever sent.)"""
    serve(device=Echo())
    with Frontend(sock_path, num_queues=1, packed=layout == "packed") as fe:
        fe.setup()
        ring = fe.rings[0]
        if layout == "packed":
            drv = PackedRingDriver(fe, 0)
            drv.write_descs([(1 << 40, 64, 0, VRING_DESC_F_WRITE | drv.avail_flags(1))])  # far past the RAM
        else:
            ring.desc[0] = 1 << 40  # far past the front-end's RAM
            ring.desc[1] = 64 | (VRING_DESC_F_WRITE << 32)
            ring.avail[2] = 0
            ring.avail[1] = 1
            os.eventfd_write(ring.kick_fd, 1)
        deadline = time.monotonic() + 10
        while not any("vring 0 broken" in m for m in errors()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert any("vring 0 broken: BAD_ADDRESS" in m for m in errors()), errors()
        if layout == "packed":
            assert ring.desc[1] >> 48 == VRING_DESC_F_WRITE | drv.avail_flags(1)  # nothing completed
        else:
            assert ring.used16[1] == 0  # nothing completed
