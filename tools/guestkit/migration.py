"""Live migration of a guestkit guest between two QEMUs on one host, each with its own vhost-user back-end.

``QMP`` is a QEMU Machine Protocol client on a Unix socket.  ``MigGuest`` is a ``guestkit.Guest`` with a QMP
socket of its own and optionally ``-incoming unix:PATH`` (a destination); ``BlkMigGuest`` has a
vhost-user-blk device instead of virtio-net.  ``Backend`` is one back-end process (``pyvhost serve`` or
``qemu-storage-daemon``) on its own socket.  ``migrate`` drives ``migrate-set-parameters`` (bandwidth limited
so that the migration iterates while the guest runs, lifted after a few dirty-sync rounds so that it
converges), ``migrate`` and ``query-migrate`` until the migration completes or fails, and waits until the
destination runs.

Guest RAM must be shared (guestkit's ``memory-backend-memfd,share=on``) for a vhost-user back-end, and QEMU
refuses to migrate unless the back-end offers ``VHOST_F_LOG_ALL`` and ``VHOST_USER_PROTOCOL_F_LOG_SHMFD``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import guestkit

MiB = 1 << 20
#: migration statuses after which query-migrate changes no more
FINAL = ("completed", "failed", "cancelled")


class QMPError(RuntimeError):
    pass


class MigrationFailed(RuntimeError):
    pass


class QMP:
    """A QMP client: ``cmd(name, **arguments)`` returns the command's ``return``; events are kept."""

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no QMP on {path} within {timeout:.0f} s") from None
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rwb")
        self.events: list[dict] = []
        greeting = self._read()
        while "event" in greeting:  # seen once: a MIGRATION event ahead of the greeting (kept, as cmd() keeps them)
            self.events.append(greeting)
            greeting = self._read()
        if "QMP" not in greeting:
            raise QMPError(f"not a QMP greeting: {greeting}")
        self.cmd("qmp_capabilities")

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise QMPError("QMP connection closed")
        return json.loads(line)

    def cmd(self, command: str, /, **arguments) -> dict:
        msg: dict = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
            elif "error" in r:
                raise QMPError(f"{command}: {r['error'].get('desc', r['error'])}")
            elif "return" in r:
                return r["return"]

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self.sock.close()


@dataclass
class MigGuest(guestkit.Guest):
    """A guest with a QMP socket ``<workdir>/qmp.sock``; ``incoming`` (a Unix socket path) makes it a
    destination that waits for the migration stream there."""

    incoming: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.qmp_path = str(Path(self._tmp) / "qmp.sock")
        self._qmp: QMP | None = None

    def command(self, initrd: str) -> list[str]:
        args = ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if self.incoming:
            args += ["-incoming", f"unix:{self.incoming}"]
        return [*super().command(initrd), *args]

    @property
    def qmp(self) -> QMP:
        if self._qmp is None:
            self._qmp = QMP(self.qmp_path)
        return self._qmp

    def quit(self, timeout: float = 30) -> None:
        """``quit`` over QMP (a source after its migration); the process is waited for."""
        assert self.proc is not None
        try:
            self.qmp.cmd("quit")
        except (QMPError, OSError):
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.close_qmp()

    def close_qmp(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None

    def close(self) -> None:
        self.close_qmp()
        super().close()


@dataclass
class BlkMigGuest(MigGuest):
    """A migratable guest with one vhost-user-blk device (``/dev/vda``) instead of virtio-net."""

    def device_args(self) -> list[str]:
        chardev = f"socket,id=c0,path={self.socket_path}" + (",reconnect=1" if self.reconnect else "")
        return ["-chardev", chardev, "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1,vectors=0"]


@dataclass
class Migration:
    """What ``query-migrate`` said when the migration ended, and what was seen while it ran."""

    info: dict
    #: the most dirty-sync rounds and the highest dirty-pages-rate seen while it ran
    syncs: int
    dirty_rate: int
    #: the bandwidth limit was lifted after ``syncs`` rounds (the guest dirtied faster than the limit)
    lifted: bool

    @property
    def downtime_ms(self) -> int:
        return int(self.info.get("downtime", -1))

    @property
    def total_ms(self) -> int:
        return int(self.info.get("total-time", -1))

    def summary(self) -> str:
        ram = self.info.get("ram", {})
        return (
            f"downtime {self.downtime_ms} ms, total {self.total_ms} ms, {self.syncs} dirty syncs, "
            f"dirty rate {self.dirty_rate} pages/s, {ram.get('transferred', 0) >> 20} MiB sent"
            + (", limit lifted" if self.lifted else "")
        )


def migrate(
    src: MigGuest,
    dst: MigGuest,
    bandwidth: int = 16 * MiB,
    lift_after: int = 4,
    timeout: float = 120,
    while_running: Callable[[dict], None] | None = None,
) -> Migration:
    """Migrate ``src`` to ``dst`` (started with ``incoming``) at ``bandwidth`` bytes/s, lifted to 1 GiB/s
    after ``lift_after`` dirty-sync rounds; poll ``query-migrate`` (calling ``while_running`` with each
    answer) until it completes; wait until ``dst`` runs.  Raises MigrationFailed with QEMU's reason."""
    assert dst.incoming
    q = src.qmp
    q.cmd("migrate-set-parameters", **{"max-bandwidth": bandwidth, "downtime-limit": 300})
    dst.qmp  # noqa: B018 -- the destination's QMP answers before the stream starts
    q.cmd("migrate", uri=f"unix:{dst.incoming}")
    deadline = time.monotonic() + timeout
    syncs = rate = 0
    lifted = False
    while True:
        info = q.cmd("query-migrate")
        status = info.get("status")
        ram = info.get("ram", {})
        syncs = max(syncs, int(ram.get("dirty-sync-count", 0)))
        rate = max(rate, int(ram.get("dirty-pages-rate", 0)))
        if status == "completed":
            break
        if status in FINAL:
            raise MigrationFailed(f"migration {status}: {info.get('error-desc', info)}")
        if not lifted and syncs >= lift_after:
            q.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 30})
            lifted = True
        if while_running is not None:
            while_running(info)
        if time.monotonic() > deadline:
            q.cmd("migrate_cancel")
            raise MigrationFailed(f"migration not completed within {timeout:.0f} s: {info}")
        time.sleep(0.05)
    while (st := dst.qmp.cmd("query-status"))["status"] != "running":
        if time.monotonic() > deadline:
            raise MigrationFailed(f"destination not running within {timeout:.0f} s: {st}")
        time.sleep(0.05)
    return Migration(info, syncs, rate, lifted)


class Backend:
    """One back-end process serving ``sock`` (its output in ``log``); ``ready`` tells when it listens."""

    def __init__(self, argv: list[str], sock: str, log: Path, ready: Callable[[], bool]) -> None:
        self.argv = argv
        self.sock = sock
        self.log = log
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240  # a cold kernel compile may come first
        while not ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"back-end exited ({self.proc.returncode}):\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"back-end not ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)

    @classmethod
    def pyvhost(cls, device: str, sock: str, workdir: Path, *args: str, prefix: tuple[str, ...] = ()) -> Backend:
        """``pyvhost -v serve DEVICE --socket-path SOCK ... ARGS`` (``prefix``: e.g. ``ip netns exec NS``),
        counters written to ``<sock>.stats.json`` at exit."""
        ready = workdir / (Path(sock).name + ".ready")
        b = cls(
            [
                *prefix,
                sys.executable,
                "-m",
                "pyvhost",
                "-v",
                "serve",
                device,
                "--socket-path",
                sock,
                "--ready-file",
                str(ready),
                "--stats-json",
                sock + ".stats.json",
                *args,
            ],
            sock,
            workdir / (Path(sock).name + ".log"),
            ready.exists,
        )
        return b

    @classmethod
    def storage_daemon(cls, image: Path, sock: str, workdir: Path) -> Backend:
        """``qemu-storage-daemon`` exporting ``image`` as vhost-user-blk (libvhost-user: logs dirty pages)."""
        return cls(
            [
                "qemu-storage-daemon",
                "--blockdev",
                f"driver=file,node-name=file0,filename={image},locking=off",
                "--export",
                f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={sock},writable=on",
            ],
            sock,
            workdir / (Path(sock).name + ".log"),
            lambda: os.path.exists(sock),
        )

    @classmethod
    def testpmd(cls, sock: str, tap: str, workdir: Path, prefix: tuple[str, ...] = ()) -> Backend:
        """DPDK's testpmd forwarding between a vhost-user port on ``sock`` (the vhost library logs dirty pages)
        and a tap ``tap`` it creates; two lcores (one polls), no hugepages."""
        name = Path(sock).name.split(".")[0]
        return cls(
            [
                *prefix,
                "dpdk-testpmd",
                "--no-huge",
                "-m",
                "256",
                "-l",
                "0,1",
                "--no-pci",
                "--file-prefix",
                f"pyvhost-mig-{os.getpid()}-{name}",
                "--vdev",
                f"net_vhost0,iface={sock}",
                "--vdev",
                f"net_tap0,iface={tap}",
                "--",
                "--forward-mode=io",
                "--auto-start",
                "--nb-cores=1",
                "--total-num-mbufs=8192",
                "--stats-period",
                "3600",  # runs until signalled (without it, testpmd exits at EOF on its stdin)
            ],
            sock,
            workdir / (name + ".log"),
            lambda: os.path.exists(sock),
        )

    def stats(self) -> dict | None:
        """The counters ``pyvhost serve`` wrote at exit (None for another back-end or before it exited)."""
        p = Path(self.sock + ".stats.json")
        return json.loads(p.read_text()) if p.exists() else None

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then SIGKILL if it does not exit; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# -- the namespace's end of the streams that cross a migrating guest's network -------------------------------
def _progress(path: str, nbytes: int) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(nbytes))
    os.replace(tmp, path)


def progress(path: str) -> int:
    """Bytes a ``send``/``recv`` peer has moved so far (0 before it started)."""
    try:
        return int(Path(path).read_text() or 0)
    except FileNotFoundError:
        return 0


def stream_send(host: str, port: int, stop: str, progress_path: str, timeout: float) -> dict:
    """Connect to ``host:port`` (retrying until the guest listens), send seeded random bytes until the file
    ``stop`` exists, close; the bytes sent and their md5."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            s = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    s.settimeout(timeout)
    data = random.Random(7).randbytes(1 << 16)
    h = hashlib.md5()
    total = 0
    while not os.path.exists(stop):
        s.sendall(data)
        h.update(data)
        total += len(data)
        _progress(progress_path, total)
    s.close()
    return {"bytes": total, "md5": h.hexdigest()}


def stream_recv(port: int, chunk: int, ready: str, progress_path: str, timeout: float) -> dict:
    """Accept one connection on ``port``; read to EOF in ``chunk``-byte pieces, each of which must have the
    md5 the guest printed (``<ready>.md5``, read once the first chunk is in); chunks and bad chunks."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    srv.settimeout(timeout)
    Path(ready).write_text("listening")
    conn, _ = srv.accept()
    conn.settimeout(timeout)
    buf = bytearray()
    chunks = bad = total = 0
    want = None
    while True:
        data = conn.recv(1 << 16)
        if not data:
            break
        total += len(data)
        buf += data
        while len(buf) >= chunk:
            if want is None:
                want = Path(ready + ".md5").read_text().strip()
            bad += hashlib.md5(buf[:chunk]).hexdigest() != want
            chunks += 1
            del buf[:chunk]
        _progress(progress_path, total)
    conn.close()
    srv.close()
    return {"bytes": total, "chunks": chunks, "bad": bad, "tail": len(buf)}


def main(argv: list[str]) -> int:
    """``migration.py send HOST PORT STOP PROGRESS`` / ``migration.py recv PORT CHUNK READY PROGRESS``:
    one JSON line of results on stdout."""
    if argv[:1] == ["send"]:
        out = stream_send(argv[1], int(argv[2]), argv[3], argv[4], timeout=300)
    elif argv[:1] == ["recv"]:
        out = stream_recv(int(argv[1]), int(argv[2]), argv[3], argv[4], timeout=300)
    else:
        print(main.__doc__)
        return 2
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
