"""A real guest on ``pyvhost serve vsock``: QEMU (TCG) with ``vhost-user-vsock-pci`` (the guest CID from the
back-end's config space) and ``vsockcat`` (tools/guestkit/vsockcat.c, built static here: busybox has no vsock
client).  Guest to host: the guest connects to host port 5000 (the host peer listens on ``<uds-path>_5000``);
host to guest: a host process writes ``CONNECT 52`` to ``<uds-path>`` and reaches the guest's listener.  Each
sends 32 MiB and receives 32 MiB; both sides compare checksums.  Then 16 connections at once beside one whose host
peer stops reading, and the guest's transport driver unloaded and loaded again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "guestkit"))
import guestkit  # noqa: E402

from .conftest import assert_log_path, needs  # noqa: E402

CID = 3
SIZE = 32 << 20
GUEST_TIMEOUT = 300

pytestmark = [
    pytest.mark.vm,
    needs(guestkit.qemu_available(), "qemu-system-x86_64 missing: run `make deps`"),
    needs(shutil.which("gcc") is not None, "gcc missing (builds the guest's vsock client)"),
]

SCRIPT = f"""
dd if=/dev/urandom of=/tmp/up bs=1M count={SIZE >> 20} 2>/dev/null
echo "RESULT up=$(md5sum /tmp/up | cut -d' ' -f1)"
/vsockcat 2 5000 < /tmp/up > /tmp/down
echo "RESULT rc=$? down=$(md5sum /tmp/down | cut -d' ' -f1) downlen=$(wc -c < /tmp/down)"
"""


class VsockGuest(guestkit.Guest):
    """The kit's guest with a vhost-user-vsock device and /vsockcat in its initramfs."""

    client: bytes = b""
    packed = False  # packed virtqueues (packed=on)

    def device_args(self) -> list[str]:
        device = "vhost-user-vsock-pci,chardev=c0" + (",packed=on" if self.packed else "")
        return ["-chardev", f"socket,id=c0,path={self.socket_path}", "-device", device]

    def start(self) -> guestkit.Guest:
        archive = guestkit.script_archive(self.script)
        extra = guestkit.Cpio()
        extra.file("vsockcat", self.client, 0o755)
        initrd = Path(self._tmp) / "initrd.gz"
        initrd.write_bytes(self.kit.initrd.read_bytes() + archive + extra.finish())
        self.proc = subprocess.Popen(
            self.command(str(initrd)), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self


LISTEN_SCRIPT = f"""
dd if=/dev/urandom of=/tmp/up bs=1M count={SIZE >> 20} 2>/dev/null
echo "RESULT up=$(md5sum /tmp/up | cut -d' ' -f1)"
/vsockcat -l 52 < /tmp/up > /tmp/down 2>/tmp/err &
pid=$!
while ! grep -q listening /tmp/err; do usleep 100000; done
echo "RESULT listening=1"
wait $pid
echo "RESULT rc=$? down=$(md5sum /tmp/down | cut -d' ' -f1) downlen=$(wc -c < /tmp/down)"
"""


def exchange(c: socket.socket, down: bytes, host: dict) -> None:
    """The host's side: read the guest's data until it shuts its side, then send ``down`` and close."""
    got = hashlib.md5()
    n = 0
    while data := c.recv(1 << 16):
        got.update(data)
        n += len(data)
    host.update(up=got.hexdigest(), uplen=n)
    c.sendall(down)
    c.close()


def run(
    kit: guestkit.Kit, tmp_path: Path, script: str, host_side, packed: bool = False, metadata: str = "direct"
) -> tuple[dict, dict, bytes]:
    """Serve vsock on the ``metadata`` path, boot the guest with ``script`` (``packed``: on packed virtqueues);
    ``host_side(guest, uds, down, host)`` runs beside it."""
    client = tmp_path / "vsockcat"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(client), str(ROOT / "tools/guestkit/vsockcat.c")], check=True)
    uds = str(tmp_path / "vm.vsock")
    sock, log, ready = str(tmp_path / "vhost.sock"), tmp_path / "pyvhost.log", tmp_path / "ready"
    down = os.urandom(SIZE)
    host: dict = {}
    argv = [sys.executable, "-m", "pyvhost", "serve", "vsock", "--socket-path", sock, "--ready-file", str(ready)]
    argv += ["--metadata", metadata]
    proc = subprocess.Popen(
        [*argv, "--guest-cid", str(CID), "--uds-path", uds], stdout=subprocess.DEVNULL, stderr=open(log, "w")
    )
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        g = VsockGuest(kit, sock, script, workdir=str(tmp_path), memory_mb=256)
        g.client, g.packed = client.read_bytes(), packed
        with g:
            t = threading.Thread(target=host_side, args=(g, uds, down, host), daemon=True)
            t.start()
            g.wait(GUEST_TIMEOUT)
            t.join(30)
        r = dict(g.results)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    text = log.read_text()
    assert r.get("rc") == "0", g.tail(60) + text[-3000:]
    assert_log_path(text, metadata)
    starts = [ln for ln in text.splitlines() if "started (" in ln]
    assert starts and ("packed rings" if packed else "split rings") in starts[-1], starts
    assert "Traceback" not in text, text[-3000:]
    return r, host, down


def test_guest_connects_to_a_host_socket(kit, tmp_path):
    """The guest connects to host port 5000: the host peer listening on ``<uds-path>_5000`` answers -- on the
    copy path (the other cases run the direct one)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{tmp_path / 'vm.vsock'}_5000")
    listener.listen(1)

    def host_side(g, uds, down, host):
        listener.settimeout(GUEST_TIMEOUT)
        c, _ = listener.accept()
        exchange(c, down, host)

    try:
        r, host, down = run(kit, tmp_path, SCRIPT, host_side, metadata="copy")
    finally:
        listener.close()
    assert host == {"up": r["up"], "uplen": SIZE}, (host, r)
    assert r["down"] == hashlib.md5(down).hexdigest() and r["downlen"] == str(SIZE), r


def test_host_connects_to_the_guest(kit, tmp_path):
    """A host process connects to ``<uds-path>``, writes ``CONNECT 52``, reads ``OK <port>`` and talks to the
    guest's listener on port 52 -- on packed virtqueues (``packed=on``; the other cases run split ones)."""

    def host_side(g, uds, down, host):
        g.expect("listening", GUEST_TIMEOUT)
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(uds)
        c.sendall(b"CONNECT 52\n")
        line = b""
        while not line.endswith(b"\n") and len(line) < 64:
            line += c.recv(1)
        host["ok"] = line.decode().split()[0]
        exchange(c, down, host)

    r, host, down = run(kit, tmp_path, LISTEN_SCRIPT, host_side, packed=True)
    assert host == {"ok": "OK", "up": r["up"], "uplen": SIZE}, (host, r)
    assert r["down"] == hashlib.md5(down).hexdigest() and r["downlen"] == str(SIZE), r


CONNS, PER_CONN = 16, 2 << 20  # 32 MiB each way in all
RELOAD = "vmw_vsock_virtio_transport"
MANY_SCRIPT = f"""
dd if=/dev/urandom of=/tmp/up bs=1M count={PER_CONN >> 20} 2>/dev/null
echo "RESULT up=$(md5sum /tmp/up | cut -d' ' -f1)"
dd if=/dev/zero bs=1M count=4 2>/dev/null | /vsockcat 2 5001 > /dev/null &
stalled=$!
pids=
for i in $(seq {CONNS}); do /vsockcat 2 5000 < /tmp/up > /tmp/down$i & pids="$pids $!"; done
rc=0
for p in $pids; do wait $p || rc=1; done
echo "RESULT rc_many=$rc downs=$(md5sum /tmp/down* | cut -d' ' -f1 | sort | uniq -c | tr -s ' ' | tr ' ' :)"
kill $stalled; wait $stalled
rmmod {RELOAD} && echo "RESULT rmmod=ok"
insmod /lib/modules/{RELOAD}.ko && echo "RESULT insmod=ok"
head -c 262144 /tmp/up > /tmp/small
/vsockcat 2 5000 < /tmp/small > /tmp/down_after
echo "RESULT rc=$? after=$(md5sum /tmp/down_after | cut -d' ' -f1)"
"""


def test_many_connections_a_stalled_peer_and_a_driver_reload(kit, tmp_path):
    """16 guest connections at once, 2 MiB each way each (32 MiB in all, checksums on both sides), while a 17th
    whose host peer never reads stays stalled without holding them up; then the guest's transport driver is
    unloaded and loaded again, and a new connection works."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{tmp_path / 'vm.vsock'}_5000")
    listener.listen(CONNS + 1)
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.bind(f"{tmp_path / 'vm.vsock'}_5001")
    stuck.listen(1)
    peers: list[socket.socket] = []
    results: list[dict] = []
    small: dict = {}
    t0 = time.monotonic()

    def host_side(g, uds, down, host):
        stuck.settimeout(GUEST_TIMEOUT)
        peers.append(stuck.accept()[0])  # accepted, never read
        listener.settimeout(GUEST_TIMEOUT)
        threads = []
        for _ in range(CONNS):
            c, _ = listener.accept()
            results.append({})
            threads.append(threading.Thread(target=exchange, args=(c, down[:PER_CONN], results[-1]), daemon=True))
            threads[-1].start()
        for t in threads:
            t.join(GUEST_TIMEOUT)
        c, _ = listener.accept()  # after the driver reload
        exchange(c, down[: 256 << 10], small)

    try:
        r, _, down = run(kit, tmp_path, MANY_SCRIPT, host_side)
    finally:
        listener.close()
        stuck.close()
        for p in peers:
            p.close()
    took = time.monotonic() - t0
    assert r["rc_many"] == "0", r
    assert results == [{"up": r["up"], "uplen": PER_CONN}] * CONNS, (results, r)
    assert r["downs"] == f":{CONNS}:{hashlib.md5(down[:PER_CONN]).hexdigest()}", r
    assert r.get("rmmod") == "ok" and r.get("insmod") == "ok", r
    assert small["uplen"] == 256 << 10 and r["after"] == hashlib.md5(down[: 256 << 10]).hexdigest(), (small, r)
    print(f"{CONNS} connections x {PER_CONN >> 20} MiB each way, a stalled one, a driver reload: {took:.0f} s")
