"""vhost-user message fuzzing: random message sequences against a live back-end, with a model of what is owed.

The model is small and exact: a message is owed one reply if its request is one the back-end always answers
(the GET_* requests: ``Connection.replies``, read from the code under test) or if it asks for one (NEED_REPLY)
while REPLY_ACK is negotiated -- which the model tracks from the SET_PROTOCOL_FEATURES it sent; a header whose
size is over the protocol's limit is owed a closed connection.  ``Session.send`` sends one message and checks
exactly that: the owed reply arrives (of the right request, flagged as a reply; an ack is 8 bytes), nothing
else does, and the connection stays up unless it was owed a close.  Any fd a reply carries is closed.

``run_campaign`` drives ``pyvhost serve net`` in a subprocess with random messages -- every request id (and
unknown ones), payloads valid or mutated (truncated, extended, random, boundary values), wrong versions and
flags, 0..10 fds of every kind (memfd, eventfd, pipe, socket, /dev/null), oversized headers, messages cut
short, disconnects -- over guest RAM that is sometimes random, with kicks, so workers start, break rings and
get stopped while messages arrive.  It checks after every message what the model says, every 1000 messages
the server's open fds and mappings, at every reconnect that the server is back to exactly the fds it had
(nothing leaked by the connection that ended), and at the end that the server is alive, exits cleanly, and
logged no Python traceback or handler bug.
"""

from __future__ import annotations

import mmap
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from pyvhost import protocol as P
from pyvhost.protocol import ProtocolFeature as PF
from pyvhost.protocol import Request as R

NEED_REPLY = P.VHOST_USER_NEED_REPLY_MASK
REPLY = P.VHOST_USER_REPLY_MASK
V1 = P.VHOST_USER_VERSION
RAM = 1 << 20
GPA = 0x4000_0000


class ModelError(AssertionError):
    """The back-end did not do what the model says it owes."""


def owed_requests() -> set[int]:
    """The requests the back-end always answers, as its code says (``Connection.replies``)."""
    from pyvhost.access import Metadata
    from pyvhost.backend import Connection
    from pyvhost.devices.net import NetDevice

    a, b = socket.socketpair()
    try:
        conn = Connection(a, NetDevice(), Metadata.DIRECT)
        owed = set(conn.replies)
        conn.mem.close()
    finally:
        a.close()
        b.close()
    return owed


@dataclass
class Stats:
    messages: int = 0
    replies: int = 0
    acks_ok: int = 0
    acks_failed: int = 0
    closes: int = 0
    sessions: int = 0
    fds_sent: int = 0
    fds_received: int = 0
    per_request: dict[str, int] = field(default_factory=dict)


class Session:
    """One connection to the back-end, its guest RAM and fds, and the model of what it is owed."""

    def __init__(self, path: str, owed: set[int], stats: Stats, timeout: float = 20.0) -> None:
        self.path = path
        self.owed = owed
        self.stats = stats
        self.reply_ack = False
        self.log_shmfd = False
        self.offered_pf: int | None = None
        self.offered_features: int | None = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.sock.settimeout(timeout)
        self.closed = False
        self.memfd = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, RAM)
        self.mm = mmap.mmap(self.memfd, RAM, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.uva = _address_of(self.mm)
        self.eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(4)]
        self.pipe = os.pipe()
        s1, s2 = socket.socketpair()
        self.sockets = (s1, s2)
        self.devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.stats.sessions += 1

    # -- fds a message can carry --------------------------------------------------------------------------
    def fd(self, kind: str) -> int:
        return {
            "memfd": self.memfd,
            "eventfd": self.eventfds[0],
            "eventfd1": self.eventfds[1],
            "eventfd2": self.eventfds[2],
            "eventfd3": self.eventfds[3],
            "pipe": self.pipe[0],
            "socket": self.sockets[0].fileno(),
            "devnull": self.devnull,
        }[kind]

    # -- one message -----------------------------------------------------------------------------------
    def send(
        self, request: int, flags: int, payload: bytes, fds: list[int] | None = None, size: int | None = None
    ) -> P.Message | None:
        """Send one message (``size`` overrides the header's size field) and check what it is owed."""
        self.stats.messages += 1
        self.stats.fds_sent += len(fds or ())
        name = _name(request)
        self.stats.per_request[name] = self.stats.per_request.get(name, 0) + 1
        hdr_size = len(payload) if size is None else size
        data = P.HEADER.pack(request & 0xFFFFFFFF, flags & 0xFFFFFFFF, hdr_size & 0xFFFFFFFF) + payload
        if hdr_size > P.MAX_PAYLOAD:
            self._sendall(data, fds)
            self._expect_close(f"{name} with a header size of {hdr_size}")
            return None
        version_ok = (flags & P.VHOST_USER_VERSION_MASK) == V1
        fds_ok = len(fds or ()) <= P.MAX_FDS  # more: the fd list is truncated and the message refused whole
        if (
            request == R.SET_PROTOCOL_FEATURES
            and version_ok
            and fds_ok
            and len(payload) >= 8
            and self.offered_pf is not None
        ):
            value = struct.unpack_from("<Q", payload)[0]
            if not value & ~self.offered_pf:
                self.reply_ack = bool(value & (1 << PF.REPLY_ACK))
                self.log_shmfd = bool(value & (1 << PF.LOG_SHMFD))
        acked = bool(flags & NEED_REPLY and self.reply_ack)
        # SET_LOG_BASE is answered whenever LOG_SHMFD is negotiated: empty (taken) or a u64 status (refused)
        log_reply = request == R.SET_LOG_BASE and self.log_shmfd and not acked
        owed = request in self.owed or acked or log_reply
        self._sendall(data, fds)
        if not owed:
            return None
        reply = self._recv(f"the reply owed to {name} (flags {flags:#x}, {len(payload)} bytes)")
        if reply.request != request or not reply.flags & REPLY:
            reply.close_fds()
            raise ModelError(f"{name}: got {reply.name} flags {reply.flags:#x} instead of its reply")
        self.stats.replies += 1
        self.stats.fds_received += len(reply.fds)
        reply.close_fds()
        if log_reply:
            if len(reply.payload) not in (0, 8):
                raise ModelError(f"{name}: a reply of {len(reply.payload)} bytes")
        elif request not in self.owed:
            if len(reply.payload) != 8:
                raise ModelError(f"{name}: an ack of {len(reply.payload)} bytes")
            if struct.unpack("<Q", reply.payload)[0]:
                self.stats.acks_failed += 1
            else:
                self.stats.acks_ok += 1
        if request == R.GET_PROTOCOL_FEATURES and version_ok and len(reply.payload) == 8:
            self.offered_pf = struct.unpack("<Q", reply.payload)[0]
        if request == R.GET_FEATURES and version_ok and len(reply.payload) == 8:
            self.offered_features = struct.unpack("<Q", reply.payload)[0]
        return reply

    def ping(self) -> None:
        """A round trip: every reply owed so far has come and nothing else is pending."""
        self.send(R.GET_QUEUE_NUM, V1, b"")

    def learn(self) -> None:
        self.send(R.GET_FEATURES, V1, b"")
        self.send(R.GET_PROTOCOL_FEATURES, V1, b"")

    def _sendall(self, data: bytes, fds: list[int] | None) -> None:
        try:
            if fds:
                socket.send_fds(self.sock, [data], fds)
            else:
                self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ModelError(f"the back-end closed the connection unexpectedly ({e})") from e

    def _recv(self, what: str) -> P.Message:
        try:
            return P.recv_message(self.sock)
        except TimeoutError as e:
            raise ModelError(f"no answer: waited for {what}") from e
        except P.ConnectionClosed as e:
            raise ModelError(f"connection closed while waiting for {what}") from e

    def _expect_close(self, why: str) -> None:
        try:
            extra = self.sock.recv(1)
        except ConnectionResetError:
            extra = b""
        except TimeoutError as e:
            raise ModelError(f"{why}: the connection was not closed") from e
        if extra:
            raise ModelError(f"{why}: data instead of a closed connection")
        self.stats.closes += 1
        self.closed = True

    def hang_up(self, partial: bytes = b"", fds: list[int] | None = None) -> None:
        """Close the connection, maybe in the middle of a message."""
        if partial:
            try:
                self._sendall(partial, fds)
            except ModelError:
                pass
        self.sock.close()
        self.closed = True

    def close(self) -> None:
        if not self.closed:
            self.sock.close()
        self.closed = True
        self.mm.close()
        for fd in (self.memfd, *self.eventfds, *self.pipe, self.devnull):
            os.close(fd)
        for s in self.sockets:
            s.close()


def _address_of(mm: mmap.mmap) -> int:
    import ctypes

    c = ctypes.c_char.from_buffer(mm)
    addr = ctypes.addressof(c)
    del c  # the buffer export ends here, so the mapping can be closed later
    return addr


def _name(request: int) -> str:
    try:
        return R(request).name
    except ValueError:
        return "UNKNOWN"


# ---------------------------------------------------------------------------------------------------------
# random messages
INDICES = (0, 0, 1, 1, 1, 2, 3, 255, 256, 0xFFFF, 0xFFFFFFFF)
FD_KINDS = ("memfd", "eventfd", "eventfd1", "eventfd2", "eventfd3", "pipe", "socket", "devnull")
U64_EDGES = (0, 1, 2**62 - 1, 2**62, 2**63, 2**64 - 1, 2**64 - 4096, 0xFFFFFFFF, 0x1_0000_0000)


class Generator:
    """Random vhost-user messages for one session: mostly plausible, often subtly or grossly wrong."""

    def __init__(self, rng: random.Random, s: Session) -> None:
        self.r = rng
        self.s = s

    def u64(self) -> int:
        r = self.r
        k = r.randrange(4)
        if k == 0:
            return r.choice(U64_EDGES)
        if k == 1:
            return r.getrandbits(64)
        return r.randrange(0, 1 << r.choice((8, 16, 32)))

    def index(self) -> int:
        return self.r.choice(INDICES)

    def region(self, valid: bool = True) -> P.MemRegion:
        r = self.r
        if valid:
            off = r.randrange(0, RAM // 4096) * 4096
            size = r.randrange(1, (RAM - off) // 4096 + 1) * 4096
            gpa = GPA + r.choice((off, r.randrange(0, 64) << 20))
            return P.MemRegion(gpa, size, self.s.uva + off, off)
        return P.MemRegion(self.u64() & ~7 if r.randrange(2) else self.u64(), self.u64(), self.u64(), self.u64())

    def ring_addr(self) -> int:
        r = self.r
        if r.randrange(8) == 0:
            return self.u64()
        return self.s.uva + r.randrange(0, RAM // 64) * 64 + (r.randrange(0, 16) if r.randrange(8) == 0 else 0)

    def valid(self, req: int) -> tuple[bytes, list[str]]:
        """A plausible payload and the fd kinds it carries."""
        r = self.r
        s = self.s
        if req in (R.SET_FEATURES,):
            offered = s.offered_features if s.offered_features is not None else 0
            v = offered & r.getrandbits(64) | (1 << 32) | ((1 << 30) if r.randrange(4) else 0)
            return P.U64.pack(v & offered if r.randrange(8) else self.u64()), []
        if req == R.SET_PROTOCOL_FEATURES:
            offered = s.offered_pf if s.offered_pf is not None else (1 << PF.REPLY_ACK)
            v = offered & (r.getrandbits(64) | (1 << PF.REPLY_ACK) if r.randrange(4) else r.getrandbits(64))
            return P.U64.pack(v if r.randrange(8) else self.u64()), []
        if req == R.SET_MEM_TABLE:
            n = r.choice((0, 1, 1, 1, 2, 3, 8, 9))
            regions = [self.region(r.randrange(6) > 0) for _ in range(n)]
            nfds = n if r.randrange(6) else r.randrange(0, 10)
            kinds = ["memfd" if r.randrange(6) else r.choice(FD_KINDS) for _ in range(nfds)]
            return P.MEM_TABLE_HDR.pack(n, 0) + b"".join(x.pack() for x in regions), kinds
        if req in (R.ADD_MEM_REG, R.REM_MEM_REG):
            kinds = (
                (["memfd" if r.randrange(6) else r.choice(FD_KINDS)] if req == R.ADD_MEM_REG else [])
                if r.randrange(8)
                else [r.choice(FD_KINDS) for _ in range(r.randrange(3))]
            )
            return P.SINGLE_REGION_HDR.pack(0) + self.region(r.randrange(6) > 0).pack(), kinds
        if req in (R.SET_VRING_NUM,):
            return P.VRING_STATE.pack(
                self.index(), r.choice((1, 2, 4, 8, 64, 256, 1024, 32768, 0, 3, 65536, 2**32 - 1))
            ), []
        if req in (R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_ENABLE):
            num = r.choice((0, 1, 0, 1, 2, 0xFFFF, 0x10000, 0x8000, 0x80008000, 2**32 - 1, r.getrandbits(32)))
            return P.VRING_STATE.pack(self.index(), num), []
        if req == R.SET_VRING_ADDR:
            return P.VRING_ADDR.pack(
                self.index(),
                r.choice((0, 0, 1)),
                self.ring_addr(),
                self.ring_addr(),
                self.ring_addr(),
                self.u64() if r.randrange(4) == 0 else 0,
            ), []
        if req in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
            idx = self.index() & 0xFF if r.randrange(8) else self.u64()
            if r.randrange(5) == 0:
                return P.U64.pack(idx | P.VHOST_USER_VRING_NOFD_MASK), ([] if r.randrange(4) else [r.choice(FD_KINDS)])
            return P.U64.pack(idx), (
                [r.choice(FD_KINDS[1:5])] if r.randrange(6) else [r.choice(FD_KINDS) for _ in range(r.randrange(3))]
            )
        if req in (R.GET_CONFIG, R.SET_CONFIG):
            off, size = r.choice(((0, 6), (0, 12), (6, 2), (0, 256), (255, 2), (300, 1), (0, 0)))
            data = bytes(r.getrandbits(8) for _ in range(min(size, 256)))
            return P.CONFIG_HDR.pack(off, size, r.choice((0, 1))) + data, []
        if req in (R.SET_STATUS,):
            return P.U64.pack(r.choice((0, 1, 3, 7, 0xF, 0x40, 0x80, self.u64()))), []
        if req in (R.SET_LOG_BASE,):
            return P.LOG_HDR.pack(self.u64(), self.u64()), ["memfd" if r.randrange(2) else r.choice(FD_KINDS)]
        if req in (R.SET_LOG_FD,):
            return b"", [r.choice(FD_KINDS)]
        if req in (R.GET_INFLIGHT_FD, R.SET_INFLIGHT_FD):
            body = P.INFLIGHT.pack(
                r.choice((0, 4096, 1 << 20, 1 << 40, 2**64 - 1)),
                r.choice((0, 4096, 1, 2**63)),
                r.choice((0, 1, 2, 0xFFFF)),
                r.choice((0, 1, 256, 32768, 0xFFFF)),
            )
            return body + bytes(4), (["memfd"] if req == R.SET_INFLIGHT_FD and r.randrange(4) else [])
        if req == R.IOTLB_MSG:
            return P.IOTLB.pack(self.u64(), self.u64(), self.u64(), r.randrange(256), r.randrange(256)), []
        if req in (R.SET_BACKEND_REQ_FD,):
            return b"", ["socket"]
        return bytes(r.getrandbits(8) for _ in range(r.choice((0, 8, 8, 16, 40)))), []

    def setup_burst(self) -> list[tuple[int, int, bytes, list[str]]]:
        """A complete, valid set-up of both rings over the session's RAM (split or packed), so that workers
        start -- and then meet the random messages, kicks and RAM that follow."""
        r = self.r
        s = self.s
        offered = s.offered_features or 0
        features = offered & (
            (1 << 32) | (1 << 30) | (1 << 28) | (1 << 29) | (1 << 15) | ((1 << 34) if r.randrange(3) == 0 else 0)
        )
        out = [
            (R.SET_FEATURES, V1, P.U64.pack(features), []),
            (R.SET_MEM_TABLE, V1, P.MEM_TABLE_HDR.pack(1, 0) + P.MemRegion(GPA, RAM, s.uva, 0).pack(), ["memfd"]),
        ]
        for i in (0, 1):
            base = s.uva + i * 0x10000
            out += [
                (R.SET_VRING_NUM, V1, P.VRING_STATE.pack(i, r.choice((8, 64, 256))), []),
                (R.SET_VRING_BASE, V1, P.VRING_STATE.pack(i, 0 if features & (1 << 34) == 0 else 0x80008000), []),
                (R.SET_VRING_ADDR, V1, P.VRING_ADDR.pack(i, 0, base, base + 0x8000, base + 0x4000, 0), []),
                (R.SET_VRING_KICK, V1, P.U64.pack(i), [f"eventfd{'' if i == 0 else i}"]),
                (R.SET_VRING_CALL, V1, P.U64.pack(i), ["eventfd2"]),
                (R.SET_VRING_ENABLE, V1, P.VRING_STATE.pack(i, 1), []),
            ]
        return out

    def mutate(self, payload: bytes) -> bytes:
        r = self.r
        k = r.randrange(5)
        if k == 0 and payload:
            return payload[: r.randrange(len(payload))]
        if k == 1:
            return payload + bytes(r.getrandbits(8) for _ in range(r.randrange(1, 64)))
        if k == 2 and payload:
            b = bytearray(payload)
            for _ in range(r.randrange(1, 4)):
                b[r.randrange(len(b))] = r.getrandbits(8)
            return bytes(b)
        if k == 3:
            return bytes(r.getrandbits(8) for _ in range(r.choice((0, 1, 7, 8, 12, 40, 300))))
        return bytes(r.getrandbits(8) for _ in range(r.choice((P.MAX_PAYLOAD, 1000))))

    def message(self) -> tuple[int, int, bytes, list[str]]:
        r = self.r
        if r.randrange(20) == 0:
            req = r.choice((0, 41, 42, 99, 0xFFFF, 0xFFFFFFFF, r.getrandbits(32)))
        else:
            req = r.choice(list(R))
        payload, kinds = self.valid(req)
        if r.randrange(5) == 0:
            payload = self.mutate(payload)
        if r.randrange(12) == 0:
            kinds = [r.choice(FD_KINDS) for _ in range(r.choice((0, 1, 2, 8, 9, 10)))]
        k = r.randrange(40)
        if k == 0:
            flags = r.choice((0, 2, 3)) | (NEED_REPLY if r.randrange(2) else 0)
        elif k == 1:
            flags = V1 | REPLY | (NEED_REPLY if r.randrange(2) else 0)
        elif k == 2:
            flags = r.getrandbits(32)
        else:
            flags = V1 | (NEED_REPLY if r.randrange(5) < 2 else 0)
        return req, flags, payload, kinds


# ---------------------------------------------------------------------------------------------------------
# the server under test
def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _maps(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for _ in f)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


BAD_LOG = re.compile(r"Traceback|failed unexpectedly|Fatal Python error|Exception in thread|worker .* failed")


class Server:
    """``pyvhost serve net`` in a subprocess, its log in a file."""

    def __init__(self, workdir: str, mode: str = "sink", metadata: str = "direct") -> None:
        self.path = os.path.join(workdir, "fuzz.sock")
        self.log_path = os.path.join(workdir, "server.log")
        self.ready = os.path.join(workdir, "ready")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pyvhost",
                "serve",
                "net",
                "--socket-path",
                self.path,
                "--mode",
                mode,
                "--metadata",
                metadata,
                "--ready-file",
                self.ready,
            ],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        deadline = time.monotonic() + 600  # a cold kernel compile
        while not os.path.exists(self.ready):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 4000) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path) as f:
            return f.read()[-n:]

    def count(self, text: str) -> int:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path) as f:
            return sum(text in line for line in f)

    def bad_lines(self) -> list[str]:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path) as f:
            return [line.rstrip() for line in f if BAD_LOG.search(line)]

    def stop(self, timeout: float = 30) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
                raise ModelError("the server did not exit on SIGTERM") from None
        self.log.close()
        return self.proc.returncode


def run_campaign(count: int, seed: int = 1, metadata: str = "direct", mode: str = "sink", log=None) -> dict:
    """Send ``count`` random messages to a fresh ``pyvhost serve net``; raise ModelError on any breach."""
    rng = random.Random(seed)
    owed = owed_requests()
    stats = Stats()
    t0 = time.perf_counter()
    recent: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pyvhost-fuzz-") as workdir:
        srv = Server(workdir, mode, metadata)
        s: Session | None = None
        try:
            s = Session(srv.path, owed, stats)
            s.learn()
            base_fds, base_maps, base_rss = _fd_count(srv.pid), _maps(srv.pid), _rss_kib(srv.pid)
            max_fds = max_maps = 0
            sent = 0
            left = rng.randrange(50, 3000)
            g = Generator(rng, s)
            while sent < count:
                if s.closed or left <= 0:
                    if not s.closed:
                        k = rng.randrange(4)
                        if k == 0:  # in the middle of a message, with fds
                            s.hang_up(P.HEADER.pack(R.SET_MEM_TABLE, V1, 40) + bytes(rng.randrange(0, 40)), [s.memfd])
                        else:
                            s.hang_up()
                    s.close()
                    s = Session(srv.path, owed, stats)
                    s.learn()  # accepted only once the previous connection was torn down
                    g = Generator(rng, s)
                    left = rng.randrange(50, 3000)
                    fds, maps = _fd_count(srv.pid), _maps(srv.pid)
                    if fds != base_fds:
                        raise ModelError(f"the server has {fds} fds after a connection ended, {base_fds} before")
                    if maps > base_maps + 16:
                        raise ModelError(f"the server has {maps} mappings after a connection ended, {base_maps} before")
                k = rng.randrange(400)
                if k == 0:  # a header over the limit: the stream is unusable, the connection must go
                    s.send(
                        rng.randrange(1, 41),
                        V1,
                        bytes(rng.randrange(0, 64)),
                        [s.memfd] if rng.randrange(2) else None,
                        size=rng.choice((P.MAX_PAYLOAD + 1, 1 << 20, 0xFFFFFFFF)),
                    )
                elif k == 1:
                    s.mm[:] = os.urandom(RAM)  # random rings: workers that start break their queues
                elif k < 12:
                    for fd in s.eventfds:  # kicks
                        os.eventfd_write(fd, 1)
                elif k < 16:  # a whole valid set-up: workers start, then meet what follows
                    for req, flags, payload, kinds in g.setup_burst():
                        s.send(req, flags, payload, [s.fd(x) for x in kinds])
                else:
                    req, flags, payload, kinds = g.message()
                    desc = (
                        f"{_name(req)}({req}) flags={flags:#x} payload={payload[:48].hex()}"
                        f"{'...' if len(payload) > 48 else ''} fds={kinds}"
                    )
                    recent.append(desc)
                    del recent[:-20]
                    s.send(req, flags, payload, [s.fd(x) for x in kinds])
                    sent += 1
                    left -= 1
                if sent % 1000 == 0 and k >= 12:
                    if not srv.alive():
                        raise ModelError(f"the server died: {srv.tail()}")
                    fds, maps = _fd_count(srv.pid), _maps(srv.pid)
                    max_fds, max_maps = max(max_fds, fds), max(max_maps, maps)
                    # per connection: 3 fds per vring, a worker's wake fd, an inflight area -- never more
                    if fds > base_fds + 16:
                        raise ModelError(f"the server has {fds} fds, {base_fds} when idle")
                    if maps > base_maps + P.MAX_MEM_SLOTS + 64:
                        raise ModelError(f"the server has {maps} mappings, {base_maps} when idle")
                    if log:
                        log(f"{sent} messages, {stats.sessions} sessions, server fds {fds} maps {maps}")
            s.ping()
            rss = _rss_kib(srv.pid)
            if rss > base_rss + 200 * 1024:
                raise ModelError(f"server RSS grew from {base_rss} KiB to {rss} KiB")
            s.close()
            s = None
            if not srv.alive():
                raise ModelError(f"the server died: {srv.tail()}")
            rc = srv.stop()
            if rc != 0:
                raise ModelError(f"the server exited with {rc}: {srv.tail()}")
            workers_started, rings_broken = srv.count("started"), srv.count("broken: ")
            bad = srv.bad_lines()
            if bad:
                raise ModelError("the server logged bugs:\n" + "\n".join(bad[:20]) + "\n" + srv.tail())
        except ModelError as e:
            raise ModelError(
                f"{e}\nseed {seed}, after {stats.messages} messages; the last ones:\n  "
                + "\n  ".join(recent)
                + f"\nserver log tail:\n{srv.tail(2000)}"
            ) from None
        finally:
            if s is not None:
                s.close()
            if srv.alive():
                srv.proc.kill()
                srv.proc.communicate()
    return {
        "messages": stats.messages,
        "replies": stats.replies,
        "acks_ok": stats.acks_ok,
        "acks_failed": stats.acks_failed,
        "closed_by_server": stats.closes,
        "sessions": stats.sessions,
        "fds_sent": stats.fds_sent,
        "fds_received": stats.fds_received,
        "server_fds_idle": base_fds,
        "server_fds_max": max_fds,
        "server_maps_idle": base_maps,
        "server_maps_max": max_maps,
        "requests": len(stats.per_request),
        "workers_started": workers_started,
        "rings_broken": rings_broken,
        "seconds": round(time.perf_counter() - t0, 2),
    }
