"""A real guest on ``pyvhost serve fs``: QEMU (TCG) with ``vhost-user-fs-pci`` (guest RAM in a shared memfd)
mounts the tag (``mount -t virtiofs``) and runs a file workload; the same workload on QEMU's own
``/usr/lib/qemu/virtiofsd`` gives the same results, and the in-memory filesystem of docs/fs.md (Python, served
with ``--ops``) is mounted by a guest too.

The guest kit (kernel, virtio and virtiofs modules, busybox initramfs) comes from ``tools/guestkit``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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

TAG = "hostshare"
MiB = 1 << 20
BIG_MB = 64
FILES = 10000
GUEST_TIMEOUT = 600
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"

pytestmark = [
    pytest.mark.vm,
    needs(guestkit.qemu_available(), "qemu-system-x86_64 missing: run `make deps`"),
]

#: the file workload; every RESULT but the timings is compared between back-ends
WORKLOAD = f"""
cd /mnt || exit 1
echo hello > a.txt
echo "RESULT a=$(cat a.txt)"
mv a.txt b.txt
echo "RESULT renamed=$([ -e a.txt ] && echo no || echo yes) b=$(cat b.txt)"
mkdir -p d/e && rmdir d/e
echo "RESULT rmdir=$([ -e d/e ] && echo no || echo yes)"
ln -s ../b.txt d/sl
echo "RESULT symlink=$(readlink d/sl) via=$(cat d/sl)"
ln b.txt d/hl
echo "RESULT links=$(stat -c %h b.txt)"
chmod 640 b.txt
echo "RESULT mode=$(stat -c %a b.txt)"
truncate -s 3 b.txt
echo "RESULT truncated=$(cat b.txt) size=$(stat -c %s d/hl)"
dd if=/dev/urandom of=/tmp/big bs=1M count={BIG_MB} 2>/dev/null
echo "RESULT big_md5=$(md5sum /tmp/big | cut -d' ' -f1)"
dd if=/tmp/big of=big.bin bs=1M conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
echo "RESULT big_back=$(md5sum big.bin | cut -d' ' -f1)"
dd if=big.bin of=/dev/null bs=4k skip=1000 count=10 2>/dev/null && echo "RESULT seek_read=ok"
md5sum big.bin > /tmp/c1 & md5sum big.bin > /tmp/c2 & md5sum big.bin > /tmp/c3; wait
echo "RESULT concurrent=$(cat /tmp/c1 /tmp/c2 /tmp/c3 | cut -d' ' -f1 | sort -u | wc -l)"
mkdir many
i=0; while [ $i -lt {FILES} ]; do echo $i > many/f$i; i=$((i+1)); done
echo "RESULT listed=$(ls many | wc -l) sum=$(cat many/* | awk '{{s+=$1}} END {{print s}}')"
rm many/f1 many/f2
echo "RESULT listed2=$(ls many | wc -l)"
echo "RESULT abs=$(readlink abs) abs_read=$(cat abs 2>/dev/null | head -c 4 | wc -c)"
echo "RESULT dotdot=$(ls /mnt/.. | grep -c hostshare-marker)"
rm -r many d
rm b.txt
echo "RESULT left=$(ls | sort | tr '\\n' ,)"
sync
cd /
umount /mnt && echo "RESULT umount=ok"
"""

SCRIPT = (
    f"""
mkdir -p /mnt
mount -t virtiofs {TAG} /mnt || {{ echo "RESULT mount=fail"; dmesg | tail -5; exit 1; }}
echo "RESULT mount=ok"
"""
    + WORKLOAD
)


class FsGuest(guestkit.Guest):
    """The kit's guest with a vhost-user-fs device instead of virtio-net (``packed``: on packed virtqueues)."""

    packed = False

    def device_args(self) -> list[str]:
        return [
            "-chardev",
            f"socket,id=c0,path={self.socket_path}",
            "-device",
            f"vhost-user-fs-pci,chardev=c0,tag={TAG},queue-size=128,vectors=0" + (",packed=on" if self.packed else ""),
        ]


class Backend:
    """A vhost-user-fs back-end process on a socket (pyvhost or virtiofsd), stopped at the end."""

    def __init__(self, tmp: Path, name: str, argv: list[str], ready: Path | None, env: dict | None = None) -> None:
        self.sock = str(tmp / f"{name}.sock")
        self.log = tmp / f"{name}.log"
        self.proc = subprocess.Popen(
            [a.replace("@SOCK@", self.sock) for a in argv],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "w"),
            env=env,
        )
        deadline = time.monotonic() + 240  # a cold kernel compile may come first
        while not (ready.exists() if ready else os.path.exists(self.sock)):
            assert self.proc.poll() is None, f"back-end exited:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, "back-end not ready"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def pyvhost(tmp: Path, *args: str, env: dict | None = None) -> Backend:
    ready = tmp / "ready"
    argv = [sys.executable, "-m", "pyvhost", "serve", "fs", "--socket-path", "@SOCK@", "--tag", TAG]
    return Backend(tmp, "pyvhost", [*argv, "--ready-file", str(ready), *args], ready, env)


def virtiofsd(tmp: Path, shared: Path) -> Backend:
    argv = [VIRTIOFSD, "--socket-path=@SOCK@", "-o", f"source={shared}", "-o", "cache=auto", "-o", "sandbox=chroot"]
    return Backend(tmp, "virtiofsd", argv, None)


def make_share(tmp: Path, name: str) -> Path:
    """A shared directory with a symlink out and a marker beside it (which the guest must not see)."""
    base = tmp / name
    shared = base / "share"
    shared.mkdir(parents=True)
    os.symlink("/etc/passwd", shared / "abs")
    (base / "hostshare-marker").write_text("outside")
    return shared


def run_guest(kit: guestkit.Kit, sock: str, script: str, tmp: Path, packed: bool = False) -> dict[str, str]:
    guest = FsGuest(kit, sock, script, workdir=str(tmp), memory_mb=512)
    guest.packed = packed
    with guest as g:
        g.wait(GUEST_TIMEOUT)
    r = dict(g.results)
    assert r.get("exit") == "0", g.tail(60)
    return r


def workload_results(r: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in r.items() if k not in ("boot", "uptime", "exit", "done")}


def file_md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes()).hexdigest()


@needs(os.path.exists(VIRTIOFSD), f"{VIRTIOFSD} missing (Debian's qemu-system-common)")
def test_guest_workload_same_as_virtiofsd(kit, tmp_path):
    """The workload on pyvhost's passthrough, then on virtiofsd: the same results; the data the guest wrote
    reached the host's file (its checksum compared there), nothing outside the shared directory changed."""
    script = SCRIPT.replace("rm b.txt\n", "rm b.txt\ncp big.bin big.keep\n")
    results = {}
    for name in ("pyvhost", "virtiofsd"):
        shared = make_share(tmp_path, name)
        outside_before = sorted(os.listdir(shared.parent))
        be = pyvhost(tmp_path, "--shared-dir", str(shared)) if name == "pyvhost" else virtiofsd(tmp_path, shared)
        try:
            r = run_guest(kit, be.sock, script, tmp_path)
        finally:
            be.stop()
        if name == "pyvhost":
            assert_log_path(be.log.read_text(), "direct")
            assert "Traceback" not in be.log.read_text(), be.log.read_text()[-3000:]
        assert r["mount"] == "ok" and r["umount"] == "ok", r
        assert r["big_back"] == r["big_md5"] == file_md5(shared / "big.keep"), r  # the host's copy too
        assert r["listed"] == str(FILES) and r["listed2"] == str(FILES - 2), r
        assert r["concurrent"] == "1" and r["dotdot"] == "0" and r["abs_read"] == "0", r
        assert sorted(os.listdir(shared.parent)) == outside_before
        results[name] = workload_results(r)
    for k in ("big_md5", "big_back"):  # random data: equal within each run, not across
        results["pyvhost"].pop(k)
        results["virtiofsd"].pop(k)
    assert results["pyvhost"] == results["virtiofsd"]


MEMFS_WORKLOAD = f"""
mkdir -p /mnt
mount -t virtiofs {TAG} /mnt || {{ echo "RESULT mount=fail"; exit 1; }}
cd /mnt
mkdir docs
echo hello > docs/a.txt
echo "RESULT a=$(cat docs/a.txt)"
dd if=/dev/urandom of=/tmp/big bs=1M count=4 2>/dev/null
cp /tmp/big docs/big
echo 3 > /proc/sys/vm/drop_caches
echo "RESULT big=$(md5sum /tmp/big | cut -d' ' -f1) back=$(md5sum docs/big | cut -d' ' -f1)"
i=0; while [ $i -lt 200 ]; do : > docs/f$i; i=$((i+1)); done
echo "RESULT listed=$(ls docs | wc -l)"
truncate -s 2 docs/a.txt
echo "RESULT truncated=$(cat docs/a.txt)"
rm docs/f*
rm docs/a.txt docs/big
rmdir docs
echo "RESULT left=$(ls | wc -l)"
cd /
umount /mnt && echo "RESULT umount=ok"
"""


def test_guest_mounts_the_python_memfs(kit, tmp_path):
    """The in-memory filesystem of docs/fs.md, extracted and served with ``--ops``, mounted by a guest -- on
    packed virtqueues (``packed=on``; the other guests here run split ones)."""
    code = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "fs.md").read_text(), re.S)[0]
    (tmp_path / "memfs.py").write_text(code)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    be = pyvhost(tmp_path, "--ops", "memfs:MemFS", env=env)
    try:
        r = run_guest(kit, be.sock, MEMFS_WORKLOAD, tmp_path, packed=True)
    finally:
        be.stop()
    starts = [ln for ln in be.log.read_text().splitlines() if "started (" in ln]
    assert starts and "packed rings" in starts[-1], starts
    assert r["a"] == "hello" and r["big"] == r["back"], r
    assert r["listed"] == "202" and r["truncated"] == "he" and r["left"] == "0" and r["umount"] == "ok", r
    assert "Traceback" not in be.log.read_text(), be.log.read_text()[-3000:]


def test_bench_fs_measures_both_back_ends(tmp_path):
    """``pyvhost bench --device fs``: one pair of runs, a small file; four rows with rates for each back-end."""
    out = tmp_path / "rows.json"
    argv = [sys.executable, "-m", "pyvhost", "bench", "--device", "fs", "--runs", "1", "--fs-mb", "8"]
    r = subprocess.run([*argv, "--json", str(out), "--workdir", str(tmp_path / "w")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rows = json.loads(out.read_text())
    backends = {"pyvhost", "virtiofsd"} if os.path.exists(VIRTIOFSD) else {"pyvhost"}
    assert {(x["backend"], x["workload"]) for x in rows} == {
        (b, w) for b in backends for w in ("seqwrite", "seqread", "randread", "meta")
    }
    assert all(x["rate"] > 0 and x["errors"] == 0 and x["cpu_us_per_op"] >= 0 for x in rows), rows
    assert "pyvhost/virtiofsd" in r.stdout
