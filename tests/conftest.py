"""Shared fixtures: an in-process pyvhost server, the pyvhost frontend, fd/mapping accounting, DPDK helpers."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvhost.access import Metadata
from pyvhost.backend import Server
from pyvhost.devices.net import Mode, NetDevice


class RunningServer:
    """A pyvhost Server serving in a background thread of the test process."""

    def __init__(self, path: str, mode: Mode, metadata: Metadata, device=None, **device_kw) -> None:
        self.path = path
        self.device = device if device is not None else NetDevice(mode, **device_kw)
        self.server = Server(self.device, path, metadata)
        self.thread = threading.Thread(target=self.server.serve, name="pyvhost-server", daemon=True)
        self.thread.start()

    @property
    def connection(self):
        return self.server.connection

    def ended(self, timeout: float = 10.0) -> list[dict]:
        """Wait until the current connection (if any) has ended; return the stats of every ended one."""
        deadline = threading.Event()
        for _ in range(int(timeout / 0.02)):
            if self.server.connection is None:
                break
            deadline.wait(0.02)
        return self.server.history

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "server thread did not stop"
        self.server.close()


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "vhost.sock")


@pytest.fixture
def serve(sock_path: str) -> Iterator:
    """``serve(mode, metadata, device=None, **device_kw)`` starts an in-process server on ``sock_path``
    (a NetDevice in ``mode`` unless ``device`` is given)."""
    started: list[RunningServer] = []

    def start(mode: str | Mode = Mode.SINK, metadata: str | Metadata = Metadata.DIRECT, device=None,
              **kw) -> RunningServer:
        s = RunningServer(sock_path, Mode(mode), Metadata(metadata), device, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def open_fds() -> set[str]:
    return {f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}" for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")}


def mapping_count() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


@pytest.fixture
def errors(caplog: pytest.LogCaptureFixture):
    """The pyvhost ERROR log lines seen so far (a function)."""
    caplog.set_level(logging.INFO, logger="pyvhost")
    return lambda: [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR
                    and r.name.startswith("pyvhost")]


# -- DPDK --------------------------------------------------------------------------------------------------
TESTPMD = shutil.which("dpdk-testpmd")

needs_dpdk = pytest.mark.skipif(
    TESTPMD is None and not os.environ.get("CI"),
    reason="dpdk-testpmd missing: run `make deps` (CI installs it and never skips)")
