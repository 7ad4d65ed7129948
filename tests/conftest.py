"""Shared fixtures: an in-process pyvhost server, the pyvhost frontend, fd/mapping accounting, the path a
ring runs on, requirements that skip here but never in CI, the Hypothesis profiles, DPDK helpers."""

from __future__ import annotations

import collections
import importlib
import logging
import os
import re
import select
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from pyvhost.access import Metadata
from pyvhost.backend import Server
from pyvhost.devices.net import Mode, NetDevice
from pyvhost.ring.state import Q_DIRECT

#: set by .ci/run: a missing requirement fails the test instead of skipping it
CI = bool(os.environ.get("CI"))
#: the guest kit of the VM tests (a Debian kernel and a busybox initramfs, see its module docstring)
GUESTKIT = Path(__file__).resolve().parents[1] / "tools" / "guestkit"

# Hypothesis: "ci" is reproducible (a fixed seed, no example database) and never fails on a slow example;
# "dev" (the default) explores anew each run and keeps what it found in the local database.  A failing
# example found either way is kept in the test as an @example.
hypothesis_settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
hypothesis_settings.register_profile("dev", deadline=None, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if CI else "dev"))


def needs(available: bool, reason: str) -> pytest.MarkDecorator:
    """Skip when ``available`` is false -- except in CI, where the test fails with ``reason`` instead."""
    if available:
        return pytest.mark.needs()
    if CI:
        return pytest.mark.needs(missing=reason)
    return pytest.mark.skip(reason=f"{reason} (CI never skips this)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs"):
        if mark.kwargs.get("missing"):
            pytest.fail(f"CI: {mark.kwargs['missing']}", pytrace=False)


needs_tun = needs(os.path.exists("/dev/net/tun"), "no /dev/net/tun on this machine")
needs_root = needs(os.geteuid() == 0, "network namespaces and taps need root")


class _CountingListener:
    """The server's listening socket, counting the connections it accepted."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.accepted = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self):
        pair = self.sock.accept()
        self.accepted += 1
        return pair

    def pending(self) -> bool:
        """A connection waits in the backlog (the server has not accepted it yet)."""
        return self.sock.fileno() >= 0 and bool(select.select([self.sock], [], [], 0)[0])

    def __getattr__(self, name: str):
        return getattr(self.sock, name)


class _CountingHistory(collections.deque):
    """The server's history of ended connections, counting every one (the deque itself is bounded)."""

    appended = 0

    def append(self, item) -> None:
        self.appended += 1
        super().append(item)


def assert_path(server: Server, metadata: str | Metadata, indices: Iterable[int] | None = None) -> None:
    """The live connection's rings (``indices``, default: every running one) run on ``metadata``'s path:
    a ``direct`` ring that fell back to copy fails here."""
    conn = server.connection
    assert conn is not None, "no live connection"
    direct = Metadata(metadata) is Metadata.DIRECT
    rings = (
        [conn.vrings[i] for i in indices] if indices is not None else [vr for vr in conn.vrings if vr.views is not None]
    )
    assert rings, "no ring is running"
    for vr in rings:
        assert vr.views is not None, f"vring {vr.index} is not running"
        assert bool(vr.q[Q_DIRECT]) == direct == vr.views.direct, (
            f"vring {vr.index} runs on the {'direct' if vr.q[Q_DIRECT] else 'copy'} path, "
            f"not {Metadata(metadata).value}"
        )


class RunningServer:
    """A pyvhost Server serving in a background thread of the test process."""

    def __init__(self, path: str, mode: Mode, metadata: Metadata, device=None, **device_kw) -> None:
        self.path = path
        self.device = device if device is not None else NetDevice(mode, **device_kw)
        self.server = Server(self.device, path, metadata)
        self.listener = self.server.listener = _CountingListener(self.server.listener)  # type: ignore[assignment]
        self.history = self.server.history = _CountingHistory(maxlen=self.server.history.maxlen)
        self.thread = threading.Thread(target=self.server.serve, name="pyvhost-server", daemon=True)
        self.thread.start()

    @property
    def connection(self):
        return self.server.connection

    def ended(self, timeout: float = 10.0) -> collections.deque:
        """Wait until every connection made so far has been accepted and has ended (failing the test if one
        has not within ``timeout``); return the stats of the ended ones, the most recent last.  Connections are
        counted as the server accepts and ends them, so the history has grown by one entry for each connection
        made since the previous call: a connection that never ends, or that the server never took, cannot hand
        the test the previous connection's stats."""
        deadline = time.monotonic() + timeout
        while (
            self.server.connection is not None
            or self.listener.pending()
            or self.history.appended != self.listener.accepted
        ):
            assert time.monotonic() < deadline, (
                f"the connection did not end within {timeout} s ({self.listener.accepted} accepted, "
                f"{self.history.appended} ended)"
            )
            time.sleep(0.01)
        assert len(self.history) > 0, "no connection has ended"
        return self.history

    def assert_path(self, metadata: str | Metadata, indices: Iterable[int] | None = None) -> None:
        assert_path(self.server, metadata, indices)

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "server thread did not stop"
        self.server.close()


#: "queues (1,) started (direct path, split rings)", "queues (0, 1) started (direct/copy path, ...)"
STARTED = re.compile(r"queues \(([0-9, ]+)\) started \(([a-z/]+) path")


def assert_log_path(log: str, metadata: str | Metadata, at_least: int = 1) -> int:
    """Every ring start a back-end logged (``-v`` or not: INFO is on) ran on ``metadata``'s path, and it
    logged at least ``at_least`` of them; their count."""
    want = Metadata(metadata).value
    starts = STARTED.findall(log)
    assert len(starts) >= at_least, f"{len(starts)} ring starts logged, expected {at_least}:\n{log[-2000:]}"
    for queues, paths in starts:
        assert set(paths.split("/")) == {want}, f"queues ({queues}) started on the {paths} path, not {want}"
    return len(starts)


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "vhost.sock")


@pytest.fixture
def serve(sock_path: str) -> Iterator:
    """``serve(mode, metadata, device=None, **device_kw)`` starts an in-process server on ``sock_path``
    (a NetDevice in ``mode`` unless ``device`` is given)."""
    started: list[RunningServer] = []

    def start(
        mode: str | Mode = Mode.SINK, metadata: str | Metadata = Metadata.DIRECT, device=None, **kw
    ) -> RunningServer:
        s = RunningServer(sock_path, Mode(mode), Metadata(metadata), device, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def open_fds() -> set[str]:
    return {
        f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}"
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    }


def mapping_count() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


@pytest.fixture
def errors(caplog: pytest.LogCaptureFixture):
    """The pyvhost ERROR log lines seen so far (a function)."""
    caplog.set_level(logging.INFO, logger="pyvhost")
    return lambda: [
        r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("pyvhost")
    ]


# -- DPDK --------------------------------------------------------------------------------------------------
TESTPMD = shutil.which("dpdk-testpmd")

needs_dpdk = needs(TESTPMD is not None, "dpdk-testpmd missing: run `make deps`")


@pytest.fixture(scope="session")
def kit():
    """The VM tests' guest kit, built once (or taken from its cache); where it cannot be built the test is
    skipped -- in CI it fails."""
    if str(GUESTKIT) not in sys.path:
        sys.path.insert(0, str(GUESTKIT))
    guestkit = importlib.import_module("guestkit")
    try:
        return guestkit.build(log=lambda s: None)
    except Exception as e:  # noqa: BLE001
        if CI:
            raise
        pytest.skip(f"the guest kit cannot be built here ({e}); run tools/guestkit/build.sh")
