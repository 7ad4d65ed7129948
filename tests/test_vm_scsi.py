"""A real guest on ``pyvhost serve scsi``: QEMU (TCG) with ``vhost-user-scsi-pci`` (``vectors=0``, guest RAM in
a shared memfd); the guest's virtio_scsi and sd drivers find two LUNs (``/dev/sda`` and ``/dev/sdb``, in either
order), and the guest checks sizes, the VPD-derived settings (write cache, thin provisioning by UNMAP), writes
and reads back with O_DIRECT (checksums compared in the guest and with the image files), and trims an ext2
filesystem (``fstrim``: UNMAP punches holes in the image).  One boot per metadata path, and one on
packed virtqueues.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "guestkit"))
import guestkit  # noqa: E402

from .conftest import assert_log_path, needs  # noqa: E402

MiB = 1 << 20
SIZES = (64 * MiB, 32 * MiB)  # LUN 0, LUN 1
GUEST_TIMEOUT = 400
RAW_AT, RAW_MIB = 8, 8  # the O_DIRECT check: 8 MiB at 8 MiB on LUN 0
FILE_MIB = 12  # the file written to LUN 1's filesystem, then removed and trimmed
PROBE_POLLS = 600  # 0.1 s apart: how long the guest waits for a LUN's disk to show up
ERRORS = "error|fail|critical|abort|reset|timed out"

pytestmark = [
    pytest.mark.vm,
    needs(guestkit.qemu_available(), "qemu-system-x86_64 missing: run `make deps`"),
]

SCRIPT = f"""
for l in 0 1; do  # the disks probe asynchronously (scan, then sd): find each LUN's by its H:C:T:L, once there
  i=0
  while [ ! -e /sys/class/scsi_disk/0:0:0:$l/device/block ] && [ $i -lt {PROBE_POLLS} ]; do sleep 0.1; i=$((i+1)); done
  d=$(ls /sys/class/scsi_disk/0:0:0:$l/device/block 2>/dev/null)
  [ -n "$d" ] || {{ echo "RESULT missing=$l"; dmesg | tail -20; exit 1; }}
  eval D$l=$d
  echo "RESULT lun${{l}}_size=$(cat /sys/block/$d/size) lun${{l}}_ro=$(cat /sys/block/$d/ro)"
  wc=$(tr ' ' _ < /sys/block/$d/queue/write_cache)
  echo "RESULT lun${{l}}_vendor=$(cat /sys/block/$d/device/vendor) lun${{l}}_wc=$wc"
  echo "RESULT lun${{l}}_prov=$(cat /sys/class/scsi_disk/0:0:0:$l/provisioning_mode)"
  echo "RESULT lun${{l}}_discard=$(cat /sys/block/$d/queue/discard_max_bytes)"
done
echo "RESULT packed=$(cut -c35 /sys/bus/virtio/drivers/virtio_scsi/virtio*/features)"
dd if=/dev/urandom of=/tmp/a bs=1M count={RAW_MIB} 2>/dev/null
echo "RESULT a_md5=$(md5sum /tmp/a | cut -d' ' -f1)"
dd if=/tmp/a of=/dev/$D0 bs=1M seek={RAW_AT} oflag=direct 2>/dev/null || echo "RESULT dd_write=fail"
b=$(dd if=/dev/$D0 bs=1M skip={RAW_AT} count={RAW_MIB} iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
echo "RESULT b_md5=$b"
mke2fs -q /dev/$D1 >/dev/null 2>&1 || echo "RESULT mkfs=fail"
mkdir -p /mnt && mount -t ext4 /dev/$D1 /mnt || echo "RESULT mount=fail"
dd if=/dev/urandom of=/mnt/f bs=1M count={FILE_MIB} conv=fsync 2>/dev/null
echo "RESULT f_md5=$(md5sum /mnt/f | cut -d' ' -f1)"
umount /mnt && mount -t ext4 /dev/$D1 /mnt
echo "RESULT g_md5=$(md5sum /mnt/f | cut -d' ' -f1)"
rm /mnt/f && sync
echo "RESULT trimmed=$(fstrim -v /mnt 2>&1 | tr -cd '0-9')"
umount /mnt
sync
# errors of the storage stack (not the kernel's complaints about TCG's clock under load)
dmesg | grep -iE 'scsi|sd[a-z]|virtio|ext4|I/O' | grep -iE '{ERRORS}' | head -5
echo "RESULT errors=$(dmesg | grep -iE 'scsi|sd[a-z]|virtio|ext4|I/O' | grep -ciE '{ERRORS}')"
"""


class ScsiGuest(guestkit.Guest):
    """The kit's guest with a vhost-user-scsi device (``packed``: on packed virtqueues)."""

    packed = False

    def device_args(self) -> list[str]:
        return [
            "-chardev",
            f"socket,id=c0,path={self.socket_path}",
            "-device",
            "vhost-user-scsi-pci,chardev=c0,num_queues=1,vectors=0" + (",packed=on" if self.packed else ""),
        ]


class Target:
    """``pyvhost serve scsi`` on two images; its counters come from the line it prints at exit."""

    def __init__(self, tmp: Path, metadata: str) -> None:
        self.images = [tmp / f"lun{i}.img" for i in range(len(SIZES))]
        for path, size in zip(self.images, SIZES):
            with open(path, "wb") as f:
                f.truncate(size)
        self.sock = str(tmp / "scsi.sock")
        self.log, self.out, ready = tmp / "scsi.log", tmp / "scsi.out", tmp / "scsi.ready"
        luns = [a for i, p in enumerate(self.images) for a in ("--lun", f"{i}:{p}")]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyvhost", "serve", "scsi", "--socket-path", self.sock, "--metadata", metadata]
            + ["--ready-file", str(ready), *luns],
            stdout=open(self.out, "w"),
            stderr=open(self.log, "w"),
        )
        deadline = time.monotonic() + 240  # a cold kernel compile may come first
        while not ready.exists():
            assert self.proc.poll() is None, f"back-end exited:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, "back-end not ready"
            time.sleep(0.05)

    def stop(self) -> dict:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        lines = self.out.read_text().splitlines()
        return json.loads(lines[-1])["scsi"] if lines else {}

    def md5(self, lun: int, offset: int, n: int) -> str:
        with open(self.images[lun], "rb") as f:
            f.seek(offset)
            return hashlib.md5(f.read(n)).hexdigest()


@pytest.mark.parametrize("metadata,ring", [("direct", "split"), ("copy", "split"), ("direct", "packed")])
def test_guest_two_luns_odirect_and_fstrim(kit, tmp_path, metadata, ring):
    t = Target(tmp_path, metadata)
    started = time.monotonic()
    try:
        guest = ScsiGuest(kit, t.sock, SCRIPT, workdir=str(tmp_path), memory_mb=384)
        guest.packed = ring == "packed"
        with guest as g:
            g.wait(GUEST_TIMEOUT)
        r = dict(g.results)
    finally:
        stats = t.stop()
    took = time.monotonic() - started
    log = t.log.read_text()
    assert r.get("exit") == "0", g.tail(60)
    assert r["packed"] == ("1" if ring == "packed" else "0"), "VIRTIO_F_RING_PACKED as asked"
    assert (int(r["lun0_size"]) * 512, int(r["lun1_size"]) * 512) == SIZES, r
    assert r["lun0_ro"] == r["lun1_ro"] == "0" and r["lun0_vendor"] == r["lun1_vendor"] == "PYVHOST", r
    assert r["lun0_wc"] == "write_back" and r["lun0_prov"] == r["lun1_prov"] == "unmap", r
    assert int(r["lun0_discard"]) > 0 and int(r["lun1_discard"]) > 0, r
    assert "dd_write" not in r and "mkfs" not in r and "mount" not in r, g.tail(60)
    assert r["a_md5"] == r["b_md5"] == t.md5(0, RAW_AT * MiB, RAW_MIB * MiB), r
    assert r["f_md5"] == r["g_md5"], r
    assert int(r["trimmed"]) >= FILE_MIB * MiB, r
    assert stats["unmap"] >= 1 and stats["write_bytes"] >= (RAW_MIB + FILE_MIB) * MiB, stats
    # the removed file's blocks were punched out of LUN 1's image
    assert os.stat(t.images[1]).st_blocks * 512 < FILE_MIB * MiB, os.stat(t.images[1])
    assert r["errors"] == "0", g.tail(60)
    assert_log_path(log, metadata)
    starts = [ln for ln in log.splitlines() if "started (" in ln]
    # the last start is Linux's (SeaBIOS's driver before it is split-only)
    assert starts and f"{ring} rings" in starts[-1], starts
    assert "Traceback" not in log, log[-3000:]
    print(f"{metadata} {ring}: guest run {took:.0f} s; {stats}")
