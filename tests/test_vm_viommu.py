"""Real guests behind a virtual IOMMU (issue 11): QEMU (TCG) with ``-machine q35,kernel-irqchip=split -device
intel-iommu,intremap=on,device-iotlb=on``, the vhost-user device on a PCIe root port with
``iommu_platform=on,ats=on``, the guest kernel with ``intel_iommu=on`` (``guestkit.Guest(viommu=True)``).

Ring and buffer addresses the back-end sees are then IOVAs; QEMU answers its IOTLB misses with UPDATEs and
forwards the guest's IOTLB invalidations (ATS: the device IOTLB) as INVALIDATEs.

* The reference: DPDK's ``net_vhost`` with ``iommu-support=1`` as the back-end (testpmd forwarding between it
  and a ``net_tap`` in the test's namespace), so that the guest kit and QEMU setup are proven without pyvhost.
  DPDK 22.11 asks for read+write on every RX buffer, while the guest maps those DMA_FROM_DEVICE (write-only):
  its pending miss is never cleared by the write-only UPDATE and RX stalls (``vhost_user_iotlb_pending_remove``
  keeps a pending entry whose permission the update does not cover).  The reference guest therefore runs its
  virtio device in the IOMMU's identity domain (``iommu=pt``): still IOVAs through the IOTLB messages, with
  read+write entries.

Addresses are the test's own (10.200.0.1/24 on the namespace's tap, 10.200.0.2/24 in the guest), as in
test_vm_net.py, whose harness this reuses.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvhost.bench.peers import parse_testpmd
from pyvhost.devices.base import Device

from .conftest import TESTPMD, assert_log_path, needs, needs_dpdk, needs_root, needs_tun
from .test_vm_net import HOST_IP, TAP, Net, bulk_both_ways, check_queues, guestkit
from .test_vm_net import net as net  # noqa: F401  (a namespace, its tap, and pyvhost serving it)

#: bytes of each bulk transfer (one each way); the vIOMMU makes every DMA map and unmap a trap under TCG
BULK = int(os.environ.get("PYVHOST_VM_VIOMMU_BULK_MIB", "16")) << 20
#: seconds one guest may run at most (TCG behind a vIOMMU: slower than test_vm_net's guests)
GUEST_TIMEOUT = 600

pytestmark = [
    pytest.mark.vm,
    needs_tun,
    needs_root,
    needs(guestkit.qemu_available(), "qemu-system-x86_64 missing: run `make deps`"),
]

_names = itertools.count()

# More guest shell functions (after test_vm_net's PRELUDE).
VIOMMU_PRELUDE = f"""
viommu() {{  # the IOMMUs the guest found, and the DMA domain type of the virtio-net device's IOMMU group
  d=$(readlink -f /sys/bus/virtio/drivers/virtio_net/virtio*/..)
  echo "RESULT iommus=$(ls /sys/class/iommu | tr '\\n' ,) domain=$(cat $d/iommu_group/type)"
}}
pings_some() {{  # pings_some KEY N: ping until N replies came (at most 30 tries); replies as RESULT KEY=
  ok=0
  for i in $(seq 30); do
    ping -c 1 -W 2 {HOST_IP} > /dev/null 2>&1 && ok=$((ok + 1))
    [ $ok -ge $2 ] && break
  done
  echo "RESULT $1=$ok"
}}
"""

ACCESS_PLATFORM = 33


def check_guest_side(g: guestkit.Guest, domain: set[str]) -> None:
    """The guest runs behind the vIOMMU (a DMAR unit), its virtio-net negotiated ACCESS_PLATFORM, and the
    device's IOMMU domain is of a type in ``domain``."""
    assert g.expect("domain", 60) in domain, g.results
    assert "dmar" in g.results["iommus"], g.results
    feats = g.expect("features", 60)
    assert feats[ACCESS_PLATFORM] == "1", f"ACCESS_PLATFORM not negotiated: {feats}"


class DpdkNet(Net):
    """The reference back-end: testpmd forwarding (io) between ``net_vhost`` (``iommu-support=1``) on the
    socket and a ``net_tap`` it creates in the test's namespace (there the test gives the tap its address)."""

    def __init__(self, tmp: Path, kit: guestkit.Kit) -> None:
        self.tmp = tmp
        self.kit = kit
        self.ns = guestkit.NetNS(f"pyvhost-viommu-{os.getpid()}-{next(_names)}")
        self.sock = str(tmp / "dpdk-vhost.sock")
        self.backend: subprocess.Popen | None = None
        self.runs = 0
        self.stats = []
        self.log = tmp / "testpmd.log"

    def start_backend(self, *args: str) -> None:
        cpu = max(os.sched_getaffinity(0))
        self.backend = self.ns.popen(
            "stdbuf",
            "-oL",
            TESTPMD or "dpdk-testpmd",
            "--no-huge",
            "-m",
            "1024",
            "--no-pci",
            "--file-prefix",
            f"pyvhost-viommu-{os.getpid()}",
            "--lcores",
            f"0@{cpu},1@{cpu}",
            # the vhost library logs every message it reads at debug level (IOTLB_MSG only there)
            "--log-level=lib.vhost.config:debug",
            "--vdev",
            f"net_vhost0,iface={self.sock},iommu-support=1,queues=1",
            "--vdev",
            f"net_tap0,iface={TAP}",
            "--",
            "--forward-mode=io",
            "--auto-start",
            "--stats-period",
            "10",
            *args,
            stdout=open(self.log, "w"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while not (os.path.exists(self.sock) and self.ns.run("ip", "link", "show", TAP, check=False).returncode == 0):
            assert self.backend.poll() is None, f"testpmd exited:\n{self.log_text()[-3000:]}"
            assert time.monotonic() < deadline, f"testpmd not ready:\n{self.log_text()[-3000:]}"
            time.sleep(0.1)
        self.ns.run("ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP)
        self.ns.run("ip", "link", "set", TAP, "up")

    def stop_backend(self) -> dict:
        """SIGINT testpmd; the vhost port's forward statistics."""
        assert self.backend is not None
        self.backend.send_signal(signal.SIGINT)
        try:
            self.backend.wait(60)
        except subprocess.TimeoutExpired:
            self.backend.kill()
            self.backend.wait()
            raise AssertionError(f"testpmd ignored SIGINT:\n{self.log_text()[-3000:]}") from None
        self.backend = None
        return parse_testpmd(self.log_text())

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def dpdk_net(kit, tmp_path: Path):  # noqa: F811
    n = DpdkNet(tmp_path, kit)
    yield n
    n.close()


REFERENCE_SCRIPT = f"""
viommu
up
features
pings_some ping_out 3
echo "RESULT ready=1"
wait_go go
send_bulk {BULK >> 20} 5001
recv_bulk 5002
"""


@needs_dpdk
def test_reference_dpdk_net_vhost(dpdk_net: DpdkNet) -> None:
    """DPDK net_vhost iommu-support=1 serves the guest's virtio-net behind the vIOMMU: the guest finds the DMAR
    unit, negotiates ACCESS_PLATFORM, pings the namespace and moves BULK bytes each way over TCP intact, and
    QEMU sent DPDK IOTLB messages.  (net_vhost drops a packet whose buffer misses in its IOTLB: pings are
    retried, TCP retransmits.)"""
    net = dpdk_net
    net.start_backend()
    g = net.guest(VIOMMU_PRELUDE + REFERENCE_SCRIPT, viommu=True, append="iommu=pt")
    with g:
        check_guest_side(g, {"identity"})
        assert g.expect("link", GUEST_TIMEOUT) == "up"
        assert g.expect("ping_out", 120) == "3", g.tail()
        g.expect("ready", 30)
        recv = net.receiver(5001)
        net.go()
        rates = bulk_both_ways(net, g, recv, BULK)
        assert g.wait(120)["exit"] == "0"
    stats = net.stop_backend()
    log = net.log_text()
    iotlb = len(re.findall(r"read message VHOST_USER_IOTLB_MSG", log))
    assert iotlb > 0, "QEMU sent DPDK no IOTLB message: the device was not behind the vIOMMU"
    assert stats["rx_packets"] > BULK // 65536, stats  # port 0 (vhost) took the guest's side of the transfer
    print(f"\nDPDK net_vhost iommu-support=1, {BULK >> 20} MiB: {rates}, {iotlb} IOTLB messages, {stats}")


# -- pyvhost ------------------------------------------------------------------------------------------------
#: pyvhost's devices can sit behind a vIOMMU (offer VIRTIO_F_ACCESS_PLATFORM): issue 11's back-end part
needs_backend_iommu = pytest.mark.skipif(
    not hasattr(Device, "access_platform"), reason="this pyvhost offers no VIRTIO_F_ACCESS_PLATFORM yet (issue 11)"
)
#: the back-end's count of IOTLB messages, logged when a connection ends
IOTLB_COUNTS = re.compile(r"IOTLB: (\d+) updates?, (\d+) invalidates?, (\d+) miss(?:es)? sent")


def iotlb_counts(log: str) -> dict[str, int]:
    """UPDATEs and INVALIDATEs the back-end took and MISSes it sent, summed over its connections."""
    found = IOTLB_COUNTS.findall(log)
    assert found, f"the back-end logged no IOTLB counts:\n{log[-2000:]}"
    return {k: sum(int(f[i]) for f in found) for i, k in enumerate(("updates", "invalidates", "misses"))}


STARTS = re.compile(r"queues \(([\d, ]+)\) started \(([a-z/]+) path")
FALLBACKS = "does not lie in mapped memory; using the copy path"


def check_paths(log: str, metadata: str, at_least: int) -> None:
    """The rings ran on ``metadata``'s path.  On the direct path a ring whose parts the IOTLB does not cover
    yet starts on the copy path (logged) until the UPDATE comes: every copy start must be such a one."""
    if metadata == "copy":
        assert_log_path(log, "copy", at_least)
        return
    paths = [p for _q, p in STARTS.findall(log)]
    assert sum(p == "direct" for p in paths) >= at_least, paths
    # a ring restarted with its views kept (no memory or IOTLB change since, e.g. after SET_VRING_CALL) stays on
    # the path it had, without a new fallback line
    fallbacks, last = 0, {}
    for line in log.splitlines():
        if FALLBACKS in line:
            fallbacks += 1
        elif m := STARTS.search(line):
            q, path = m.groups()
            if path == "copy" and last.get(q) != "copy":
                assert fallbacks > 0, f"a copy-path start without an IOTLB miss: {line}"
                fallbacks -= 1
            last[q] = path


def check_iotlb_traffic(log: str) -> dict[str, int]:
    """The back-end worked through the vIOMMU: it missed, QEMU answered with UPDATEs, and the guest's unmaps
    reached it as INVALIDATEs (ATS)."""
    n = iotlb_counts(log)
    assert n["misses"] > 0 and n["updates"] > 0 and n["invalidates"] > 0, n
    return n


PYVHOST_NET_SCRIPT = f"""
viommu
up
features
pings ping_out
echo "RESULT ready=1"
wait_go go
send_bulk {BULK >> 20} 5001
recv_bulk 5002
"""


@needs_backend_iommu
@pytest.mark.parametrize("metadata", ["direct", "copy"])
def test_pyvhost_net_tap(net: Net, metadata: str) -> None:
    """pyvhost serve net --tap behind the vIOMMU, on each metadata path: the guest's DMA domain translates
    (IOVAs are not guest-physical addresses), pings both ways all answered (a miss makes a queue wait, never
    drop), BULK bytes each way over TCP intact, no queue error or drop, and the back-end's IOTLB saw misses,
    updates and invalidations."""
    net.start_backend("--metadata", metadata)
    with net.guest(VIOMMU_PRELUDE + PYVHOST_NET_SCRIPT, viommu=True) as g:
        check_guest_side(g, {"DMA", "DMA-FQ"})
        assert g.expect("link", GUEST_TIMEOUT) == "up"
        assert g.expect("ping_out", 120) == "3", g.tail()
        g.expect("ready", 60)
        assert net.ping_guest() == 3
        recv = net.receiver(5001)
        net.go()
        rates = bulk_both_ways(net, g, recv, BULK)
        assert g.wait(120)["exit"] == "0"
    stats = net.stop_backend()
    check_queues(stats)
    log = net.log_text()
    check_paths(log, metadata, at_least=2)
    rx, tx = stats["ended"][-1]["0"], stats["ended"][-1]["1"]
    assert tx["bytes"] > BULK and rx["bytes"] > BULK, stats
    n = check_iotlb_traffic(log)
    print(f"\npyvhost net --tap, {metadata}, {BULK >> 20} MiB behind the vIOMMU: {rates}, IOTLB {n}")


class BlkGuest(guestkit.Guest):
    """The kit's guest with a vhost-user-blk device (behind the vIOMMU with ``viommu=True``)."""

    def device_args(self) -> list[str]:
        return [
            "-chardev",
            f"socket,id=c0,path={self.socket_path}",
            "-device",
            f"vhost-user-blk-pci,chardev=c0,num-queues=1,vectors=0{self.iommu_opts()}",
        ]


#: bytes the blk guest writes and reads back
BLK_BYTES = 16 << 20
BLK_IMAGE = 64 << 20

BLK_SCRIPT = f"""
d=$(readlink -f /sys/block/vda/device/..)
echo "RESULT iommus=$(ls /sys/class/iommu | tr '\\n' ,) domain=$(cat $d/iommu_group/type)"
echo "RESULT features=$(cat /sys/block/vda/device/features)"
dd if=/dev/urandom of=/tmp/w bs=1M count={BLK_BYTES >> 20} 2>/dev/null
echo "RESULT w_md5=$(md5sum /tmp/w | cut -d' ' -f1)"
for pass in 1 2; do
  dd if=/tmp/w of=/dev/vda bs=256k oflag=direct conv=fsync 2>/dev/null || echo "RESULT werr=$pass"
  r=$(dd if=/dev/vda bs=256k count={BLK_BYTES >> 18} iflag=direct 2>/dev/null | md5sum)
  echo "RESULT r$pass=$(echo $r | cut -d' ' -f1)"
done
echo "RESULT ioerr=$(dmesg | grep -c -i 'i/o error')"
"""


@needs_backend_iommu
@pytest.mark.parametrize("metadata", ["direct", "copy"])
def test_pyvhost_blk(kit, tmp_path: Path, metadata: str) -> None:  # noqa: F811
    """pyvhost serve blk behind the vIOMMU, on each metadata path: 16 MiB of random data written with O_DIRECT
    and read back twice, checksums equal in the guest and on the image, no I/O error, and the back-end's IOTLB
    saw misses, updates and invalidations."""
    image, sock, log = tmp_path / "disk.img", str(tmp_path / "blk.sock"), tmp_path / "backend.log"
    with open(image, "wb") as f:
        f.truncate(BLK_IMAGE)
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pyvhost",
            "-v",
            "serve",
            "blk",
            "--socket-path",
            sock,
            "--file",
            str(image),
            "--metadata",
            metadata,
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
    )
    try:
        deadline = time.monotonic() + 240  # a cold kernel compile may come first
        while not ready.exists():
            assert proc.poll() is None, f"back-end exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, "back-end not ready"
            time.sleep(0.1)
        with BlkGuest(kit, sock, BLK_SCRIPT, viommu=True, workdir=str(tmp_path)) as g:
            assert g.expect("domain", GUEST_TIMEOUT) in {"DMA", "DMA-FQ"}, g.results
            assert "dmar" in g.results["iommus"], g.results
            assert g.expect("features", 60)[ACCESS_PLATFORM] == "1", g.results
            want = g.expect("w_md5", 120)
            assert g.expect("r1", GUEST_TIMEOUT) == want, g.tail()
            assert g.expect("r2", GUEST_TIMEOUT) == want, g.tail()
            assert g.expect("ioerr", 60) == "0", g.tail()
            assert "werr" not in g.results, g.tail()
            assert g.wait(120)["exit"] == "0"
        with open(image, "rb") as f:
            assert hashlib.md5(f.read(BLK_BYTES)).hexdigest() == want
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    text = log.read_text()
    check_paths(text, metadata, at_least=1)
    n = check_iotlb_traffic(text)
    print(f"\npyvhost blk, {metadata}, {BLK_BYTES >> 20} MiB written and read twice behind the vIOMMU: IOTLB {n}")
