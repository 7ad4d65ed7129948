"""A real guest on ``pyvhost serve blk``: QEMU (TCG) runs a Debian kernel whose virtio-blk (``vhost-user-blk-pci``,
``vectors=0``, guest RAM in a shared memfd) is served by pyvhost, with ``-chardev socket,...,reconnect=1`` so that
QEMU reconnects to a restarted back-end and gives it the inflight area back.

The guest kit (kernel, virtio modules, busybox initramfs) comes from ``tools/guestkit`` (``make deps`` builds it).
The guest learns that the test wants it to go on by reading a marker the test writes into the image's last
sector (it drops its page cache and reads it again until the marker is there).
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pyvhost.ring import inflight as INF

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "guestkit"))
import guestkit  # noqa: E402

from .conftest import assert_log_path, needs  # noqa: E402

MiB = 1 << 20
IMAGE = 128 * MiB
LAST = IMAGE // 512 - 1
GUEST_TIMEOUT = 300

pytestmark = [
    pytest.mark.vm,
    needs(guestkit.qemu_available(), "qemu-system-x86_64 missing: run `make deps`"),
]

PRELUDE = f"""
go() {{  # go WORD: wait until the test has written WORD into the last sector
  while true; do
    echo 3 > /proc/sys/vm/drop_caches
    v=$(dd if=/dev/vda bs=512 skip={LAST} count=1 2>/dev/null | head -c ${{#1}})
    [ "$v" = "$1" ] && break
    sleep 0.2
  done
  echo "RESULT go=$1"
}}
ioerrs() {{ echo "RESULT ioerr=$(dmesg | grep -c -i 'error')"; }}
"""


class BlkGuest(guestkit.Guest):
    """The kit's guest with a vhost-user-blk device instead of virtio-net."""

    def command(self, initrd: str) -> list[str]:
        chardev = f"socket,id=c0,path={self.socket_path}" + (",reconnect=1" if self.reconnect else "")
        m = self.memory_mb
        return [
            guestkit.QEMU,
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            "1",
            "-m",
            str(m),
            "-object",
            f"memory-backend-memfd,id=mem,size={m}M,share=on",
            "-numa",
            "node,memdev=mem",
            "-chardev",
            chardev,
            "-device",
            "vhost-user-blk-pci,chardev=c0,num-queues=1,vectors=0"
            + (f",{self.device_opts}" if self.device_opts else ""),
            "-kernel",
            str(self.kit.kernel),
            "-initrd",
            initrd,
            "-append",
            f"console=ttyS0 quiet panic=-1 oops=panic {self.append}".strip(),
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            *self.extra_args,
        ]


class Disk:
    """The image, the socket, and ``pyvhost serve blk`` on them (started, killed and restarted by the test)."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.tmp = tmp
        self.image = tmp / "disk.img"
        with open(self.image, "wb") as f:
            f.truncate(IMAGE)
        self.sock = str(tmp / "vhost-blk.sock")
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.logs: list[Path] = []

    def start(self) -> None:
        log = self.tmp / f"backend-{len(self.logs) + 1}.log"
        self.logs.append(log)
        ready = self.tmp / f"ready-{len(self.logs)}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pyvhost",
                "serve",
                "blk",
                "--socket-path",
                self.sock,
                "--file",
                str(self.image),
                "--ready-file",
                str(ready),
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(log, "w"),
        )
        deadline = time.monotonic() + 240  # a cold kernel compile may come first
        while not ready.exists():
            assert self.proc.poll() is None, f"back-end exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, "back-end not ready"
            time.sleep(0.05)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def wait_log(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.logs[-1].read_text():
            assert self.proc is not None and self.proc.poll() is None, self.logs[-1].read_text()
            assert time.monotonic() < deadline, f"no {text!r} in the back-end's log:\n{self.logs[-1].read_text()}"
            time.sleep(0.05)

    def in_flight(self) -> int:
        """Requests the running back-end has taken and not completed, read from its inflight area (QEMU's
        SET_INFLIGHT_FD memfd, found in the back-end's mappings); 0 before QEMU gave one."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/maps") as f:
            ranges = [line.split()[0] for line in f if "memfd:pyvhost-inflight" in line]
        if not ranges:
            return 0
        with open(f"/proc/{self.proc.pid}/map_files/{ranges[0]}", "rb") as f:
            buf = np.frombuffer(bytearray(f.read()), np.uint8)
        size = int(buf.view(np.uint16)[INF.U16_DESC_NUM])  # the queue size the back-end recorded
        return len(INF.QueueRegion(buf, size).inflight_heads()) if size else 0

    def kill9_in_flight(self, timeout: float = GUEST_TIMEOUT) -> int:
        """SIGKILL the back-end as soon as it holds requests in flight; how many it held just before."""
        deadline = time.monotonic() + timeout
        while not (n := self.in_flight()):
            assert self.proc is not None and self.proc.poll() is None, self.logs[-1].read_text()
            assert time.monotonic() < deadline, "the back-end never held a request in flight"
            time.sleep(0.01)
        self.kill9()
        return n

    def mark(self, word: str) -> None:
        with open(self.image, "r+b") as f:  # through the page cache the back-end reads from
            f.seek(LAST * 512)
            f.write(word.encode().ljust(512, b"\0"))

    def md5(self, nbytes: int) -> str:
        with open(self.image, "rb") as f:
            return hashlib.md5(f.read(nbytes)).hexdigest()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def disk(tmp_path: Path):
    made: list[Disk] = []

    def make(*args: str) -> Disk:
        d = Disk(tmp_path, *args)
        made.append(d)
        d.start()
        return d

    yield make
    for d in made:
        d.stop()


@pytest.mark.parametrize("metadata", ["direct", "copy"])
def test_guest_on_packed_ring(kit, disk, tmp_path, metadata):
    """``vhost-user-blk-pci,packed=on``: the guest's driver negotiates VIRTIO_F_RING_PACKED and the back-end
    (four I/O threads: requests complete out of order) serves it.  The guest writes 16 MiB of random data with
    fsync, drops its cache and reads it back in four parallel streams: same checksum in the guest and in the
    file, no I/O error; the back-end logs the guest's ring start as packed and, at most once, that inflight
    tracking is split-ring only."""
    d = disk("--io-threads", "4", "--metadata", metadata)
    script = (
        PRELUDE
        + """
echo "RESULT size=$(cat /sys/block/vda/size) ro=$(cat /sys/block/vda/ro) serial=$(cat /sys/block/vda/serial)"
echo "RESULT packed=$(cut -c35 /sys/block/vda/device/features)"
dd if=/dev/urandom of=/tmp/a bs=1M count=16 2>/dev/null
echo "RESULT a_md5=$(md5sum /tmp/a | cut -d' ' -f1)"
dd if=/tmp/a of=/dev/vda bs=1M conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
for i in 0 1 2 3; do dd if=/dev/vda of=/tmp/p$i bs=1M skip=$((i * 4)) count=4 2>/dev/null & done
wait
echo "RESULT b_md5=$(cat /tmp/p0 /tmp/p1 /tmp/p2 /tmp/p3 | md5sum | cut -d' ' -f1)"
ioerrs
"""
    )
    with BlkGuest(kit, d.sock, script, workdir=str(tmp_path), device_opts="packed=on") as g:
        g.wait(GUEST_TIMEOUT)
    r = g.results
    assert r.get("exit") == "0", g.tail()
    assert r["size"] == str(IMAGE // 512) and r["ro"] == "0" and r["serial"] == "disk.img"
    assert r["packed"] == "1", "the guest did not negotiate VIRTIO_F_RING_PACKED"
    assert r["b_md5"] == r["a_md5"] == d.md5(16 * MiB)
    assert r["ioerr"] == "0", g.tail()
    log = d.logs[-1].read_text()
    assert_log_path(log, metadata)
    starts = [line for line in log.splitlines() if "started (" in line]
    assert starts and "packed rings" in starts[-1], starts  # (the firmware's driver, before Linux, is split-only)
    assert log.count("inflight tracking is split-ring only") <= 1
    assert "broken" not in log, log[-2000:]


def test_guest_data_reads_back_after_backend_kill9(kit, disk, tmp_path):
    """The guest writes 16 MiB of random data with fsync; the back-end (one I/O thread, 20 ms per request)
    is killed (-9) while its inflight area shows requests taken and not completed, and restarted; QEMU
    reconnects and the restarted back-end resubmits them; the guest drops its cache and reads the data back:
    same checksum, in the guest and in the file."""
    d = disk("--io-threads", "1", "--io-delay-ms", "20")
    script = (
        PRELUDE
        + """
echo "RESULT size=$(cat /sys/block/vda/size) ro=$(cat /sys/block/vda/ro) serial=$(cat /sys/block/vda/serial)"
dd if=/dev/urandom of=/tmp/a bs=1M count=16 2>/dev/null
echo "RESULT a_md5=$(md5sum /tmp/a | cut -d' ' -f1)"
echo "RESULT writing=1"
dd if=/tmp/a of=/dev/vda bs=1M conv=fsync 2>/dev/null
echo "RESULT written=1"
go GO1
echo "RESULT b_md5=$(dd if=/dev/vda bs=1M count=16 2>/dev/null | md5sum | cut -d' ' -f1)"
ioerrs
"""
    )
    with BlkGuest(kit, d.sock, script, reconnect=True, workdir=str(tmp_path)) as g:
        g.expect("writing", GUEST_TIMEOUT)
        assert g.results["size"] == str(IMAGE // 512) and g.results["ro"] == "0"
        assert g.results["serial"] == "disk.img"
        assert_log_path(d.logs[-1].read_text(), "direct")
        held = d.kill9_in_flight()
        assert "written" not in g.results, "the write finished before the kill"
        d.start()
        d.wait_log("queues (0,) started")  # QEMU reconnected and restarted the ring
        assert_log_path(d.logs[-1].read_text(), "direct")
        g.expect("written", GUEST_TIMEOUT)
        d.mark("GO1")
        g.wait(GUEST_TIMEOUT)
    r = g.results
    assert r.get("exit") == "0", g.tail()
    assert r["b_md5"] == r["a_md5"] == d.md5(16 * MiB)
    assert r["ioerr"] == "0", g.tail()
    assert held > 0 and "resubmitting" in d.logs[-1].read_text(), "the restart found no request in flight"


def test_guest_write_stream_survives_three_backend_kill9(kit, disk, tmp_path):
    """The guest writes 64 MiB (buffered, then fsync: many requests in flight) while the back-end -- one I/O
    thread, 60 ms per request, so that it always holds requests it has not finished -- is killed three times
    and restarted; QEMU reconnects each time and the back-end resubmits what was in flight.  Every byte
    lands: the guest reads back what it wrote, the file holds it, and no I/O error reached the guest."""
    d = disk("--io-threads", "1", "--io-delay-ms", "60")
    script = (
        PRELUDE
        + """
dd if=/dev/urandom of=/tmp/a bs=1M count=64 2>/dev/null
echo "RESULT a_md5=$(md5sum /tmp/a | cut -d' ' -f1)"
echo "RESULT writing=1"
dd if=/tmp/a of=/dev/vda bs=1M conv=fsync 2>/dev/null
echo "RESULT written=$(now)"
echo 3 > /proc/sys/vm/drop_caches
echo "RESULT b_md5=$(dd if=/dev/vda bs=1M count=64 2>/dev/null | md5sum | cut -d' ' -f1)"
ioerrs
""".replace("$(now)", "1")
    )
    with BlkGuest(kit, d.sock, script, reconnect=True, workdir=str(tmp_path)) as g:
        g.expect("writing", GUEST_TIMEOUT)
        kills = 0
        for _ in range(3):
            if "written" in g.results:
                break
            d.kill9_in_flight()  # the stream needs more than 3 s of the back-end's time (>= 50 requests)
            kills += 1
            d.start()
            d.wait_log("queues (0,) started")
            assert_log_path(d.logs[-1].read_text(), "direct")
        g.wait(GUEST_TIMEOUT)
    r = g.results
    assert r.get("exit") == "0", g.tail()
    assert kills == 3, "the write stream ended before the third kill"
    assert r["b_md5"] == r["a_md5"] == d.md5(64 * MiB)
    assert r["ioerr"] == "0", g.tail()
    resubmitted = [log.read_text().count("resubmitting") for log in d.logs[1:]]
    assert all(resubmitted), f"a restart found no request in flight: {resubmitted}"
