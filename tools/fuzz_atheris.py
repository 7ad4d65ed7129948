"""Coverage-guided (atheris, i.e. libFuzzer over Python bytecode) harnesses.

``parser``: the input is decoded into 1-8 vhost-user messages (request id, flags, header size, payload, fds of
several kinds) sent over a socketpair to a ``Connection`` in this process, read and dispatched exactly as
``Server._read_one`` does.  protocol.py and backend.py are instrumented, so libFuzzer steers towards new
branches of the parser and the handlers.  Checked per input: nothing but the peer's mistakes is raised, every
reply the model says is owed (see fuzz_messages) arrives and nothing else, and after teardown the process has
exactly the fds it had before.

``chain``: the input is decoded into a ring of 1-16 descriptors (fields drawn in ranges that hit the guest
regions, their edges, the hole between them and beyond), an indirect table, a head and a direction, laid out in
guest memory of three regions with a hole (as tools/fuzz_ring.py).  The Python bytecode of the split and packed
chain walkers (``walk_chain.py_func``, ``walk_packed.py_func``) is instrumented and run; its result must equal
the compiled walker's on both metadata paths (differential), every segment must lie inside a region, and no
canary byte may change.  (Compiled code cannot be instrumented by atheris; running the walkers' own source in
Python gives libFuzzer their branches, and the comparison shows the compiled code does the same.)
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import types

import atheris
import numpy as np

from pyvhost import protocol as P
from pyvhost.protocol import ProtocolFeature as PF
from pyvhost.protocol import Request as R

logging.getLogger("pyvhost").setLevel(logging.CRITICAL)
logging.getLogger("pyvhost").propagate = False


def instrument_module(mod: types.ModuleType) -> int:
    """Instrument (in place) the plain Python functions and methods a module defines -- not its compiled
    (Numba) ones, whose bytecode must stay as written for the compiler: atheris.instrument_imports would
    instrument those too."""
    done = 0

    def fix(fn) -> None:
        nonlocal done
        if isinstance(fn, types.FunctionType) and fn.__module__ == mod.__name__:
            atheris.instrument_func(fn)
            done += 1

    for obj in list(vars(mod).values()):
        fix(obj)
        if isinstance(obj, type) and obj.__module__ == mod.__name__:
            for attr in vars(obj).values():
                if isinstance(attr, (staticmethod, classmethod)):
                    attr = attr.__func__
                if isinstance(attr, property):
                    for f in (attr.fget, attr.fset):
                        fix(f)
                else:
                    fix(attr)
    return done


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------------------------------------------------
class ParserHarness:
    def __init__(self) -> None:
        import pyvhost.backend
        import pyvhost.ring.inflight
        from pyvhost.access import Metadata
        from pyvhost.backend import Connection
        from pyvhost.devices.net import NetDevice

        for mod in (P, pyvhost.backend, pyvhost.ring.inflight):
            instrument_module(mod)

        self.Connection, self.NetDevice, self.Metadata = Connection, NetDevice, Metadata
        self.memfd = os.memfd_create("atheris-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, 1 << 20)
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.pipe = os.pipe()
        self.pool = [self.memfd, self.efd, self.pipe[0], self.pipe[1]]
        self.requests = [int(r) for r in R] + [0, 41, 99, 0xFFFF]
        self.runs = 0

    def one(self, data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        before = _fds()
        a, b = socket.socketpair()
        a.settimeout(5)
        b.settimeout(5)
        conn = self.Connection(b, self.NetDevice(), self.Metadata.DIRECT)
        owed_always = set(conn.replies)
        offered_pf = conn.offered_protocol_features
        reply_ack = False
        try:
            for _ in range(fdp.ConsumeIntInRange(1, 8)):
                req = self.requests[fdp.ConsumeIntInRange(0, len(self.requests) - 1)]
                if fdp.ConsumeIntInRange(0, 15) == 0:
                    req = fdp.ConsumeInt(4) & 0xFFFFFFFF
                flags = P.VHOST_USER_VERSION | (P.VHOST_USER_NEED_REPLY_MASK if fdp.ConsumeBool() else 0)
                if fdp.ConsumeIntInRange(0, 15) == 0:
                    flags = fdp.ConsumeInt(4) & 0xFFFFFFFF
                payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 320))
                size = len(payload)
                if fdp.ConsumeIntInRange(0, 31) == 0:
                    size = fdp.ConsumeInt(4) & 0xFFFFFFFF
                nfds = fdp.ConsumeIntInRange(0, 3) if fdp.ConsumeBool() else 0
                fds = [self.pool[fdp.ConsumeIntInRange(0, len(self.pool) - 1)] for _ in range(nfds)]
                if size != len(payload) and size <= P.MAX_PAYLOAD:
                    size = len(payload)  # a short stream would stall the reader; stalls are fuzz_messages' job
                data_out = P.HEADER.pack(req, flags, size) + payload
                if fds:
                    socket.send_fds(a, [data_out], fds)
                else:
                    a.sendall(data_out)
                version_ok = (flags & P.VHOST_USER_VERSION_MASK) == P.VHOST_USER_VERSION
                if req == R.SET_PROTOCOL_FEATURES and version_ok and len(payload) >= 8 and size <= P.MAX_PAYLOAD:
                    value = int.from_bytes(payload[:8], "little")
                    if not value & ~offered_pf:
                        reply_ack = bool(value & (1 << PF.REPLY_ACK))
                # what Server._read_one does
                try:
                    msg = P.recv_message(b)
                except P.ConnectionClosed:
                    assert size > P.MAX_PAYLOAD, "closed a connection over a message of a valid size"
                    return
                except P.ProtocolError as e:
                    if e.message is not None:
                        conn.answer(e.message, None, False)
                else:
                    conn.handle(msg)
                owed = req in owed_always or bool(flags & P.VHOST_USER_NEED_REPLY_MASK and reply_ack)
                a.setblocking(False)
                try:
                    got = []
                    while True:
                        try:
                            got.append(P.recv_message(a))
                        except (BlockingIOError, P.ConnectionClosed):
                            break
                finally:
                    a.setblocking(True)
                    a.settimeout(5)
                for m in got:
                    m.close_fds()
                assert len(got) == (1 if owed else 0), f"request {req} flags {flags:#x}: {len(got)} replies"
                if got:
                    assert got[0].request == req and got[0].flags & P.VHOST_USER_REPLY_MASK
        finally:
            conn.teardown()
            conn.close()  # the backend channel and the resume eventfd outlive teardown (a RESET_OWNER)
            a.close()
            b.close()
        after = _fds()
        assert after == before, f"fds: {before} before, {after} after"
        self.runs += 1


# ---------------------------------------------------------------------------------------------------------
class ChainHarness:
    def __init__(self) -> None:
        import fuzz_ring as F

        from pyvhost.ring import packed as PK
        from pyvhost.ring.chain import walk_chain
        from pyvhost.ring.state import Q_AVAIL_WRAP, Q_DESC, Q_DIRECT, Q_FIELDS, Q_LAST_AVAIL, Q_MASK, Q_PACKED, Q_SIZE

        self.F, self.PK = F, PK
        self.Q = dict(
            Q_DESC=Q_DESC,
            Q_DIRECT=Q_DIRECT,
            Q_FIELDS=Q_FIELDS,
            Q_SIZE=Q_SIZE,
            Q_MASK=Q_MASK,
            Q_PACKED=Q_PACKED,
            Q_LAST_AVAIL=Q_LAST_AVAIL,
            Q_AVAIL_WRAP=Q_AVAIL_WRAP,
        )
        self.env = F.RingFuzzEnv()
        self.walk_c = walk_chain
        self.walk_pc = PK.walk_packed
        # instrumented copies of the walkers' Python code (the compiled dispatchers keep the originals)
        self.walk_py = atheris.instrument_func(_copy(walk_chain.py_func))
        self.walk_ppy = atheris.instrument_func(_copy(PK.walk_packed.py_func))
        self.canary = self.env.ram.copy()
        self.runs = 0
        self.segments = 0

    def one(self, data: bytes) -> None:
        F, env, Q = self.F, self.env, self.Q
        fdp = atheris.FuzzedDataProvider(data)
        packed = fdp.ConsumeBool()
        n = fdp.ConsumeIntInRange(1, 16)
        if not packed:
            n = 1 << (n % 5)
        ram = env.ram
        lay = env.lay
        d_off = 4096
        t_off = F.TABLES_OFF
        sizes = (F.A_END - F.A_OFF, F.B_END - F.B_OFF, F.C_END - F.C_OFF)
        bases = (F.GPA_A, F.GPA_B, F.GPA_C)

        def addr() -> int:
            k = fdp.ConsumeIntInRange(0, 7)
            if k == 7:
                return fdp.ConsumeInt(8) & (2**64 - 1)
            r = k % 3
            return bases[r] + fdp.ConsumeIntInRange(-64, sizes[r] + 64)

        def desc(off: int, table: bool) -> None:
            a = addr()
            length = fdp.ConsumeIntInRange(0, 600) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeInt(4) & 0xFFFFFFFF
            flags = fdp.ConsumeIntInRange(0, 7) | (fdp.ConsumeIntInRange(0, 3) << 14 if packed else 0)
            if packed and not table:
                flags |= F.AVAIL_F if fdp.ConsumeIntInRange(0, 3) else fdp.ConsumeIntInRange(0, 1) << 7
                mid = fdp.ConsumeIntInRange(0, n + 1)  # buffer id
            else:
                small = fdp.ConsumeIntInRange(0, 7)
                mid = fdp.ConsumeIntInRange(0, n + 2) if small else fdp.ConsumeIntInRange(0, 0xFFFF)
            word = (
                (length & 0xFFFFFFFF) | (mid & 0xFFFF) << 32 | (flags & 0xFFFF) << 48
                if packed
                else (length & 0xFFFFFFFF) | (flags & 0xFFFF) << 32 | (mid & 0xFFFF) << 48
            )
            ram[off : off + 8] = np.frombuffer(int(a & (2**64 - 1)).to_bytes(8, "little"), np.uint8)
            ram[off + 8 : off + 16] = np.frombuffer(int(word).to_bytes(8, "little"), np.uint8)

        for i in range(n):
            desc(d_off + 16 * i, False)
        for j in range(fdp.ConsumeIntInRange(0, 8)):
            desc(t_off + 16 * j, True)
        head = fdp.ConsumeIntInRange(0, n) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 0xFFFF)
        want = fdp.ConsumeIntInRange(0, 2)
        wrap = 1
        room = fdp.ConsumeIntInRange(1, n)
        results = []
        for direct, fn in ((False, "py"), (False, "c"), (True, "c")):
            q = np.zeros(Q["Q_FIELDS"], np.int64)
            q[Q["Q_SIZE"]], q[Q["Q_MASK"]] = n, n - 1
            q[Q["Q_DESC"]] = int(lay[F.L_UVA]) + d_off
            q[Q["Q_DIRECT"]] = 1 if direct else 0
            off = env.mem.translate(1, int(lay[F.L_UVA]) + d_off, 16 * n)
            dview = env.mem.arena.view[off : off + 16 * n].view(np.uint64) if direct else np.zeros(0, np.uint64)
            sg = np.zeros((n + 1024, 2), np.int64)
            arena, table = env.mem.arena.view, env.mem.table
            if packed:
                q[Q["Q_PACKED"]] = 1
                hf = self.PK.read_head(q, dview, arena, table, 0, wrap)
                if hf < 0:
                    results.append((int(hf), int(q[10]), ()))
                    continue
                walk = self.walk_ppy if fn == "py" else self.walk_pc
                r = walk(q, dview, arena, table, 0, wrap, hf, sg, want, room)
            else:
                walk = self.walk_py if fn == "py" else self.walk_c
                r = walk(q, dview, arena, table, head, sg, want)
            r = tuple(int(x) for x in r)
            results.append((r, int(q[10]), tuple(map(tuple, sg[: max(r[1], 0)].tolist()))))
            if r[0] >= 0:
                for o, ln in sg[: r[1]]:
                    assert ln > 0 and any(ro <= o and o + ln <= ro + rs for ro, rs in env.regions), (
                        f"segment ({o}, {ln}) outside the regions"
                    )
        assert results[0] == results[1] == results[2], f"python / compiled copy / compiled direct differ: {results}"
        assert F._canaries_ok(ram, lay)
        self.runs += 1


def _u64_words(dispatcher):
    """A compiled accessor called from Python returns a u64 as a Python int; compiled code keeps it a u64.
    Give the Python walker what the compiled one sees (else a value >= 2**63 would not fit the int64 that
    Numba types a Python int as, in the next compiled call)."""

    def wrapped(*args):
        r = dispatcher(*args)
        return (np.uint64(r[0]), np.uint64(r[1]), r[2]) if isinstance(r, tuple) else np.uint64(r)

    return wrapped


def _copy(fn: types.FunctionType) -> types.FunctionType:
    """A copy of a compiled function's Python code, to instrument and run as Python."""
    g = dict(fn.__globals__)
    for name in ("read_desc", "ld64"):
        if name in g:
            g[name] = _u64_words(g[name])
    return types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)


def main(which: str, libfuzzer_args: list[str]) -> int:
    harness = ParserHarness() if which == "parser" else ChainHarness()
    atheris.Setup([f"fuzz.py {which}", *libfuzzer_args], harness.one)
    atheris.Fuzz()  # returns only by exiting the process (libFuzzer's -runs / -max_total_time)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
