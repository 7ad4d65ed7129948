"""virtio-rng: the plain-Python device API (ChainDevice) end to end, both metadata paths."""

from __future__ import annotations

import numpy as np
import pytest

from pyvhost.devices.chain_device import ChainDevice
from pyvhost.devices.rng import RngDevice
from pyvhost.frontend.net import Frontend
from pyvhost.frontend.ram import BUF_SIZE


@pytest.mark.parametrize("metadata", ["direct", "copy"])
def test_rng_fills_every_buffer(serve, sock_path, metadata):
    dev = RngDevice()
    srv = serve(metadata=metadata, device=dev)
    with Frontend(sock_path, num_queues=1) as fe:
        fe.setup()
        srv.assert_path(metadata, [0])
        r = fe.run("rx", count=5000)
        ring = fe.rings[0]
        assert r["packets"] == 5000
        lens = ring.used32[2::2][: ring.size]
        assert (lens == BUF_SIZE).all()  # every completion says the whole buffer was written
        bufs = fe.ram.buf[ring.bufs_off : ring.bufs_off + ring.size * BUF_SIZE]
        assert np.count_nonzero(bufs) > 0.99 * bufs.size  # random, not the zeros the driver left
        final = fe.drain("rx")
    assert final["packets"] == 5000
    assert dev.bytes_served == 5000 * BUF_SIZE
    stats = srv.ended()[-1][0]
    assert stats["chains"] == 5000 and stats["error"] == 0


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


def test_device_exception_completes_the_chain_and_goes_on(serve, sock_path, errors):
    import os

    from pyvhost.ring.split import VRING_DESC_F_NEXT, VRING_DESC_F_WRITE

    serve(device=Echo())
    with Frontend(sock_path, num_queues=1) as fe:
        fe.setup()
        ring = fe.rings[0]
        ram = fe.ram
        for i, payload in enumerate((b"hello", b"boom!", b"again")):
            src, dst = ring.bufs_off + 2 * i * BUF_SIZE, ring.bufs_off + (2 * i + 1) * BUF_SIZE
            ram.buf[src : src + len(payload)] = np.frombuffer(payload, np.uint8)
            d = 2 * i
            ring.desc[2 * d] = ram.gpa(src)
            ring.desc[2 * d + 1] = len(payload) | (VRING_DESC_F_NEXT << 32) | ((d + 1) << 48)
            ring.desc[2 * (d + 1)] = ram.gpa(dst)
            ring.desc[2 * (d + 1) + 1] = 64 | (VRING_DESC_F_WRITE << 32)
            ring.avail[2 + i] = d
        ring.avail[1] = 3
        os.eventfd_write(ring.kick_fd, 1)
        import time

        deadline = time.monotonic() + 10
        while ring.used16[1] != 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ring.used16[1] == 3  # every chain completed, the failing one too
        assert [int(x) for x in ring.used32[2:8:2]] == [5, 0, 5]
        dst = ring.bufs_off + 5 * BUF_SIZE
        assert bytes(ram.buf[dst : dst + 5]) == b"again"
    assert any("handling a chain of queue 0 failed" in m for m in errors())


class Careless(ChainDevice):
    """Completes with a length that is not a number, and completes one chain twice."""

    num_queues = 1

    def submit(self, req):
        req.complete("lots" if req.head == 0 else len(req.writable[0]))
        if req.head == 2:
            req.complete(1)


def test_device_completion_mistakes_do_not_lose_chains(serve, sock_path, errors):
    serve(device=Careless())
    with Frontend(sock_path, num_queues=1) as fe:
        fe.setup()
        r = fe.run("rx", count=300)
        assert r["packets"] == 300  # every chain completed, the ones the device got wrong too
        final = fe.drain("rx")
    assert final["packets"] == 300
    msgs = errors()
    assert any("completing chain 0" in m for m in msgs) and any("completed twice" in m for m in msgs)


def test_fault_at_the_first_chain_breaks_the_queue(serve, sock_path, errors):
    """The only chain on the avail ring names a buffer outside guest memory: the queue breaks, logged.  (A fault
    at the first chain takes no chain, and ChainDevice took that for an idle ring: the queue hung silently --
    behind a vIOMMU, where such a fault is an IOTLB miss, no MISS was ever sent.)"""
    import os
    import time

    from pyvhost.ring.split import VRING_DESC_F_WRITE

    serve(device=Echo())
    with Frontend(sock_path, num_queues=1) as fe:
        fe.setup()
        ring = fe.rings[0]
        ring.desc[0] = 1 << 40  # far past the front-end's RAM
        ring.desc[1] = 64 | (VRING_DESC_F_WRITE << 32)
        ring.avail[2] = 0
        ring.avail[1] = 1
        os.eventfd_write(ring.kick_fd, 1)
        deadline = time.monotonic() + 10
        while not any("vring 0 broken" in m for m in errors()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert any("vring 0 broken: BAD_ADDRESS" in m for m in errors()), errors()
        assert ring.used16[1] == 0  # nothing completed
