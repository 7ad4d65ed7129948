"""``pyvhost bench --device vsock``: MB/s through ``pyvhost serve vsock`` over one connection and over 16 at once,
both ways, from a Linux guest (QEMU, TCG) running ``vsockcat`` (``tools/guestkit/vsockcat.c``, built static).

The host side times it: guest to host from a connection's accept to its end of file (bytes read by the host
peer), host to guest from the first byte offered to the last taken by the back-end (the guest's credit, 256 KiB
at most per connection, may still be on its way).  16 connections: all bytes over the time from the first start
to the last end.  The guest's vCPU (TCG) is the likely bound here, not the back-end: the figures are those of this
setup, and the back-end's CPU time per MiB says what the back-end spent.  Back-end and QEMU are pinned to
different CPUs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .fs import guestkit_module
from .peers import BACKEND_CPU, FRONTEND_CPU, cpu_seconds, pyvhost_cmd, stop, wait_for

CID = 3
ONE_MIB, MANY, MANY_MIB = 32, 16, 2  # one connection of 32 MiB; 16 of 2 MiB each
GUEST_TIMEOUT = 900.0
SCRIPT = f"""
dd if=/dev/urandom of=/tmp/up bs=1M count={ONE_MIB} 2>/dev/null
head -c {MANY_MIB << 20} /tmp/up > /tmp/up2
echo "RESULT ready=1"
/vsockcat 2 5000 < /tmp/up > /dev/null || echo "RESULT fail=one"
pids=
for i in $(seq {MANY}); do /vsockcat 2 5001 < /tmp/up2 > /dev/null & pids="$pids $!"; done
for p in $pids; do wait $p || echo "RESULT fail=many"; done
"""


@dataclass
class VsockRow:
    direction: str
    connections: int
    mbps: float
    mib: float
    run: int = 0
    cpu_ms_per_mib: float = 0.0
    note: str = ""


class Peer:
    """The host peers of one port: each connection's up (guest to host) and down (host to guest) spans."""

    def __init__(self, path: str, count: int, down: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(count)
        self.count, self.down = count, down
        self.up: list[tuple[float, float, int]] = []
        self.sent: list[tuple[float, float, int]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(GUEST_TIMEOUT)
        threads = []
        for _ in range(self.count):
            c, _ = self.sock.accept()
            threads.append(threading.Thread(target=self._one, args=(c, time.monotonic()), daemon=True))
            threads[-1].start()
        for t in threads:
            t.join(GUEST_TIMEOUT)

    def _one(self, c: socket.socket, t0: float) -> None:
        n = 0
        while data := c.recv(1 << 16):
            n += len(data)
        t1 = time.monotonic()
        self.up.append((t0, t1, n))
        c.sendall(self.down)
        self.sent.append((t1, time.monotonic(), len(self.down)))
        c.close()

    @staticmethod
    def rate(spans: list[tuple[float, float, int]]) -> tuple[float, float]:
        """(MB/s, MiB) over all ``spans``: bytes over first start to last end."""
        total = sum(n for _, _, n in spans)
        secs = max(e for _, e, _ in spans) - min(s for s, _, _ in spans) if spans else 0.0
        return (total / secs / 1e6 if secs > 0 else 0.0), total / (1 << 20)


def measure(gk, kit, client: bytes, run: int, workdir: Path) -> list[VsockRow]:
    """One guest boot: one connection, then 16; both ways."""

    class VsockGuest(gk.Guest):  # type: ignore[name-defined,misc]
        def device_args(self) -> list[str]:
            return ["-chardev", f"socket,id=c0,path={self.socket_path}", "-device", "vhost-user-vsock-pci,chardev=c0"]

    sock, uds, log = workdir / f"vsock-{run}.sock", str(workdir / f"vm{run}.vsock"), workdir / f"vsock-{run}.log"
    ready = workdir / f"vsock-{run}.ready"
    cmd = pyvhost_cmd("serve", "vsock", "--socket-path", str(sock), "--guest-cid", str(CID), "--uds-path", uds)
    proc = subprocess.Popen(
        [*cmd, "--cpu", str(BACKEND_CPU), "--ready-file", str(ready)], stdout=open(log, "w"), stderr=subprocess.STDOUT
    )
    rows: list[VsockRow] = []
    try:
        wait_for(ready, proc, 300.0, log)
        one = Peer(f"{uds}_5000", 1, os.urandom(ONE_MIB << 20))
        many = Peer(f"{uds}_5001", MANY, os.urandom(MANY_MIB << 20))
        guest = VsockGuest(kit, str(sock), "chmod 755 /vsockcat\n" + SCRIPT, workdir=str(workdir), memory_mb=512)
        guest.files = {"vsockcat": client}
        with guest:
            if (os.cpu_count() or 1) >= 2 and guest.proc is not None:
                subprocess.run(
                    ["taskset", "-a", "-p", "-c", str(FRONTEND_CPU), str(guest.proc.pid)], capture_output=True
                )
            guest.expect("ready", GUEST_TIMEOUT)
            c0 = cpu_seconds(proc.pid)
            one.thread.join(GUEST_TIMEOUT)
            c1 = cpu_seconds(proc.pid)
            many.thread.join(GUEST_TIMEOUT)
            c2 = cpu_seconds(proc.pid)
            guest.wait(GUEST_TIMEOUT)
        note = f"guest: {guest.results['fail']} failed" if "fail" in guest.results else ""
        for peer, cpu in ((one, c1 - c0), (many, c2 - c1)):
            for direction, spans in (("guest->host", peer.up), ("host->guest", peer.sent)):
                mbps, mib = Peer.rate(spans)
                rows.append(VsockRow(direction, peer.count, mbps, mib, run, cpu * 1e3 / max(1.0, 2 * mib), note))
    finally:
        stop(proc)
    return rows


def table(rows: list[VsockRow]) -> str:
    out = [f"{'direction':<12} {'conns':>5} {'MB/s (median)':>14} {'runs':>18} {'back-end CPU ms/MiB':>20}"]
    for direction in ("guest->host", "host->guest"):
        for conns in (1, MANY):
            rs = [r for r in rows if r.direction == direction and r.connections == conns]
            if not rs:
                continue
            runs = " ".join(f"{r.mbps:.1f}" for r in rs)
            cpu = statistics.median(r.cpu_ms_per_mib for r in rs)
            out.append(
                f"{direction:<12} {conns:>5} {statistics.median(r.mbps for r in rs):>14.1f} {runs:>18} {cpu:>20.2f}"
            )
    return "\n".join(out)


def main(a) -> int:
    gk = guestkit_module()
    kit = gk.build(log=print)
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SystemExit("bench --device vsock compiles vsockcat for the guest: gcc is missing")
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="pyvhost-bench-vsock-"))
    workdir.mkdir(parents=True, exist_ok=True)
    exe = workdir / "vsockcat"
    src = Path(str(gk.__file__)).parent / "vsockcat.c"
    subprocess.run([cc, "-O2", "-static", "-o", str(exe), str(src)], check=True, capture_output=True)
    rows: list[VsockRow] = []
    for run in range(a.runs):
        rows += measure(gk, kit, exe.read_bytes(), run, workdir)
    print(f"vsock through pyvhost, guest under QEMU TCG, load average {os.getloadavg()[0]:.2f}")
    print(table(rows))
    for r in rows:
        if r.note:
            print(f"run {r.run}: {r.note}")
    if a.json:
        Path(a.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 1 if any(r.note for r in rows) else 0
