"""A real guest on a real network: QEMU (TCG) runs a Debian kernel whose virtio-net is served by
``pyvhost serve net --tap``, with the tap inside a network namespace each test creates.

Every address used is the test's own: 10.200.0.1/24 on the namespace's tap, 10.200.0.2/24 in the guest; no
traffic leaves the namespace.  The guest kit (kernel, virtio modules, busybox initramfs) is built from Debian
packages by ``tools/guestkit/build.sh`` (``make deps`` runs it) and cached.
"""

from __future__ import annotations

import itertools
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

from .conftest import assert_log_path, needs, needs_root, needs_tun  # noqa: E402

NETPEER = str(ROOT / "tools" / "guestkit" / "netpeer.py")
HOST_IP, GUEST_IP = "10.200.0.1", "10.200.0.2"
TAP = "pvtap0"
#: bytes of each bulk transfer (one each way)
BULK = int(os.environ.get("PYVHOST_VM_BULK_MIB", "32")) << 20
#: seconds one guest may run at most (TCG; boot takes a few seconds, a 32 MiB transfer a few more)
GUEST_TIMEOUT = 300

pytestmark = [
    pytest.mark.vm,
    needs_tun,
    needs_root,
    needs(guestkit.qemu_available(), "qemu-system-x86_64 missing: run `make deps`"),
]

_names = itertools.count()

# Shell functions every guest script starts with.
PRELUDE = f"""
now() {{ cut -d' ' -f1 /proc/uptime; }}
up() {{
  ip link set eth0 up
  ip addr add {GUEST_IP}/24 dev eth0 2>/dev/null
  for i in $(seq 100); do [ "$(cat /sys/class/net/eth0/operstate)" = up ] && break; sleep 0.1; done
  echo "RESULT link=$(cat /sys/class/net/eth0/operstate)"
}}
pings() {{  # pings KEY: 3 pings to the namespace, received count as RESULT KEY=
  ping -c 3 -W 3 {HOST_IP} > /tmp/ping 2>&1
  echo "RESULT $1=$(grep -o '[0-9]* packets received' /tmp/ping | cut -d' ' -f1)"
}}
wait_go() {{  # block until the test connects to port 5000 and sends a word; RESULT KEY=word
  nc -l -p 5000 > /tmp/go
  echo "RESULT $1=$(cat /tmp/go)"
}}
send_bulk() {{  # send_bulk MIB PORT: random data to the namespace, its md5 as RESULT tx_md5=
  dd if=/dev/urandom of=/tmp/tx bs=1M count=$1 2>/dev/null
  echo "RESULT tx_md5=$(md5sum /tmp/tx | cut -d' ' -f1)"
  nc {HOST_IP} $2 < /tmp/tx
  rm -f /tmp/tx
  echo "RESULT tx_done=1"
}}
recv_bulk() {{  # recv_bulk PORT: take a transfer from the namespace; its md5 and size as RESULTs
  echo "RESULT rx_listening=1"
  nc -l -p $1 > /tmp/rx
  echo "RESULT rx_md5=$(md5sum /tmp/rx | cut -d' ' -f1) rx_bytes=$(wc -c < /tmp/rx)"
  rm -f /tmp/rx
}}
features() {{  # the virtio feature bits the guest driver negotiated (a string of 0/1, bit 0 first)
  echo "RESULT features=$(cat /sys/bus/virtio/drivers/virtio_net/virtio*/features)"
}}
"""


class Net:
    """The test's namespace, its tap, and the pyvhost back-end serving that tap."""

    def __init__(self, tmp: Path, kit: guestkit.Kit, multi_queue: bool = False) -> None:
        self.tmp = tmp
        self.kit = kit
        self.ns = guestkit.NetNS(f"pyvhost-vm-{os.getpid()}-{next(_names)}")
        self.ns.add_tap(TAP, f"{HOST_IP}/24", multi_queue)
        self.sock = str(tmp / "vhost-net.sock")
        self.backend: subprocess.Popen | None = None
        self.runs = 0
        self.stats: list[dict] = []

    def start_backend(self, *args: str) -> None:
        self.runs += 1
        ready = self.tmp / f"ready-{self.runs}"
        self.stats_file = self.tmp / f"stats-{self.runs}.json"
        self.log = self.tmp / f"backend-{self.runs}.log"
        self.backend = self.ns.popen(
            sys.executable,
            "-m",
            "pyvhost",
            "-v",
            "serve",
            "net",
            "--socket-path",
            self.sock,
            "--tap",
            TAP,
            "--ready-file",
            str(ready),
            "--stats-json",
            str(self.stats_file),
            *args,
            stdout=open(self.log, "w"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 240  # a cold kernel compile may come first
        while not ready.exists():
            assert self.backend.poll() is None, f"back-end exited:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, "back-end not ready"
            time.sleep(0.1)

    def stop_backend(self) -> dict:
        """SIGTERM the back-end; its per-queue counters (live and ended connections)."""
        assert self.backend is not None
        self.backend.send_signal(signal.SIGTERM)
        try:
            self.backend.wait(30)
        except subprocess.TimeoutExpired:
            self.backend.kill()
            self.backend.wait()
            raise AssertionError(f"back-end ignored SIGTERM:\n{self.log.read_text()[-3000:]}") from None
        self.backend = None
        stats = json.loads(self.stats_file.read_text())
        self.stats.append(stats)
        return stats

    def guest(self, script: str, **kw) -> guestkit.Guest:
        return guestkit.Guest(self.kit, self.sock, PRELUDE + script, workdir=str(self.tmp), **kw)

    def ping_guest(self) -> int:
        r = self.ns.run("ping", "-c", "3", "-W", "3", GUEST_IP, check=False)
        for line in r.stdout.splitlines():
            if "received" in line:
                return int(line.split(",")[1].split()[0])
        return 0

    def go(self, word: str = "go") -> None:
        """Unblock the guest's wait_go (the connection itself crosses the virtio-net device)."""
        self.ns.run(
            sys.executable,
            "-c",
            f"""
import socket, time
for i in range(100):
    try:
        s = socket.create_connection(("{GUEST_IP}", 5000), timeout=5); break
    except OSError:
        time.sleep(0.2)
else:
    raise SystemExit("guest port 5000 unreachable")
s.sendall(b"{word}\\n"); s.close()
""",
            timeout=60,
        )

    def sniffer(self) -> subprocess.Popen:
        """Count the frames crossing the tap (netpeer.py sniff) until :meth:`sniffed`."""
        p = self.ns.popen(sys.executable, NETPEER, "sniff", TAP, stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        assert json.loads(p.stdout.readline()) == {"sniffing": TAP}
        return p

    @staticmethod
    def sniffed(p: subprocess.Popen) -> dict:
        """What the sniffer counted: per direction ("out" = to the guest, "in" = from it) frames, frames over
        the MTU (GSO frames, handed over unsegmented), the longest."""
        p.send_signal(signal.SIGTERM)
        return json.loads(p.communicate(timeout=30)[0].splitlines()[-1])

    def log_text(self) -> str:
        return self.log.read_text()

    def receiver(self, port: int) -> subprocess.Popen:
        p = self.ns.popen(
            sys.executable,
            NETPEER,
            "recv",
            str(port),
            "--timeout",
            str(GUEST_TIMEOUT),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdout is not None
        assert json.loads(p.stdout.readline()) == {"listening": port}
        return p

    def send_to_guest(self, port: int, size: int) -> dict:
        r = self.ns.run(
            sys.executable,
            NETPEER,
            "send",
            GUEST_IP,
            str(port),
            str(size),
            "--timeout",
            str(GUEST_TIMEOUT),
            timeout=GUEST_TIMEOUT,
        )
        return json.loads(r.stdout.splitlines()[-1])

    def close(self) -> None:
        if self.backend is not None and self.backend.poll() is None:
            self.backend.kill()
            self.backend.wait()
        self.ns.close()


@pytest.fixture
def net(kit, tmp_path: Path):
    n = Net(tmp_path, kit)
    yield n
    n.close()


@pytest.fixture
def net_mq(kit, tmp_path: Path):
    """:func:`net` with a multiqueue tap (IFF_MULTI_QUEUE)."""
    n = Net(tmp_path, kit, multi_queue=True)
    yield n
    n.close()


def check_queues(stats: dict) -> None:
    """No queue broke, and the back-end dropped nothing (a full ring makes it wait, never drop)."""
    for conn in [stats["live"], *stats["ended"]]:
        for q, s in conn.items():
            assert s["error"] == 0, f"queue {q} broke: {s}"
            assert s["drops"] == 0, f"queue {q} dropped frames: {s}"


def bulk_both_ways(net: Net, g: guestkit.Guest, recv: subprocess.Popen, size: int) -> dict:
    """Guest -> namespace (to ``recv``, listening on port 5001), then namespace -> guest (port 5002); the
    checksums are compared on both ends."""
    g.expect("tx_done", GUEST_TIMEOUT)
    out = json.loads(recv.communicate(timeout=60)[0].splitlines()[-1])
    assert out["bytes"] == size
    assert out["md5"] == g.results["tx_md5"], "guest -> namespace: data corrupted"
    g.expect("rx_listening", 60)
    back = net.send_to_guest(5002, size)
    g.expect("rx_md5", GUEST_TIMEOUT)
    assert int(g.results["rx_bytes"]) == size
    assert g.results["rx_md5"] == back["md5"], "namespace -> guest: data corrupted"
    return {"guest_to_ns_mbit_s": out["mbit_s"], "ns_to_guest_mbit_s": back["mbit_s"]}


BULK_SCRIPT = f"""
up
features
pings ping_out
echo "RESULT ready=1"
wait_go go
send_bulk {BULK >> 20} 5001
recv_bulk 5002
"""


@pytest.mark.parametrize("metadata", ["direct", "copy"])
def test_ping_and_bulk_tcp(net: Net, metadata: str, record_property) -> None:
    """Link up, pings both ways, 32 MiB each way over TCP with checksum/TSO offloads on."""
    net.start_backend("--metadata", metadata)
    with net.guest(BULK_SCRIPT) as g:
        assert g.expect("link", 120) == "up"
        assert g.expect("ping_out", 60) == "3", g.tail()
        g.expect("ready", 30)
        assert net.ping_guest() == 3
        feats = g.results["features"]
        assert feats[0] == "1" and feats[7] == "1" and feats[11] == "1", f"offloads not negotiated: {feats}"
        assert feats[15] == "1", "MRG_RXBUF not negotiated"
        assert_log_path(net.log_text(), metadata, at_least=2)  # both queues, on the path asked for
        sniff = net.sniffer()
        recv = net.receiver(5001)
        net.go()
        rates = bulk_both_ways(net, g, recv, BULK)
        seen = net.sniffed(sniff)
        assert g.wait(60)["exit"] == "0"
    stats = net.stop_backend()
    check_queues(stats)
    assert_log_path(net.log_text(), metadata, at_least=2)
    rx, tx = stats["ended"][-1]["0"], stats["ended"][-1]["1"]
    # segmentation offloaded both ways: frames longer than the MTU allows crossed the tap in each direction
    # (counted frame by frame on the tap, whatever else -- ACKs, retransmissions -- crossed it too) ...
    assert seen["in"]["over_mtu"] > 0 and seen["out"]["over_mtu"] > 0, seen
    # ... each of those the guest took spanned several RX buffers, and every byte went through the queues
    assert rx["chains"] > rx["packets"], stats
    assert tx["bytes"] > BULK and rx["bytes"] > BULK, stats
    print(f"\n{metadata}, offloads on, {BULK >> 20} MiB: {rates}")
    for k, v in rates.items():
        record_property(k, v)


def test_bulk_tcp_without_offloads(net: Net, record_property) -> None:
    """--no-offloads: the guest negotiates no CSUM/TSO, sends and takes MTU-sized frames, data intact."""
    net.start_backend("--no-offloads")
    with net.guest(BULK_SCRIPT) as g:
        assert g.expect("link", 120) == "up"
        assert g.expect("ping_out", 60) == "3", g.tail()
        g.expect("ready", 30)
        feats = g.results["features"]
        for bit in (0, 1, 7, 8, 11, 12, 14):
            assert feats[bit] == "0", f"offload bit {bit} negotiated with --no-offloads: {feats}"
        assert_log_path(net.log_text(), "direct", at_least=2)
        sniff = net.sniffer()
        recv = net.receiver(5001)
        net.go()
        rates = bulk_both_ways(net, g, recv, BULK)
        seen = net.sniffed(sniff)
        assert g.wait(60)["exit"] == "0"
    stats = net.stop_backend()
    check_queues(stats)
    rx, tx = stats["ended"][-1]["0"], stats["ended"][-1]["1"]
    # no segmentation offload: not one frame over the MTU either way (the tap saw the whole transfer)
    assert seen["in"]["over_mtu"] == seen["out"]["over_mtu"] == 0, seen
    assert seen["in"]["frames"] > 1000 and seen["out"]["frames"] > 1000, seen
    assert rx["chains"] == rx["packets"], "without GSO every frame fits one buffer"
    assert tx["bytes"] > BULK and rx["bytes"] > BULK, stats
    print(f"\ndirect, offloads off, {BULK >> 20} MiB: {rates}")
    for k, v in rates.items():
        record_property(k, v)


def test_driver_reload(net: Net) -> None:
    """rmmod/insmod virtio_net in the guest (device reset, rings set up anew): traffic resumes."""
    net.start_backend("--metadata", "copy")
    script = """
up
pings ping1
rmmod virtio_net
echo "RESULT removed=$(ls /sys/class/net | grep -c eth0)"
insmod /lib/modules/virtio_net.ko
up
pings ping2
echo "RESULT ready=1"
wait_go go
send_bulk 4 5001
recv_bulk 5002
"""
    with net.guest(script) as g:
        assert g.expect("ping1", 120) == "3", g.tail()
        assert g.expect("removed", 60) == "0"
        assert g.expect("ping2", 60) == "3", g.tail()
        g.expect("ready", 30)
        assert net.ping_guest() == 3
        recv = net.receiver(5001)
        net.go()
        bulk_both_ways(net, g, recv, 4 << 20)
        assert g.wait(60)["exit"] == "0"
    check_queues(net.stop_backend())
    assert_log_path(net.log_text(), "copy", at_least=4)  # both queues, before the rmmod and after the insmod


def test_qemu_restart(net: Net) -> None:
    """The back-end keeps running while QEMU is killed (no clean shutdown) and started again."""
    net.start_backend()
    script = """
up
pings ping
echo "RESULT ready=1"
wait_go go
"""
    with net.guest(script, reconnect=True) as g:
        assert g.expect("ping", 120) == "3", g.tail()
        g.expect("ready", 30)
        assert net.ping_guest() == 3
        g.kill()  # SIGKILL: the connection just ends, with chains held by the back-end
    with net.guest(script + "send_bulk 4 5001\nrecv_bulk 5002\n", reconnect=True) as g:
        assert g.expect("ping", 120) == "3", g.tail()
        g.expect("ready", 30)
        assert net.ping_guest() == 3
        recv = net.receiver(5001)
        net.go()
        bulk_both_ways(net, g, recv, 4 << 20)
        assert g.wait(60)["exit"] == "0"
    stats = net.stop_backend()
    assert len(stats["ended"]) == 2
    check_queues(stats)
    assert_log_path(net.log_text(), "direct", at_least=4)  # both queues, for each QEMU


def test_backend_restart_qemu_reconnects(net: Net) -> None:
    """The back-end is stopped and started again under a running guest; QEMU (reconnect=1) reconnects, the
    guest's link comes back and traffic resumes (the go signal itself crosses the new back-end)."""
    net.start_backend()
    script = """
up
pings ping1
echo "RESULT ready=1"
wait_go go
pings ping2
send_bulk 4 5001
recv_bulk 5002
"""
    with net.guest(script, reconnect=True) as g:
        assert g.expect("ping1", 120) == "3", g.tail()
        g.expect("ready", 30)
        first = net.stop_backend()
        check_queues(first)
        assert_log_path(net.log_text(), "direct", at_least=2)
        net.start_backend()
        recv = net.receiver(5001)
        net.go()
        assert g.expect("ping2", 60) == "3", g.tail()
        bulk_both_ways(net, g, recv, 4 << 20)
        assert g.wait(60)["exit"] == "0"
    check_queues(net.stop_backend())
    assert_log_path(net.log_text(), "direct", at_least=2)  # the restarted back-end, on the path asked for


MQ_MIB = 4
MQ_SCRIPT = f"""
up
# the driver starts with min(max_virtqueue_pairs, CPUs) = 2 pairs; 1 then 2 again: VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
# both ways through QEMU's control queue (SET_VRING_ENABLE of pair 1's rings: its tap queue detached, attached)
ethtool -L eth0 combined 1; echo "RESULT set1=$?"
ethtool -L eth0 combined 2; echo "RESULT set2=$?"
echo "RESULT combined=$(ethtool -l eth0 | awk '/Combined/ {{v=$2}} END {{print v}}')"
echo "RESULT queues=$(ls /sys/class/net/eth0/queues | tr '\\n' ,)"
pings ping_out
echo "RESULT ready=1"
wait_go go
dd if=/dev/urandom of=/tmp/tx bs=1M count={MQ_MIB} 2>/dev/null
echo "RESULT tx_md5=$(md5sum /tmp/tx | cut -d' ' -f1)"
# a flow from each CPU: XPS sends CPU k's on TX queue k (and the tap steers each flow's ACKs back to its queue)
taskset 1 nc {HOST_IP} 5001 < /tmp/tx &
taskset 2 nc {HOST_IP} 5003 < /tmp/tx &
wait
echo "RESULT tx_done=1"
nc -l -p 5002 > /tmp/rx0 &
nc -l -p 5004 > /tmp/rx1 &
echo "RESULT rx_listening=1"
wait
echo "RESULT rx0_md5=$(md5sum /tmp/rx0 | cut -d' ' -f1) rx1_md5=$(md5sum /tmp/rx1 | cut -d' ' -f1)"
ethtool -S eth0 | awk -F': *' '/_queue_[0-9]+_packets/ {{gsub(/ /, "", $1); print "RESULT " $1 "=" $2}}'
echo "RESULT stats=1"
"""


def test_multiqueue_guest(net_mq: Net) -> None:
    """``--tap --queue-pairs 2 --cpus 0,1`` under a 2-CPU guest with ``mq=on``: the driver changes its pairs
    with ``ethtool -L`` (the tap queue of pair 1 is detached and attached again), then two TCP flows each way
    (4 MiB each, checksummed) carry frames on both pairs in both directions: the guest's per-queue counters
    (``ethtool -S``) and the back-end's per-ring ones."""
    net = net_mq
    net.start_backend("--queue-pairs", "2", "--cpus", "0,1")
    size = MQ_MIB << 20
    with net.guest(MQ_SCRIPT, smp=2, queue_pairs=2, tools=["ethtool"]) as g:
        assert g.expect("link", 120) == "up"
        assert (g.expect("set1", 60), g.expect("set2", 60), g.expect("combined", 60)) == ("0", "0", "2"), g.tail()
        assert g.expect("queues", 30) == "rx-0,rx-1,tx-0,tx-1,", g.tail()
        assert g.expect("ping_out", 60) == "3", g.tail()
        g.expect("ready", 30)
        recv = [net.receiver(5001), net.receiver(5003)]
        net.go()
        g.expect("tx_done", GUEST_TIMEOUT)
        for r in recv:
            out = json.loads(r.communicate(timeout=60)[0].splitlines()[-1])
            assert out["bytes"] == size and out["md5"] == g.results["tx_md5"], "guest -> namespace: corrupted"
        g.expect("rx_listening", 60)
        send = [
            net.ns.popen(
                sys.executable,
                NETPEER,
                "send",
                GUEST_IP,
                str(port),
                str(size),
                "--seed",
                str(port),
                "--timeout",
                str(GUEST_TIMEOUT),
                stdout=subprocess.PIPE,
                text=True,
            )
            for port in (5002, 5004)
        ]
        sent = [json.loads(p.communicate(timeout=GUEST_TIMEOUT)[0].splitlines()[-1]) for p in send]
        g.expect("stats", GUEST_TIMEOUT)
        assert g.results["rx0_md5"] == sent[0]["md5"] and g.results["rx1_md5"] == sent[1]["md5"], "corrupted"
        assert g.wait(60)["exit"] == "0"
    per_queue = {k: int(v) for k, v in g.results.items() if "_queue_" in k}
    for q in ("rx_queue_0", "rx_queue_1", "tx_queue_0", "tx_queue_1"):
        assert per_queue.get(f"{q}_packets", 0) > 0, f"guest: no packets on {q}: {per_queue}"
    stats = net.stop_backend()
    rings = stats["ended"][-1]
    assert all(rings[str(q)]["packets"] > 0 and rings[str(q)]["error"] == 0 for q in range(4)), rings
    # nothing dropped, but for what the guest left on pair 1's TX ring while the pair was disabled (combined 1,
    # and QEMU stopping): discarded as vhost-user's "Ring states" asks, never written to the tap
    assert rings["0"]["drops"] == rings["1"]["drops"] == rings["2"]["drops"] == 0, rings
    assert rings["3"]["drops"] <= 256, rings
    log = net.log_text()
    assert "write failed" not in log and "read failed" not in log  # the tap refused nothing
    assert "tap pvtap0: queue 1 detached" in log and "tap pvtap0: queue 1 attached" in log, log[-3000:]
    assert "on CPU 0" in log and "on CPU 1" in log
    print(f"\nguest per-queue packets: {per_queue}")
