"""ChainDevice on packed rings (virtio 1.2 §2.8): completions in any order over many laps of the ring, both
metadata paths (split alongside, as the reference), and hostile packed rings -- each breaks the queue with a
logged error after the chains before it completed, and no used descriptor is written for it."""

from __future__ import annotations

import os
import random
import threading
import time

import numpy as np
import pytest

from pyvhost.devices.chain_device import ChainDevice, Request
from pyvhost.frontend.chains import PackedRingDriver, ring_driver
from pyvhost.frontend.net import Frontend
from pyvhost.frontend.ram import BUF_SIZE
from pyvhost.ring.split import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from pyvhost.ring.state import Q_ERROR

SIZE = 8


class Shuffler(ChainDevice):
    """Holds every request until the test releases them, then completes them in a random order: the readable
    bytes copied into the writable buffers, from the test's thread."""

    num_queues = 1

    def __init__(self) -> None:
        self.held: list[Request] = []
        self.lock = threading.Lock()

    def submit(self, req: Request) -> None:
        with self.lock:
            self.held.append(req)

    def release(self, rnd: random.Random, n: int, timeout: float = 30.0) -> None:
        """Wait until ``n`` requests are held, then complete them in a shuffled order."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if len(self.held) >= n:
                    reqs, self.held = self.held, []
                    break
            assert time.monotonic() < deadline, f"{len(self.held)} of {n} requests reached the device"
            time.sleep(0.002)
        rnd.shuffle(reqs)
        for req in reqs:
            data = b"".join(bytes(b) for b in req.readable)
            written = 0
            for b in req.writable:
                k = min(len(b), len(data) - written)
                b[:k] = data[written : written + k]
                written += k
            req.complete(written)


def wait_used(drv, n: int, timeout: float = 30.0) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        out += drv.used()
        assert time.monotonic() < deadline, f"{len(out)} of {n} completions after {timeout} s"
        time.sleep(0.002)
    return out


@pytest.mark.parametrize("layout", ["split", "packed"])
@pytest.mark.parametrize("metadata", ["direct", "copy"])
def test_out_of_order_completions_over_many_laps(serve, sock_path, errors, metadata, layout):
    """Rounds of chains of 1-3 descriptors (up to the ring's size in flight), completed in a shuffled order:
    each completion names its chain (head / buffer id) with the bytes written, the data is the chain's own,
    and the ring goes round many times (a used descriptor moves the used cursor by its chain's descriptors)."""
    rnd = random.Random(7)
    dev = Shuffler()
    srv = serve(metadata=metadata, device=dev)
    total = 0
    with Frontend(sock_path, num_queues=1, queue_size=SIZE, packed=layout == "packed") as fe:
        fe.setup()
        srv.assert_path(metadata, [0])
        drv = ring_driver(fe, 0)
        for _ in range(150):
            posted: dict[int, tuple[bytes, list[int]]] = {}
            free = SIZE
            while free >= 2:
                nw = rnd.randint(1, min(2, free - 1))
                payload = rnd.randbytes(rnd.randint(1, 2 * BUF_SIZE // 3))
                head = drv.post(payload, *([BUF_SIZE // 2] * nw), kick=False)
                posted[head] = (payload, list(drv.chains[head][1:]))
                free -= 1 + nw
                if rnd.random() < 0.3:
                    break
            os.eventfd_write(drv.ring.kick_fd, 1)  # one kick for the round
            dev.release(rnd, len(posted))
            done = wait_used(drv, len(posted))
            assert sorted(h for h, _ in done) == sorted(posted)
            for head, n in done:
                payload, wbufs = posted[head]
                assert n == min(len(payload), BUF_SIZE // 2 * len(wbufs))
                got = b"".join(bytes(drv.buf(d)[: BUF_SIZE // 2]) for d in wbufs)[:n]
                assert got == payload[:n]
            total += len(posted)
    stats = srv.ended()[-1][0]
    assert stats["chains"] == total and stats["error"] == 0
    assert errors() == []
    assert total > 3 * SIZE


def _flags(drv: PackedRingDriver, k: int) -> int:
    """AVAIL/USED bits right for the ``k``-th descriptor from the driver's avail cursor."""
    return drv.avail_flags(drv.wrap ^ ((drv.pos + k) // drv.ring.size))


HOSTILE = [
    "id_out_of_range",
    "id_in_use",
    "longer_than_the_ring",
    "avail_flip_mid_chain",
    "used_descriptor_at_the_head",
    "indirect_in_a_chain",
    "indirect_nested",
]
CODE = {
    "id_out_of_range": "PACKED_BAD_ID",
    "id_in_use": "PACKED_ID_IN_USE",
    "longer_than_the_ring": "CHAIN_TOO_LONG",
    "avail_flip_mid_chain": "PACKED_BAD_WRAP",
    "used_descriptor_at_the_head": "PACKED_BAD_WRAP",
    "indirect_in_a_chain": "PACKED_INDIRECT_IN_CHAIN",
    "indirect_nested": "INDIRECT_NESTED",
}


@pytest.mark.parametrize("metadata", ["direct", "copy"])
@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_packed_ring_breaks_the_queue(serve, sock_path, errors, case, metadata):
    dev = Shuffler()
    srv = serve(metadata=metadata, device=dev)
    rnd = random.Random(1)
    with Frontend(sock_path, num_queues=1, queue_size=SIZE, packed=True) as fe:
        fe.setup()
        drv = PackedRingDriver(fe, 0)
        good = drv.post(b"fine", 64)  # a good chain first: completed, the used cursor then at 2
        dev.release(rnd, 1)
        assert wait_used(drv, 1) == [(good, 4)]
        if case == "id_in_use":
            held = drv.post(b"held", 64)  # taken by the device and held
            deadline = time.monotonic() + 30
            while not dev.held:
                assert time.monotonic() < deadline
                time.sleep(0.002)
        gpa, W, N = drv.ring.buf_gpa(SIZE - 1), VRING_DESC_F_WRITE, VRING_DESC_F_NEXT
        if case == "id_out_of_range":
            descs = [(gpa, 64, SIZE, W | _flags(drv, 0))]
        elif case == "id_in_use":
            descs = [(gpa, 64, held, W | _flags(drv, 0))]
        elif case == "longer_than_the_ring":  # every descriptor says NEXT, round the whole ring
            descs = [(gpa, 64, 0, W | N | _flags(drv, k)) for k in range(SIZE)]
        elif case == "avail_flip_mid_chain":
            descs = [(gpa, 64, 0, W | N | _flags(drv, 0)), (gpa, 64, 0, W | N | _flags(drv, 1) ^ 0x8080)]
            descs.append((gpa, 64, 0, W | _flags(drv, 2)))
        elif case == "used_descriptor_at_the_head":  # AVAIL == USED == the wrap counter: a used one of this lap
            both = (1 << 7 | 1 << 15) if drv.wrap else 0
            descs = [(gpa, 64, 0, W | both)]
        elif case == "indirect_in_a_chain":
            descs = [(gpa, 16, 0, N | _flags(drv, 0)), (gpa, 16, 0, VRING_DESC_F_INDIRECT | _flags(drv, 1))]
        else:  # an indirect table whose entry is itself indirect
            table = drv.buf(SIZE - 2)
            table[:16] = np.frombuffer(
                np.array([gpa, 64 | (VRING_DESC_F_INDIRECT << 48)], np.uint64).tobytes(), np.uint8
            )
            descs = [(drv.ring.buf_gpa(SIZE - 2), 16, 0, VRING_DESC_F_INDIRECT | _flags(drv, 0))]
        start = drv.pos
        drv.write_descs(descs)
        deadline = time.monotonic() + 30
        if case == "id_in_use":  # seen by the worker: the held request completes (the queue stays broken)
            while not srv.connection.vrings[0].q[Q_ERROR]:
                assert time.monotonic() < deadline, "the reused id did not break the queue"
                time.sleep(0.002)
            dev.release(rnd, 1)
        while not any("vring 0 broken" in m for m in errors()):
            assert time.monotonic() < deadline, "the hostile ring did not break the queue"
            time.sleep(0.01)
        assert any(f"vring 0 broken: {CODE[case]}" in m for m in errors()), errors()
        for k, (_a, _l, _i, flags) in enumerate(descs):  # no used descriptor written over any of them
            assert int(drv.ring.desc[2 * ((start + k) % SIZE) + 1]) >> 48 == flags
    assert srv.ended()[-1][0]["error"] != 0
