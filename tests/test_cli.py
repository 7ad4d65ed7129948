"""The command line: a device registry (built-in devices and the ``pyvhost.devices`` entry-point group),
socket activation (``--socket-fd``, LISTEN_FDS), and a parser that loads no datapath to answer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pyvhost import cli
from pyvhost.access import Metadata
from pyvhost.devices.builtin import SPECS
from pyvhost.frontend.net import Frontend
from pyvhost.frontend.ram import BUF_SIZE

ROOT = Path(__file__).resolve().parents[1]


def test_metadata_choices_match_the_access_module():
    assert set(cli.METADATA_PATHS) == {m.value for m in Metadata}


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["serve", "--help"],
        ["serve", "net", "--help"],
        ["serve", "blk", "--help"],
        ["bench", "--help"],
        ["serve", "net"],
        ["serve", "nosuch"],
        ["serve", "blk", "--socket-path", "x"],
    ],
)
def test_help_and_argument_errors_load_no_datapath(argv):
    """The parser answers from argparse alone: no NumPy, no Numba, no compiled kernels imported."""
    code = textwrap.dedent(f"""
        import sys
        from pyvhost.cli import main
        try:
            main({argv!r})
        except SystemExit:
            pass
        heavy = sorted(m for m in ("numpy", "numba", "pyvhost.backend", "pyvhost.jit") if m in sys.modules)
        print("HEAVY", heavy)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in p.stdout, p.stdout + p.stderr


def test_every_builtin_device_is_served_by_name():
    parser = cli.build_parser()
    required = {"blk": ["--file", "f"], "scsi": ["--lun", "0:f"], "vsock": ["--guest-cid", "3", "--uds-path", "u"]}
    for name in SPECS:
        args = parser.parse_args(["serve", name, "--socket-path", "s", *required.get(name, [])])
        assert args.spec is SPECS[name] and args.func is cli.cmd_serve


def _drive_rx(path: str, count: int) -> np.ndarray:
    """Post ``count`` writable buffers to queue 0; return the bytes of the ring's buffers afterwards."""
    with Frontend(path, num_queues=1) as fe:
        fe.setup()
        # one batch of the whole ring: each buffer posted exactly once (in smaller batches the front-end reposts
        # the buffers it got back first, and some would never be posted)
        r = fe.run("rx", count=count, batch=count)
        assert r["packets"] == count
        ring = fe.rings[0]
        return fe.ram.buf[ring.bufs_off : ring.bufs_off + ring.size * BUF_SIZE].copy()


def _finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


# -- a third-party device, installed the way pip installs one: a distribution with an entry point --------------
PLUGIN = '''
"""A device from outside pyvhost: fills every writable buffer with one byte value."""
from pyvhost.devices.chain_device import ChainDevice
from pyvhost.devices.registry import DeviceSpec


class Pattern(ChainDevice):
    device_id = 4
    num_queues = 1

    def __init__(self, value):
        self.value = value
        self.filled = 0

    def handle(self, queue, readable, writable):
        n = 0
        for buf in writable:
            buf[:] = bytes([self.value]) * len(buf)
            n += len(buf)
        self.filled += 1
        return n

    def stats(self):
        return {"filled": self.filled}


def add_arguments(p):
    p.add_argument("--byte", type=lambda s: int(s, 0), default=0xA5)


def create(args):
    return Pattern(args.byte)


SPEC = DeviceSpec("pattern", "fills buffers with one byte (a test plug-in)", create, add_arguments)
'''


@pytest.fixture
def plugin_path(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    (site / "pyvhost_pattern").mkdir(parents=True)
    (site / "pyvhost_pattern" / "__init__.py").write_text(PLUGIN)
    dist = site / "pyvhost_pattern-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pyvhost-pattern\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[pyvhost.devices]\npattern = pyvhost_pattern:SPEC\n")
    return site


def test_a_third_party_device_is_served_by_name(plugin_path, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")]))
    helptext = subprocess.run(
        [sys.executable, "-m", "pyvhost", "serve", "--help"], env=env, capture_output=True, text=True, timeout=60
    ).stdout
    assert "pattern" in helptext and "a test plug-in" in helptext
    sock, ready = str(tmp_path / "p.sock"), tmp_path / "ready"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pyvhost",
            "serve",
            "pattern",
            "--socket-path",
            sock,
            "--byte",
            "0x5a",
            "--connections",
            "1",
            "--ready-file",
            str(ready),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_ready(ready, proc)
        bufs = _drive_rx(sock, 256)  # the ring's size: each buffer posted once, and filled
        assert (bufs == 0x5A).all()
        out = _finish(proc)
    finally:
        proc.kill()
    assert out["pattern"] == {"filled": 256}
    assert out["stats"]["ended"][0]["0"]["chains"] == 256


def test_a_broken_plugin_leaves_the_builtin_devices(plugin_path, tmp_path):
    (plugin_path / "pyvhost_pattern" / "__init__.py").write_text("raise ImportError('half installed')\n")
    env = dict(os.environ, PYTHONPATH=str(plugin_path))
    p = subprocess.run(
        [sys.executable, "-m", "pyvhost", "serve", "--help"], env=env, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0 and "rng" in p.stdout and "pattern" not in p.stdout
    assert "half installed" in p.stderr


# -- socket activation ---------------------------------------------------------------------------------------
def _wait_ready(ready: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "server not ready"
        time.sleep(0.05)


def _listener(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)
    return s


def test_systemd_socket_activation(tmp_path):
    """As systemd passes it: the socket is fd 3, LISTEN_FDS=1, LISTEN_PID is the served process's pid."""
    path, ready = str(tmp_path / "act.sock"), tmp_path / "ready"
    lst = _listener(path)
    env = dict(os.environ, LISTEN_FDS="1")
    script = f"LISTEN_PID=$$ exec {sys.executable} -m pyvhost serve rng --connections 2 --ready-file {ready}"
    proc = subprocess.Popen(
        ["sh", "-c", script],
        env=env,
        pass_fds=(3,),
        preexec_fn=lambda: os.dup2(lst.fileno(), 3),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lst.close()  # the server holds the only copy now
    try:
        _wait_ready(ready, proc)
        for _ in range(2):  # one listening socket, served connection after connection
            _drive_rx(path, 100)
        out = _finish(proc)
    finally:
        proc.kill()
    assert [c["0"]["chains"] for c in out["stats"]["ended"]] == [100, 100]
    assert os.path.exists(path)  # the socket's path belongs to whoever made it


def test_socket_fd(tmp_path):
    path, ready = str(tmp_path / "fd.sock"), tmp_path / "ready"
    lst = _listener(path)
    fd = lst.fileno()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pyvhost",
            "serve",
            "rng",
            "--socket-fd",
            str(fd),
            "--connections",
            "1",
            "--ready-file",
            str(ready),
            "--metadata",
            "copy",
        ],
        pass_fds=(fd,),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lst.close()
    try:
        _wait_ready(ready, proc)
        _drive_rx(path, 50)
        out = _finish(proc)
    finally:
        proc.kill()
    assert out["stats"]["ended"][0]["0"]["chains"] == 50


@pytest.mark.parametrize("kind", ["pipe", "udp", "closed"])
def test_socket_fd_of_the_wrong_kind_is_refused(kind):
    keep: list = []
    if kind == "pipe":
        r, w = os.pipe()
        keep, fd = [r, w], r
    elif kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        keep, fd = [s], s.fileno()
    else:
        fd = 200
    try:
        p = subprocess.run(
            [sys.executable, "-m", "pyvhost", "serve", "rng", "--socket-fd", str(fd)],
            pass_fds=(fd,) if kind != "closed" else (),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        for k in keep:
            k.close() if isinstance(k, socket.socket) else os.close(k)
    assert p.returncode != 0
    assert f"--socket-fd {fd}" in p.stderr and "Traceback" not in p.stderr
