"""Fuzzing (issue 6): the bounded CI campaign, the regressions it found, and a Hypothesis state machine over
vhost-user message sequences against a live server connection.

The campaign (``tools/fuzz.py``, marked ``fuzz``; ``make test`` runs it) is >= 10^6 random ring states through
the compiled split and packed kernels on both metadata paths (tools/fuzz_ring.py), >= 10^5 random messages
against ``pyvhost serve net`` on both paths (tools/fuzz_messages.py), and the coverage-guided atheris harnesses
for the message parser and the chain walkers (tools/fuzz_atheris.py).  Each part runs in a subprocess, so a
fault in compiled code is a failed test with the part's output (and its replay command), not a dead run.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from pyvhost import protocol as P
from pyvhost.devices import net_packed as NP
from pyvhost.devices.net import loopback
from pyvhost.errors import QueueError as E
from pyvhost.protocol import Request as R
from pyvhost.ring.state import (
    Q_CHAINS,
    Q_DESC,
    Q_DROPS,
    Q_ERROR,
    Q_FIELDS,
    Q_HDR_LEN,
    Q_LAST_AVAIL,
    Q_PACKETS,
    Q_USED_IDX,
    Q_USED_WRAP,
    new_queue_state,
)

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
sys.path.insert(0, str(TOOLS))

import fuzz_messages as FM  # noqa: E402
import fuzz_ring as FR  # noqa: E402

FUZZ = [sys.executable, str(TOOLS / "fuzz.py")]
SPLIT_ERRORS = [
    "RING_UNMAPPED",
    "AVAIL_IDX_JUMP",
    "HEAD_OUT_OF_RANGE",
    "NEXT_OUT_OF_RANGE",
    "CHAIN_TOO_LONG",
    "INDIRECT_BAD_SIZE",
    "INDIRECT_NESTED",
    "INDIRECT_WITH_NEXT",
    "INDIRECT_UNMAPPED",
    "ZERO_LENGTH",
    "BAD_ADDRESS",
    "BAD_DIRECTION",
]
PACKED_ERRORS = [
    "RING_UNMAPPED",
    "CHAIN_TOO_LONG",
    "INDIRECT_BAD_SIZE",
    "INDIRECT_NESTED",
    "INDIRECT_WITH_NEXT",
    "INDIRECT_UNMAPPED",
    "ZERO_LENGTH",
    "BAD_ADDRESS",
    "BAD_DIRECTION",
    "PACKED_BAD_WRAP",
    "PACKED_BAD_ID",
    "PACKED_INDIRECT_IN_CHAIN",
]
RING_STATES = 1_000_000
MESSAGES = 100_000


def _run(args: list[str], timeout: float) -> dict:
    """Run a campaign part; its last stdout line is its JSON result."""
    p = subprocess.run(FUZZ + args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    assert p.returncode == 0 and lines, (
        f"fuzz {' '.join(args)}: exit {p.returncode}\n{p.stdout[-6000:]}\n{p.stderr[-6000:]}"
    )
    return json.loads(lines[-1])


# =========================================================================================================
# the bounded campaign
@pytest.mark.fuzz
def test_ring_campaign_split_and_packed():
    out = _run(["ring", "--states", str(RING_STATES), "--layout", "both", "--seed", "1"], timeout=900)
    assert out["states"] >= RING_STATES
    split, packed = out["ring"]
    for r in (split, packed):
        assert r["copy_vs_direct_compared"] > 0 and r["returns"]["broken"] > 0 and r["chains"] > 0
        assert all(v > 0 for v in r["per_op"].values()) and all(v > 0 for v in r["per_placement"].values())
    # the generator reaches every way a split / packed queue can break
    assert set(SPLIT_ERRORS) <= set(split["broken_by"]), split["broken_by"]
    assert set(PACKED_ERRORS) <= set(packed["broken_by"]), packed["broken_by"]
    print(json.dumps(out))


@pytest.mark.fuzz
def test_message_campaign_both_paths():
    out = _run(["messages", "--count", str(MESSAGES), "--metadata", "both", "--seed", "1"], timeout=900)
    assert out["count"] >= MESSAGES
    for r in out["messages"]:
        assert r["sessions"] > 10 and r["closed_by_server"] > 0 and r["acks_ok"] > 0 and r["acks_failed"] > 0
        assert r["requests"] >= 40  # every request id (and unknown ones) was sent
        assert r["workers_started"] > 100 and r["rings_broken"] > 10  # messages met running, breaking workers
    print(json.dumps(out))


@pytest.mark.fuzz
@pytest.mark.parametrize("harness,runs", [("parser", 30_000), ("chain", 30_000)])
def test_atheris_harness(harness, runs, tmp_path):
    pytest.importorskip("atheris")
    p = subprocess.run(
        FUZZ
        + [
            harness,
            f"-runs={runs}",
            "-seed=1",
            "-max_len=2048",
            "-len_control=0",
            f"-artifact_prefix={tmp_path}/",
            "-timeout=20",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert p.returncode == 0 and f"Done {runs} runs" in p.stderr, p.stderr[-6000:]
    cov = [line for line in p.stderr.splitlines() if " DONE " in line]
    print(cov[-1] if cov else p.stderr[-500:])


# =========================================================================================================
# regressions the ring fuzzer found (both fixed in devices/net.py and devices/net_packed.py)
@pytest.fixture
def fuzz_env():
    env = FR.RingFuzzEnv()
    env.ram[4096:24576] = 0  # the ring area of region A
    yield env
    env.close()


def _w(env, off: int, fmt: str, *values) -> None:
    import struct

    data = struct.pack(fmt, *values)
    env.ram[off : off + len(data)] = np.frombuffer(data, np.uint8)


def _gpa(off: int) -> int:
    return FR.GPA_A + off - FR.A_OFF


def test_split_loopback_does_not_count_a_tx_chain_it_cannot_complete(fuzz_env):
    """The TX used ring's entries lie outside guest memory (copy path).  loopback used to deliver the frame to
    RX and count it before finding it could not write the TX used entry: a packet counted (and delivered) for a
    chain never completed.  Now the entry is written first, and a chain that cannot be completed is neither."""
    env = fuzz_env
    uva = env.ram.ctypes.data
    n = 4
    rq, tq = new_queue_state(n), new_queue_state(n)
    for q in (rq, tq):
        q[Q_HDR_LEN] = 12
    # RX ring in A, one 2 KiB writable buffer
    rq[Q_DESC : Q_DESC + 3] = (uva + 4096, uva + 8192, uva + 10240)
    _w(env, 4096, "<QIHH", _gpa(30 << 10), 2048, 2, 0)
    _w(env, 8192, "<HHH", 0, 1, 0)
    # TX ring: desc and avail in A, the used ring's index is the last 4 bytes of region C, its entries outside
    tq[Q_DESC : Q_DESC + 3] = (uva + 16384, uva + 20480, uva + FR.C_END - 4)
    _w(env, 16384, "<QIHH", _gpa(40 << 10), 12 + 64, 0, 0)
    _w(env, 20480, "<HHH", 0, 1, 0)
    _w(env, FR.C_END - 4, "<HH", 0, 0)
    e64, e16, e32 = np.zeros(0, np.uint64), np.zeros(0, np.uint16), np.zeros(0, np.uint32)
    ret = loopback(
        rq,
        e64,
        e16,
        e16,
        e32,
        tq,
        e64,
        e16,
        e16,
        e32,
        env.mem.arena.view,
        env.mem.table,
        np.zeros((n + 1024, 2), np.int64),
        np.zeros((2, n + 1024, 2), np.int64),
        np.zeros(16, np.uint8),
        70000,
        1,
        1,
    )
    assert ret == -1 and tq[Q_ERROR] == E.RING_UNMAPPED and rq[Q_ERROR] == 0
    assert tq[Q_PACKETS] + tq[Q_DROPS] == tq[Q_CHAINS] == 0
    assert rq[Q_PACKETS] == rq[Q_CHAINS] == 0 and rq[Q_USED_IDX] == 0  # nothing delivered
    assert FR._canaries_ok(env.ram, env.lay)


def test_packed_loopback_completes_tx_chains_when_rx_fails(fuzz_env):
    """The RX ring's driver event area lies outside guest memory (copy path).  loopback used to return as soon
    as flushing RX failed, leaving the TX chains of that pass taken and never completed (the TX queue not even
    broken).  Now TX is flushed too: its used cursor catches up with its avail cursor."""
    env = fuzz_env
    uva = env.ram.ctypes.data
    n = 4
    rq, tq = np.zeros(Q_FIELDS, np.int64), np.zeros(Q_FIELDS, np.int64)
    for q, d, drv, dev in ((rq, 4096, FR.B_END + 4, 10240), (tq, 16384, 20480, 22528)):
        q[:] = new_queue_state(n)
        q[Q_HDR_LEN] = 12
        q[27] = q[28] = 1  # avail and used wrap counters
        q[29] = 1  # packed
        q[Q_DESC : Q_DESC + 3] = (uva + d, uva + drv, uva + dev)
        _w(env, dev, "<HH", 0, 0)
    _w(env, 20480, "<HH", 0, 0)
    _w(env, 4096, "<QIHH", _gpa(30 << 10), 2048, 0, FR.AVAIL_F | 2)  # RX: one writable buffer, id 0
    _w(env, 16384, "<QIHH", _gpa(40 << 10), 12 + 64, 0, FR.AVAIL_F)  # TX: one frame, id 0
    e64, e16 = np.zeros(0, np.uint64), np.zeros(0, np.uint16)
    ret = NP.loopback(
        rq,
        e64,
        e16,
        e16,
        tq,
        e64,
        e16,
        e16,
        env.mem.arena.view,
        env.mem.table,
        np.zeros((n + 1024, 2), np.int64),
        np.zeros((2, n + 1024, 2), np.int64),
        np.zeros((n, 3), np.int64),
        np.zeros((n, 3), np.int64),
        np.zeros(16, np.uint8),
        70000,
        1,
        1,
    )
    assert ret == -1 and rq[Q_ERROR] == E.RING_UNMAPPED and tq[Q_ERROR] == 0
    assert tq[Q_CHAINS] == 1 and tq[Q_LAST_AVAIL] == 1 and tq[Q_USED_IDX] == 1 and tq[Q_USED_WRAP] == 1
    flags = int(env.ram[16384 + 14]) | int(env.ram[16384 + 15]) << 8
    assert flags & (FR.AVAIL_F | FR.USED_F) == FR.AVAIL_F | FR.USED_F  # the TX descriptor is used
    assert FR._canaries_ok(env.ram, env.lay)


def test_ring_fuzzer_smoke():
    """A few thousand states of each layout in-process (the full campaign is the fuzz-marked test)."""
    for layout in ("split", "packed"):
        out = FR.campaign(3000, seed=11, sample=4, layout=layout)
        assert out["states"] == 3000 and out["copy_vs_direct_compared"] > 0


# =========================================================================================================
# Hypothesis: any order of requests, valid and invalid payloads and fds, against a live connection
def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class MessageMachine(RuleBasedStateMachine):
    """Rules send requests; invariants: the server is alive, every owed reply came (Session.send checks it
    and nothing else came), open fds stay bounded, and a connection that ends gives back every fd."""

    path: str = ""
    owed: set[int] = set()
    server_thread: threading.Thread | None = None

    def __init__(self) -> None:
        super().__init__()
        self.stats = FM.Stats()
        self.session = FM.Session(self.path, self.owed, self.stats, timeout=10)
        self.session.learn()
        self.base_fds = _open_fds()

    def _reconnect(self) -> None:
        self.session.close()
        self.session = FM.Session(self.path, self.owed, self.stats, timeout=10)
        self.session.learn()  # served only once the previous connection is torn down
        assert _open_fds() == self.base_fds, "a connection that ended left fds open"

    @rule(
        request=st.one_of(st.sampled_from(list(R)), st.integers(0, 2**32 - 1)),
        flags=st.one_of(st.sampled_from([1, 1, 1 | 8, 1 | 8, 0, 2, 3, 1 | 4, 8]), st.integers(0, 2**32 - 1)),
        payload=st.binary(max_size=80),
        fds=st.lists(st.sampled_from(FM.FD_KINDS), max_size=3),
    )
    def raw_message(self, request, flags, payload, fds):
        self.session.send(request, flags, payload, [self.session.fd(k) for k in fds])

    @rule(seed=st.integers(0, 2**32 - 1))
    def plausible_message(self, seed):
        req, flags, payload, kinds = FM.Generator(random.Random(seed), self.session).message()
        self.session.send(req, flags, payload, [self.session.fd(k) for k in kinds])

    @rule(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12))
    def setup_like_sequence(self, seed, n):
        """A burst of well-formed set-up requests in random order (rings may start, break, stop)."""
        r = random.Random(seed)
        g = FM.Generator(r, self.session)
        reqs = [
            R.SET_OWNER,
            R.SET_FEATURES,
            R.SET_PROTOCOL_FEATURES,
            R.SET_MEM_TABLE,
            R.SET_VRING_NUM,
            R.SET_VRING_ADDR,
            R.SET_VRING_BASE,
            R.SET_VRING_KICK,
            R.SET_VRING_CALL,
            R.SET_VRING_ENABLE,
            R.GET_VRING_BASE,
            R.ADD_MEM_REG,
            R.REM_MEM_REG,
            R.RESET_OWNER,
        ]
        for _ in range(n):
            req = r.choice(reqs)
            payload, kinds = g.valid(req)
            self.session.send(
                req, P.VHOST_USER_VERSION | (8 if r.randrange(2) else 0), payload, [self.session.fd(k) for k in kinds]
            )

    @rule()
    def kick_everything(self):
        for fd in self.session.eventfds:
            os.eventfd_write(fd, 1)

    @rule(data=st.binary(min_size=64, max_size=64))
    def scribble_guest_ram(self, data):
        self.session.mm[:] = data * (FM.RAM // 64)

    @rule(size=st.sampled_from([P.MAX_PAYLOAD + 1, 1 << 20, 2**32 - 1]))
    def oversized_header(self, size):
        self.session.send(R.SET_MEM_TABLE, 1, b"", [self.session.memfd], size=size)
        self._reconnect()

    @rule(cut=st.integers(0, 40))
    def hang_up_mid_message(self, cut):
        self.session.hang_up(P.HEADER.pack(R.SET_VRING_ADDR, 1, 40) + bytes(cut), [self.session.memfd])
        self._reconnect()

    @invariant()
    def server_alive_and_in_sync(self):
        assert self.server_thread is not None and self.server_thread.is_alive()
        assert _open_fds() <= self.base_fds + 16

    def teardown(self):
        try:
            if not self.session.closed:
                self.session.ping()
        finally:
            self.session.close()


@pytest.mark.parametrize("metadata", ["direct", "copy"])
def test_message_sequences_state_machine(serve, sock_path, metadata):
    srv = serve("sink", metadata)
    MessageMachine.path = sock_path
    MessageMachine.owed = FM.owed_requests()
    MessageMachine.server_thread = srv.thread
    run_state_machine_as_test(
        MessageMachine,
        settings=settings(
            max_examples=60,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # and a plain client is served afterwards
        s.settimeout(10)
        s.connect(sock_path)
        P.send_message(s, R.GET_QUEUE_NUM)
        assert P.U64.unpack(P.recv_reply(s, R.GET_QUEUE_NUM).payload)[0] == 2
