"""A front-end that truncates a region's backing file while it is mapped (issue 16, item 7).

The next access of the back-end to a page past the new end raises SIGBUS.  The guard (pyvhost/sigbus.py, a C
handler installed at server start) maps a zero page over it and flags the connection's arena; the server then
ends that connection with "region N backing file truncated" and serves the next one.  Shown against a
``pyvhost serve net`` subprocess (so a SIGBUS that got through is a dead process), with a memfd and a regular
file, on both metadata paths, during traffic from pyvhost's own front-end.  A fault outside every arena keeps
the default disposition: the process dies of SIGBUS as before.
"""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pyvhost.frontend.net import Frontend
from pyvhost.frontend.ram import GPA_BASE, GuestRam
from pyvhost.frontend.split import D_DONE, drive_rx

RAM = 4 << 20
STARTUP = 300.0  # the server compiles (or loads) its kernels first
DEADLINE = 60.0
SIGBUS_STATUS = -signal.SIGBUS


class FileRam(GuestRam):
    """Guest RAM in a regular file (as QEMU's memory-backend-file), instead of a memfd."""

    def __init__(self, path: Path, size: int) -> None:
        self.size = size
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(self.fd, size)
        self.mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.buf = np.frombuffer(self.mm, dtype=np.uint8)
        self.uva_base = self.buf.ctypes.data
        self.gpa_base = GPA_BASE
        self.top = 0
        self.split(1)


class Server:
    """``pyvhost -v serve net`` in a subprocess, its log in a file."""

    def __init__(self, tmp: Path, metadata: str, mode: str = "source") -> None:
        self.sock = str(tmp / "vhost.sock")
        self.log_path = tmp / "server.log"
        ready = tmp / "ready"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pyvhost",
                "-v",
                "serve",
                "net",
                "--mode",
                mode,
                "--metadata",
                metadata,
                "--socket-path",
                self.sock,
                "--ready-file",
                str(ready),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log_path, "w"),
        )
        deadline = time.monotonic() + STARTUP
        while not ready.exists():
            assert self.proc.poll() is None, f"server exited: {self.log()}"
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, text: str, count: int = 1) -> None:
        deadline = time.monotonic() + DEADLINE
        while self.log().count(text) < count:
            assert self.proc.poll() is None, f"server died (status {self.proc.returncode}):\n{self.log()}"
            assert time.monotonic() < deadline, f"no {text!r} in the server log:\n{self.log()}"
            time.sleep(0.02)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def receive(fe: Frontend, stop: threading.Event) -> None:
    """The RX driver loop until ``stop``: it touches ring 0's descriptors, avail and used ring, never a buffer."""
    ring = fe.rings[0]
    gpa = ring.buf_gpa(0)
    while not stop.is_set():
        drive_rx(*ring.views(), gpa, 16)


def wait_done(fe: Frontend, ring: int, more_than: int) -> int:
    deadline = time.monotonic() + DEADLINE
    while int(fe.rings[ring].d[D_DONE]) <= more_than:
        assert time.monotonic() < deadline, "no completion"
        time.sleep(0.001)
    return int(fe.rings[ring].d[D_DONE])


@pytest.mark.parametrize("metadata", ["copy", "direct"])
@pytest.mark.parametrize("backing", ["memfd", "file"])
def test_truncated_region_file_ends_the_connection_not_the_process(tmp_path, metadata, backing):
    srv = Server(tmp_path, metadata)
    try:
        fe = Frontend(srv.sock, ram_size=RAM, seal_memory=False)
        if backing == "file":
            fe.ram.close()
            fe.ram = FileRam(tmp_path / "guest-ram", RAM)
        fe.setup()
        srv.wait_log(f"queues (0,) started ({metadata} path")
        rx = fe.rings[0]
        # The driver only touches ring 0's descriptors, avail and used ring; the back-end writes the frames into
        # ring 0's buffers, which come after them: cut the file there, mid-traffic.
        stop = threading.Event()
        traffic = threading.Thread(target=receive, args=(fe, stop), daemon=True)
        traffic.start()
        try:
            wait_done(fe, 0, 1000)
            os.ftruncate(fe.ram.fd, rx.bufs_off)
            srv.wait_log("region 0 backing file truncated")
            srv.wait_log("connection closed")
            assert srv.proc.poll() is None
        finally:
            stop.set()
            traffic.join(DEADLINE)
        assert not traffic.is_alive()
        fe.close(stop_rings=False)
        # the server serves the next front-end
        with Frontend(srv.sock, ram_size=RAM) as fe2:
            fe2.setup()
            r = fe2.run("rx", count=1000, timeout=DEADLINE)
            assert r["packets"] == 1000 and r["len_errors"] == 0
        srv.wait_log("connection closed", 2)
    finally:
        status = srv.stop()
    log = srv.log()
    assert status == 0, log
    assert "region 0 backing file truncated" in log and "closing the connection" in log
    assert log.count("front-end connected") == 2
    assert "Traceback" not in log


GUARD_SCRIPT = textwrap.dedent("""
    import mmap, os, sys
    from pyvhost import sigbus
    from pyvhost.memory import SPACE_GPA, GuestMemory
    from pyvhost.protocol import MemRegion

    sigbus.install()
    where = sys.argv[1]
    fd = os.memfd_create("pyvhost-sigbus", os.MFD_CLOEXEC)
    os.ftruncate(fd, 1 << 20)
    if where == "arena":
        mem = GuestMemory(arena_size=1 << 30)
        mem.add_region(MemRegion(0x1000_0000, 1 << 20, 0x7000_0000, 0), fd)
        view = mem.view(SPACE_GPA, 0x1000_0000, 1 << 20)
        view[:] = 7
        os.ftruncate(fd, 4096)
        assert view[:4096].sum() == 7 * 4096
        assert view[8192:8192 + 4096].sum() == 0  # a truncated page reads zero, it does not kill
        view[3 * 4096] = 1  # and writes go to the zero page
        print(mem.bus_fault())
    else:
        m = mmap.mmap(fd, 1 << 20)
        os.ftruncate(fd, 0)
        print(m[8192])  # not an arena: the default disposition
""")


@pytest.mark.parametrize("where", ["arena", "elsewhere"])
def test_guard_recovers_only_inside_an_arena(where):
    p = subprocess.run([sys.executable, "-c", GUARD_SCRIPT, where], capture_output=True, text=True, timeout=120)
    if where == "arena":
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith("region 0 backing file truncated"), p.stdout
        assert "2 fault(s)" in p.stdout, p.stdout
    else:
        assert p.returncode == SIGBUS_STATUS, (p.returncode, p.stderr)
