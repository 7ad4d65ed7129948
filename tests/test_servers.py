"""Many front-ends in one process (``--socket-count``): every socket has a device and a control-plane thread of
its own, so one hostile front-end -- a broken ring, malformed messages, a message left half sent, replies never
read -- holds only its own socket while the others are answered and get exact counts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyvhost import backend
from pyvhost import protocol as P
from pyvhost.access import Metadata
from pyvhost.backend import Server
from pyvhost.devices.net import Mode, NetDevice
from pyvhost.frontend.net import Frontend
from pyvhost.metrics import ServerCollector
from pyvhost.protocol import Request as R
from pyvhost.servers import ServerGroup, socket_paths

GUESTS = 8
HOSTILE = 5  # the socket of the hostile front-end
PACKETS = 3000
TX = 1


def test_socket_paths():
    assert socket_paths("/run/net.sock", 1) == ["/run/net.sock"]
    assert socket_paths("/run/net.sock", 3) == ["/run/net.sock0", "/run/net.sock1", "/run/net.sock2"]
    with pytest.raises(ValueError):
        socket_paths("/run/net.sock", 0)


def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.01)


def fill_until_blocked(sock: socket.socket) -> int:
    """Send GET_FEATURES requests, never reading a reply, until the socket takes no more: the back-end's
    replies have filled its send buffer, so it is blocked writing one.  Returns how many were sent."""
    msg = P.HEADER.pack(R.GET_FEATURES, P.VHOST_USER_VERSION, 0)
    sent = 0
    while True:
        try:
            sock.send(msg, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return sent
        sent += 1


@pytest.mark.parametrize("metadata", list(Metadata))
def test_hostile_front_end_holds_only_its_own_socket(tmp_path: Path, monkeypatch, metadata):
    # a stalled peer is dropped after MESSAGE_TIMEOUT; here it is held for the whole test, so the others can
    # only finish if nothing of theirs waits for the hostile socket's thread
    monkeypatch.setattr(backend, "MESSAGE_TIMEOUT", 3600.0)
    paths = socket_paths(str(tmp_path / "net.sock"), GUESTS)
    devices = [NetDevice(Mode.SINK) for _ in paths]
    group = ServerGroup([Server(d, p, metadata) for d, p in zip(devices, paths)])
    serving = threading.Thread(target=group.serve, daemon=True)
    serving.start()
    hostile = Frontend(paths[HOSTILE], queue_size=64)
    stuck: socket.socket | None = None
    closed = False
    try:
        # 1. a ring that breaks: the avail index jumps past the queue size
        hostile.setup()
        ring = hostile.rings[TX]
        ring.avail[1] = (int(ring.avail[1]) + 1000) & 0xFFFF
        os.eventfd_write(ring.kick_fd, 1)
        conn = group.servers[HOSTILE].connection
        assert conn is not None
        wait_for(lambda: conn.vrings[TX].broken, "the hostile TX ring to break")
        # 2. malformed messages: an unknown request, then a payload size past the limit (the stream is unusable:
        # the connection ends)
        P.send_message(hostile.sock, 0x7FFF, b"")
        hostile.sock.send(P.HEADER.pack(R.SET_VRING_NUM, P.VHOST_USER_VERSION, 1 << 30))
        wait_for(lambda: len(group.servers[HOSTILE].history) == 1, "the malformed connection to end")
        hostile.close(stop_rings=False)
        closed = True
        # 3. replies never read, then a message left half sent: the socket's thread is held
        stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stuck.connect(paths[HOSTILE])
        assert fill_until_blocked(stuck) > 0
        stuck2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # waits in the hostile socket's backlog
        stuck2.connect(paths[HOSTILE])
        stuck2.send(P.HEADER.pack(R.SET_OWNER, P.VHOST_USER_VERSION, 0)[:5])
        stuck2.close()

        # the seven others, all at once: set up, transmit, stop, each counted exactly
        results: dict[int, dict] = {}
        failures: list[BaseException] = []

        def guest(i: int) -> None:
            try:
                with Frontend(paths[i], queue_size=64) as fe:
                    fe.setup()
                    fe.run("tx", count=PACKETS)
                    results[i] = fe.drain("tx")
                    results[i]["server"] = group.servers[i].stats()["live"][TX]
            except BaseException as e:
                failures.append(e)

        good = [i for i in range(GUESTS) if i != HOSTILE]
        threads = [threading.Thread(target=guest, args=(i,)) for i in good]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not failures, failures
        assert not any(t.is_alive() for t in threads), "a front-end did not finish"
        for i in good:
            assert results[i]["packets"] == PACKETS, (i, results[i])
            assert results[i]["server"]["packets"] == PACKETS, (i, results[i])
            assert results[i]["server"]["error"] == 0

        # the hostile connection is still held (its socket's thread blocked on it), nothing else is
        assert group.servers[HOSTILE].connection is not None
        assert group.threads[HOSTILE].is_alive()
        # the broken queue of the first hostile connection was reported, only there
        ended = group.servers[HOSTILE].history
        assert len(ended) == 1 and ended[0][TX]["error"] != 0
        wait_for(lambda: all(group.servers[i].connection is None for i in good), "the good connections to end")
        families = {m.name: m for m in ServerCollector(lambda: group.servers).collect()}
        up = {s.labels["socket"]: s.value for s in families["pyvhost_connection_up"].samples}
        assert up == {p: 1.0 if i == HOSTILE else 0.0 for i, p in enumerate(paths)}
        accepted = {s.labels["socket"]: s.value for s in families["pyvhost_connections"].samples}
        assert accepted == {p: 2.0 if i == HOSTILE else 1.0 for i, p in enumerate(paths)}
    finally:
        if stuck is not None:
            stuck.close()  # the held thread's write fails: its connection ends, the next (half sent) one too
        if not closed:
            hostile.close(stop_rings=False)
        group.stop()
        serving.join(30)
        assert not serving.is_alive(), "the group did not stop"
        group.close()
        for d in devices:
            d.close()
    for p in paths:
        assert not os.path.exists(p)


def test_cli_socket_count(tmp_path: Path):
    """``serve rng --socket-count 3`` serves sockets PATH0..PATH2, each a device of its own; ``serve blk`` refuses
    it (one image is one guest's disk)."""
    base = str(tmp_path / "rng.sock")
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvhost", "serve", "rng", "--socket-path", base, "--socket-count", "3"]
        + ["--connections", "1", "--ready-file", str(ready)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(ready.exists, "the ready file", timeout=120)
        for p in socket_paths(base, 3):  # one connection on each
            Frontend(p, num_queues=1, queue_size=16).close(stop_rings=False)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    final = json.loads(out.strip().splitlines()[-1])
    assert sorted(final["sockets"]) == socket_paths(base, 3)

    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    r = subprocess.run(
        [sys.executable, "-m", "pyvhost", "serve", "blk", "--file", str(img), "--socket-path", base]
        + ["--socket-count", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "--socket-count 2 refused" in r.stderr and "one process per image" in r.stderr


def test_fs_guests_share_the_fd_budget(tmp_path: Path):
    """``serve fs --socket-count N``: each guest's passthrough gets 1/N of the process's fd budget by default,
    so one guest holding every inode it may cannot starve the others."""
    from pyvhost.devices.fs_passthrough import Passthrough

    one, quarter = Passthrough(str(tmp_path)), Passthrough(str(tmp_path), share=4)
    try:
        assert quarter.max_inodes + quarter.max_handles <= (one.max_inodes + one.max_handles) // 4 + 1
        assert quarter.max_inodes > 0 and quarter.max_handles > 0
    finally:
        one.close()
        quarter.close()
