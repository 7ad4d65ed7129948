"""A real guest on ``pyvhost serve vsock``: QEMU (TCG) with ``vhost-user-vsock-pci`` (the guest CID from the
back-end's config space); the guest connects to host port 5000 with ``vsockcat`` (tools/guestkit/vsockcat.c,
built static here: busybox has no vsock client), sends 4 MiB and receives 4 MiB from the host peer listening on
``<uds-path>_5000``; both sides compare checksums.
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
SIZE = 4 << 20
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

    def device_args(self) -> list[str]:
        return ["-chardev", f"socket,id=c0,path={self.socket_path}", "-device", "vhost-user-vsock-pci,chardev=c0"]

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


@pytest.fixture(scope="module")
def kit() -> guestkit.Kit:
    try:
        return guestkit.build(log=lambda s: None)
    except Exception as e:  # noqa: BLE001
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the guest kit cannot be built here ({e}); run tools/guestkit/build.sh")


def test_guest_connects_to_a_host_socket(kit, tmp_path):
    client = tmp_path / "vsockcat"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(client), str(ROOT / "tools/guestkit/vsockcat.c")], check=True)
    uds = str(tmp_path / "vm.vsock")
    sock, log, ready = str(tmp_path / "vhost.sock"), tmp_path / "pyvhost.log", tmp_path / "ready"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{uds}_5000")
    listener.listen(1)
    down = os.urandom(SIZE)
    host: dict = {}

    def peer() -> None:
        listener.settimeout(GUEST_TIMEOUT)
        c, _ = listener.accept()
        got = hashlib.md5()
        n = 0
        while data := c.recv(1 << 16):  # the guest's data until it shuts its side
            got.update(data)
            n += len(data)
        host.update(up=got.hexdigest(), uplen=n)
        c.sendall(down)
        c.close()

    t = threading.Thread(target=peer, daemon=True)
    t.start()
    argv = [sys.executable, "-m", "pyvhost", "serve", "vsock", "--socket-path", sock, "--ready-file", str(ready)]
    proc = subprocess.Popen(
        [*argv, "--guest-cid", str(CID), "--uds-path", uds], stdout=subprocess.DEVNULL, stderr=open(log, "w")
    )
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        g = VsockGuest(kit, sock, SCRIPT, workdir=str(tmp_path), memory_mb=256)
        g.client = client.read_bytes()
        with g:
            g.wait(GUEST_TIMEOUT)
        r = dict(g.results)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        listener.close()
    text = log.read_text()
    assert r.get("rc") == "0", g.tail(60) + text[-3000:]
    assert host == {"up": r["up"], "uplen": SIZE}, (host, r)
    assert r["down"] == hashlib.md5(down).hexdigest() and r["downlen"] == str(SIZE), r
    assert_log_path(text, "direct")
    assert "Traceback" not in text, text[-3000:]
