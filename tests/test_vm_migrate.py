"""Live migration of running guests between two QEMUs on one host (issue 12): each QEMU has its own
back-end process on its own socket -- for blk two back-ends on one image file, for net two on two taps of one
bridge -- and the guest does I/O through the whole migration, there and back again (``A -> B -> A``: the
first back-end serves the third QEMU, its Server having taken a new connection after the first ended).

TCG, RAM in a shared memfd, ``-incoming unix:PATH``, ``migrate`` over a Unix socket with the bandwidth limited
(16 MiB/s) so that the migration iterates while I/O runs, lifted after 4 dirty-sync rounds so it converges.
The migration helpers are in ``tools/guestkit/migration.py``.  A third case has ``serve net --mode source`` on
both hosts: numbered, checksummed frames that the guest's ``udpseq`` (tools/guestkit/udpseq.c) checks one by
one while it transmits to the back-ends' TX side.  ``qemu-storage-daemon`` (libvhost-user, which
logs dirty pages) is the reference peer for the blk test: the harness itself is checked against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from pyvhost.devices.net import make_frame

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "guestkit"))
import guestkit  # noqa: E402
import migration as M  # noqa: E402

from .conftest import assert_log_path, needs, needs_dpdk, needs_root, needs_tun  # noqa: E402

MiB = 1 << 20
GUEST_MB = 256
#: the longest a guest step may take under TCG (boot, a migration, a burst of I/O)
STEP_TIMEOUT = 120
#: records the guest must ack on each QEMU after it took over (the guest goes on there)
AFTER = 10

pytestmark = [
    pytest.mark.vm,
    needs(guestkit.qemu_available(), "qemu-system-x86_64 missing: run `make deps`"),
]


class Cleanup:
    """Guests and back-ends a test started, closed at its end (guests first)."""

    def __init__(self) -> None:
        self.guests: list[M.MigGuest] = []
        self.backends: list[M.Backend] = []

    def guest(self, g: M.MigGuest) -> M.MigGuest:
        self.guests.append(g)
        return g.start()

    def backend(self, b: M.Backend) -> M.Backend:
        self.backends.append(b)
        return b

    def close(self) -> None:
        for g in self.guests:
            g.close()
        for b in self.backends:
            b.stop()


@pytest.fixture
def running() -> Iterator[Cleanup]:
    c = Cleanup()
    yield c
    c.close()


def poll(cond: Callable[[], bool], what: str, timeout: float = STEP_TIMEOUT, tail: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s\n{tail()}")
        time.sleep(0.05)


# -- blk ----------------------------------------------------------------------------------------------------
IMAGE = 128 * MiB
#: the known region: KNOWN bytes of seeded random data at the start of the image, read whole by one dd
#: (O_DIRECT, BLOCK bytes a request) over and over and checked.  One dd reuses one buffer: after its first
#: request only the back-end writes those guest pages, so a completion it did not log reaches the destination
#: stale (the guest's own writes -- a fresh buffer zeroed -- would mark the pages dirty and hide it).
BLOCK, KNOWN = 64 * 1024, 16 * MiB
#: numbered records the guest writes (O_DIRECT), RECORD bytes each, from REC_START on
RECORD, REC_START, RECORDS = 4096, 64 * MiB, 8192
LAST = IMAGE // 512 - 1
STOP = b"STOP"


def blk_script(md5: str, token: str) -> str:
    """In the background: read the known region (O_DIRECT) and check its md5, pass after pass; in the
    foreground: write record i (O_DIRECT) and ack it, until STOP is in the last sector."""
    return f"""
echo "RESULT looping=1"
(p=0; bad=0
 while [ ! -f /tmp/stop ]; do
   s=$(dd if=/dev/vda bs={BLOCK} count={KNOWN // BLOCK} iflag=direct 2>/dev/null | md5sum)
   if [ "${{s%% *}}" != "{md5}" ]; then bad=$((bad+1)); echo "RESULT badpass=$p"; fi
   p=$((p+1)); echo "RESULT pass=$p"
 done
 echo "RESULT passes=$p badpasses=$bad") &
i=0
while [ $i -lt {RECORDS} ]; do
  printf "REC %08d {token}" $i | dd of=/dev/vda bs={RECORD} seek=$(({REC_START // RECORD}+i)) count=1 \\
    conv=sync,notrunc oflag=direct iflag=fullblock 2>/dev/null && echo "RESULT ack=$i"
  i=$((i+1))
  v=$(dd if=/dev/vda bs=512 skip={LAST} count=1 iflag=direct 2>/dev/null | head -c 4)
  [ "$v" = "{STOP.decode()}" ] && break
done
touch /tmp/stop
wait
echo "RESULT writes=$i ioerr=$(dmesg | grep -c -i 'error')"
"""


def make_image(path: Path) -> str:
    """The image with KNOWN bytes of seeded random data at its start; their md5."""
    data = np.random.default_rng(12).integers(0, 256, KNOWN, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(IMAGE)
    return hashlib.md5(data).hexdigest()


def acks(g: M.MigGuest) -> int:
    return int(g.results.get("ack", -1))


def passes(g: M.MigGuest) -> int:
    return int(g.results.get("pass", 0))


def check_records(image: Path, upto: int, token: str) -> list[int]:
    """The acked records (0..upto) that are not in the image as written; empty when all are."""
    bad = []
    with open(image, "rb") as f:
        for i in range(upto + 1):
            f.seek(REC_START + i * RECORD)
            want = f"REC {i:08d} {token}".encode().ljust(RECORD, b"\0")
            if f.read(RECORD) != want:
                bad.append(i)
    return bad


BLK_PEERS = ["qsd", "direct", "copy"]


@pytest.mark.parametrize("peer", BLK_PEERS)
def test_blk_migrates_there_and_back_under_io(kit, running: Cleanup, tmp_path: Path, peer: str) -> None:
    """The guest reads known blocks with O_DIRECT and verifies each, and writes numbered records (O_DIRECT)
    acking each, while it is migrated A -> B and back to a new QEMU on A's back-end process; it goes on
    after each switchover.  0 verification failures, every acked record in the image, no I/O error."""
    image = tmp_path / "disk.img"
    md5 = make_image(image)
    token = f"t{os.getpid()}"

    def backend(name: str) -> M.Backend:
        sock = str(tmp_path / f"{name}.sock")
        if peer == "qsd":
            return running.backend(M.Backend.storage_daemon(image, sock, tmp_path))
        return running.backend(M.Backend.pyvhost("blk", sock, tmp_path, "--file", str(image), "--metadata", peer))

    def guest(b: M.Backend, incoming: str | None = None) -> M.MigGuest:
        g = M.BlkMigGuest(
            kit, b.sock, blk_script(md5, token), memory_mb=GUEST_MB, workdir=str(tmp_path), incoming=incoming
        )
        return running.guest(g)

    a = backend("a")
    ga = guest(a)
    ga.expect("looping", STEP_TIMEOUT)
    poll(lambda: acks(ga) >= AFTER, "records acked on A", tail=ga.tail)
    hops = []
    src = ga
    for hop, (b, name) in enumerate([(backend("b"), "b"), (a, "a")]):
        dst = guest(b, incoming=str(tmp_path / f"mig{hop}.sock"))
        before = acks(src)
        mig = M.migrate(src, dst)
        during = acks(src) - before
        src.quit()
        poll(
            lambda: acks(dst) >= max(acks(src), 0) + AFTER and passes(dst) >= passes(src) + 1,
            f"records acked and the region read after switchover to {name}",
            tail=dst.tail,
        )
        hops.append((mig, during))
        src = dst
    with open(image, "r+b") as f:
        f.seek(LAST * 512)
        f.write(STOP.ljust(512, b"\0"))
    src.wait(STEP_TIMEOUT)
    r = src.results
    assert r.get("exit") == "0", src.tail()
    bad = [g.results["badpass"] for g in running.guests if "badpass" in g.results]
    assert r["badpasses"] == "0" and not bad, f"the known region read wrong: {r['badpasses']} passes ({bad})"
    assert r["ioerr"] == "0", src.tail()
    written = int(r["ack"])
    assert check_records(image, written, token) == [], "acked records not in the image"
    if peer != "qsd":
        for b in running.backends:
            assert_log_path(b.log.read_text(), peer)
    report = "; ".join(f"hop {n}: {m.summary()}, {d} records during" for n, (m, d) in enumerate(hops))
    print(f"\nblk {peer}: {written + 1} records, {r['passes']} passes, {report}")


# -- net ----------------------------------------------------------------------------------------------------
HOST_IP, GUEST_IP = "10.200.1.1", "10.200.1.2"
MIGRATION = str(ROOT / "tools" / "guestkit" / "migration.py")
#: the guest sends this many bytes of its own random pattern, over and over; the namespace checks each copy
PATTERN = 256 * 1024
#: bytes each stream must move on each QEMU after it took over
STREAM_AFTER = 4 * MiB

NET_SCRIPT = f"""
ip link set eth0 up
ip addr add {GUEST_IP}/24 dev eth0
for i in $(seq 100); do [ "$(cat /sys/class/net/eth0/operstate)" = up ] && break; sleep 0.1; done
ping -c 3 -W 3 {HOST_IP} > /tmp/ping 2>&1
echo "RESULT ping1=$(grep -o '[0-9]* packets received' /tmp/ping | cut -d' ' -f1)"
dd if=/dev/urandom of=/tmp/pat bs={PATTERN} count=1 2>/dev/null
echo "RESULT pat_md5=$(md5sum /tmp/pat | cut -d' ' -f1)"
(nc -l -p 5002 | md5sum > /tmp/rxsum; touch /tmp/stop) &
(n=0; while [ ! -f /tmp/stop ]; do cat /tmp/pat; n=$((n+1)); done; echo $n > /tmp/txn) | nc {HOST_IP} 5001
wait
echo "RESULT rx_md5=$(cut -d' ' -f1 /tmp/rxsum) tx_copies=$(cat /tmp/txn)"
ping -c 3 -W 3 {HOST_IP} > /tmp/ping 2>&1
echo "RESULT ping2=$(grep -o '[0-9]* packets received' /tmp/ping | cut -d' ' -f1)"
echo "RESULT tcp_csum_errors=$(awk '/^Tcp:/ {{n++; if (n == 2) print $NF}}' /proc/net/snmp)"
"""


class Bridge:
    """A network namespace with a bridge (HOST_IP) for the back-ends' taps, and the stream peers in it;
    deleted on close."""

    def __init__(self) -> None:
        self.ns = guestkit.NetNS(f"pyvhost-mig-{os.getpid()}")
        self.ns.run("ip", "link", "add", "br0", "type", "bridge")
        self.ns.run("ip", "addr", "add", f"{HOST_IP}/24", "dev", "br0")
        self.ns.run("ip", "link", "set", "br0", "up")
        self.peers: list[subprocess.Popen] = []

    def add_tap(self, tap: str) -> None:
        """A persistent tap on the bridge (for ``pyvhost serve net --tap``)."""
        self.ns.run("ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr")
        self.enslave(tap)

    def enslave(self, tap: str) -> None:
        """Put ``tap`` (made by its back-end, maybe not yet) on the bridge, up."""
        poll(lambda: self.ns.run("ip", "link", "set", tap, "master", "br0", check=False).returncode == 0, tap, 30)
        self.ns.run("ip", "link", "set", tap, "up")

    def peer(self, tmp: Path, *args: str) -> tuple[subprocess.Popen, str]:
        """``migration.py send|recv ...`` in the namespace; the process and its progress file."""
        prog = str(tmp / f"{args[0]}.progress")
        p = self.ns.popen(sys.executable, MIGRATION, *args, prog, stdout=subprocess.PIPE, text=True)
        self.peers.append(p)
        return p, prog

    def close(self) -> None:
        for p in self.peers:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.ns.close()


@pytest.fixture
def bridge() -> Iterator[Bridge]:
    b = Bridge()
    yield b
    b.close()


def peer_result(p: subprocess.Popen) -> dict:
    out, _ = p.communicate(timeout=STEP_TIMEOUT)
    assert p.returncode == 0, out
    return json.loads(out.splitlines()[-1])


#: with testpmd (the reference peer) the guest negotiates no offloads: its tap PMD takes no virtio-net header
NO_OFFLOADS = ",".join(
    f"{o}=off" for o in ("csum", "guest_csum", "host_tso4", "host_tso6", "guest_tso4", "guest_tso6", "host_ecn")
)


@pytest.mark.parametrize("peer", [pytest.param("dpdk", marks=[pytest.mark.dpdk, needs_dpdk]), "direct", "copy"])
@needs_tun
@needs_root
def test_net_migrates_there_and_back_under_traffic(
    kit, running: Cleanup, bridge: Bridge, tmp_path: Path, peer: str
) -> None:
    """The guest (``serve net --tap``, A and B on two taps of one bridge; or DPDK testpmd between a vhost-user
    port and a tap, the reference) receives a TCP stream from the namespace and sends one to it while it is
    migrated A -> B and back to a new QEMU on A's back-end; both streams go on after each switchover, every
    byte arrives intact (the guest's md5 of what it received, the namespace's check of every copy of the
    guest's pattern), no queue broke.  Weaker than the blk test as a dirty-log check: with the tap's RX logging
    switched off (a scratch copy) it still passed -- the guest consumes and recycles RX buffers at once, so a
    stale buffer rarely survives to the destination."""
    stop = str(tmp_path / "stop")
    recv, recv_prog = bridge.peer(tmp_path, "recv", "5001", str(PATTERN), str(tmp_path / "recv.ready"))
    poll(lambda: (tmp_path / "recv.ready").exists(), "the namespace's receiver listening")

    def backend(name: str, tap: str) -> M.Backend:
        sock = str(tmp_path / f"{name}.sock")
        prefix = tuple(bridge.ns.argv())
        if peer == "dpdk":
            b = running.backend(M.Backend.testpmd(sock, tap, tmp_path, prefix))
            bridge.enslave(tap)
            return b
        bridge.add_tap(tap)
        return running.backend(
            M.Backend.pyvhost("net", sock, tmp_path, "--tap", tap, "--metadata", peer, prefix=prefix)
        )

    def guest(b: M.Backend, incoming: str | None = None) -> M.MigGuest:
        opts = NO_OFFLOADS if peer == "dpdk" else ""
        g = M.MigGuest(
            kit, b.sock, NET_SCRIPT, memory_mb=GUEST_MB, workdir=str(tmp_path), incoming=incoming, device_opts=opts
        )
        return running.guest(g)

    a = backend("a", "pvmig0")
    ga = guest(a)
    assert ga.expect("ping1", STEP_TIMEOUT) == "3", ga.tail()
    (tmp_path / "recv.ready.md5").write_text(ga.expect("pat_md5", 30))
    send, send_prog = bridge.peer(tmp_path, "send", GUEST_IP, "5002", stop)

    def streams() -> tuple[int, int]:
        return M.progress(send_prog), M.progress(recv_prog)

    poll(lambda: min(streams()) >= STREAM_AFTER, "both streams running on A", tail=ga.tail)
    hops = []
    src = ga
    for hop, b in enumerate([backend("b", "pvmig1"), a]):
        dst = guest(b, incoming=str(tmp_path / f"mig{hop}.sock"))
        before = streams()
        mig = M.migrate(src, dst)
        during = [x - y for x, y in zip(streams(), before, strict=True)]
        src.quit()
        at = streams()
        poll(
            lambda at=at: min(x - y for x, y in zip(streams(), at, strict=True)) >= STREAM_AFTER,
            f"both streams going on after switchover {hop}",
            tail=dst.tail,
        )
        hops.append((mig, during))
        src = dst
    Path(stop).touch()
    sent, got = peer_result(send), peer_result(recv)
    src.wait(STEP_TIMEOUT)
    r = src.results
    assert r.get("exit") == "0", src.tail()
    assert r["rx_md5"] == sent["md5"], f"namespace -> guest: {sent['bytes']} bytes sent, the guest's md5 differs"
    assert got["bad"] == 0 and got["tail"] == 0, f"guest -> namespace: corrupt copies of the pattern: {got}"
    assert got["chunks"] == int(r["tx_copies"]), f"guest -> namespace: copies lost: {got}, {r}"
    assert r["ping2"] == "3" and r["tcp_csum_errors"] == "0", src.tail()
    for b in running.backends if peer != "dpdk" else []:
        b.stop()
        assert_log_path(b.log.read_text(), peer, at_least=2)
        stats = b.stats()
        assert stats is not None
        for conn in [stats["live"], *stats["ended"]]:
            for q, s in conn.items():
                assert s["error"] == 0, f"{b.sock}: queue {q} broke: {s}"
    report = "; ".join(
        f"hop {n}: {m.summary()}, {d[0] >> 20}/{d[1] >> 20} MiB in/out during" for n, (m, d) in enumerate(hops)
    )
    print(f"\nnet {peer}: {sent['bytes'] >> 20} MiB in, {got['bytes'] >> 20} MiB out; {report}")


# -- net, numbered frames -----------------------------------------------------------------------------------
#: make_frame's addresses: the generated frames go from SOURCE_MAC/SOURCE_IP to FRAME_MAC/FRAME_IP, UDP port 9
FRAME_MAC, FRAME_IP, SOURCE_MAC, SOURCE_IP, FRAME_PORT = (
    "02:00:00:00:00:02",
    "198.18.0.2",
    "02:00:00:00:00:01",
    "198.18.0.1",
    9,
)
#: the source's frames (make_frame): Ethernet + IPv4 + UDP headers (42 bytes), a 214-byte payload (the number,
#: zeros); udpseq gets the whole frame and compares every byte but the number and the UDP checksum
FRAME_SIZE = 256
UDPSEQ = ROOT / "tools" / "guestkit" / "udpseq.c"
#: frames the guest must receive (and datagrams it must send) on each QEMU after it took over
FRAMES_AFTER = 500

SEQ_SCRIPT = f"""
ip link set eth0 up
ip addr add {FRAME_IP}/24 dev eth0
arp -i eth0 -s {SOURCE_IP} {SOURCE_MAC}  # nobody answers ARP: the datagrams go to the back-end's sink
for i in $(seq 100); do [ "$(cat /sys/class/net/eth0/operstate)" = up ] && break; sleep 0.1; done
chmod 755 /udpseq
/udpseq eth0 {FRAME_PORT} {SOURCE_IP} {FRAME_PORT} {make_frame(FRAME_SIZE).tobytes().hex()}
snmp() {{ awk -v k="$1" '/^Udp:/ {{ if (!h) {{ for (i = 1; i <= NF; i++) c[$i] = i; h = 1 }} else print $c[k] }}' \\
  /proc/net/snmp; }}
echo "RESULT csum_errors=$(snmp InCsumErrors) in_errors=$(snmp InErrors) rcvbuf_errors=$(snmp RcvbufErrors) \\
  sndbuf_errors=$(snmp SndbufErrors)"
echo "RESULT tx_packets=$(cat /sys/class/net/eth0/statistics/tx_packets)"
"""


def count(g: M.MigGuest, key: str) -> int:
    return int(g.results.get(key, 0))


def backs(g: M.MigGuest) -> list[dict[str, str]]:
    """The back steps (a sequence number lower than the last) ``udpseq`` printed on this QEMU's console."""
    return [r for r in map(guestkit.parse_result, g.lines) if "back" in r]


@pytest.mark.parametrize("metadata", ["direct", "copy"])
def test_net_numbered_frames_across_migrations(kit, running: Cleanup, tmp_path: Path, metadata: str) -> None:
    """Both hosts' back-ends are ``serve net --mode source`` (numbered, checksummed frames); the guest receives
    the stream (``udpseq``: its stack checks each UDP checksum, it checks each number and payload) and sends
    datagrams that the back-ends' TX side consumes, while it is migrated A -> B and back to a new QEMU on A's
    back-end.  0 corrupt frames, 0 checksum errors, 0 repeated or out of order: the only step back in the
    numbers is one at each switchover (the new back-end's queue starts at 0); frames and datagrams flow again
    after each; every datagram the guest's driver transmitted was consumed by a back-end, none twice."""
    udpseq = tmp_path / "udpseq"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(udpseq), str(UDPSEQ)], check=True)

    def backend(name: str) -> M.Backend:
        sock = str(tmp_path / f"{name}.sock")
        args = ("--mode", "source", "--pkt-size", str(FRAME_SIZE), "--metadata", metadata)
        return running.backend(M.Backend.pyvhost("net", sock, tmp_path, *args))

    def guest(b: M.Backend, incoming: str | None = None) -> M.MigGuest:
        g = M.MigGuest(
            kit,
            b.sock,
            SEQ_SCRIPT,
            mac=FRAME_MAC,
            memory_mb=GUEST_MB,
            workdir=str(tmp_path),
            incoming=incoming,
            files={"udpseq": udpseq.read_bytes()},
        )
        return running.guest(g)

    a = backend("a")
    ga = guest(a)
    ga.expect("udpseq", STEP_TIMEOUT)
    poll(lambda: count(ga, "rx") >= FRAMES_AFTER and count(ga, "tx") >= FRAMES_AFTER, "frames on A", tail=ga.tail)
    hops = []
    src = ga
    for hop, b in enumerate([backend("b"), a]):
        dst = guest(b, incoming=str(tmp_path / f"mig{hop}.sock"))
        before = count(src, "rx")
        mig = M.migrate(src, dst)
        src.quit()
        at = count(src, "rx"), count(src, "tx")
        poll(
            lambda at=at: count(dst, "rx") >= at[0] + FRAMES_AFTER and count(dst, "tx") >= at[1] + FRAMES_AFTER,
            f"frames received and datagrams sent after switchover {hop}",
            tail=dst.tail,
        )
        hops.append((mig, at[0] - before))
        src = dst
    src.qmp.cmd("set_link", name="n0", up=False)  # udpseq's signal to stop
    src.wait(STEP_TIMEOUT)
    r = src.results
    assert r.get("exit") == "0" and r.get("done") == "1", src.tail()
    assert r["corrupt"] == "0" and r["csum_errors"] == "0", f"corrupt frames: {r}"
    assert r["repeats"] == "0", f"repeated frames: {r}"
    assert backs(ga) == [], f"a step back in the numbers on A, before any migration: {backs(ga)}"
    for g in running.guests[1:]:
        steps = backs(g)
        assert len(steps) == 1, f"want one step back (the new back-end's numbers) after a switchover: {steps}"
        assert int(steps[0]["back_seq"]) < int(steps[0]["back_last"]), steps
    assert r["backs"] == "2", r
    received: dict[str, int] = {}
    per_conn = []
    discarded = 0
    for b in running.backends:
        b.stop()
        assert_log_path(b.log.read_text(), metadata, at_least=2)
        stats = b.stats()
        assert stats is not None
        for conn in [*stats["ended"], stats["live"]]:
            for q, s in (conn or {}).items():
                assert s["error"] == 0, f"{b.sock}: queue {q} broke: {s}"
                received[q] = received.get(q, 0) + s["packets"]
                if q == "1":  # frames of a TX ring disabled at a switchover: completed, discarded (vhost-user)
                    discarded += s["drops"]
            if conn:
                per_conn.append(
                    (Path(b.sock).stem, conn.get("0", {}).get("packets", 0), conn.get("1", {}).get("packets", 0))
                )
    served = [c for c in per_conn if c[1] > 0]  # (QEMU may connect more than once)
    assert [c[0] for c in served] == ["a", "a", "b"], f"A, A' and B each delivered frames: {per_conn}"
    assert all(c[2] > 0 for c in served), f"datagrams consumed by each back-end connection: {per_conn}"
    # none twice; a few fewer than the guest's driver completed: QEMU stops the back-end at ``set_link`` off and
    # completes (drops) itself what the guest sends until udpseq sees the carrier down -- at most a ring
    consumed = received.get("1", 0) + discarded
    unseen = int(r["tx_packets"]) - consumed
    assert 0 <= unseen <= 256, f"guest -> back-ends: {received}, {discarded} discarded, the guest's {r}"
    report = "; ".join(f"hop {n}: {m.summary()}, {d} frames during" for n, (m, d) in enumerate(hops))
    print(
        f"\nnet numbered {metadata}: {len(hops)} migrations, {r['rx']} frames received ({r['lost']} lost in "
        f"{r['gaps']} gaps, {r['drops']} packet socket drops), {received.get('0', 0)} delivered by the "
        f"back-ends, {r['tx_packets']} transmitted: {consumed} consumed ({discarded} discarded at a switchover), "
        f"{unseen} dropped by QEMU after set_link off; per connection (back-end, frames, datagrams): {served}; "
        f"corrupt 0, checksum errors 0, repeated 0, "
        f"out of order 0; {report}"
    )
