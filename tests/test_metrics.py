"""``--metrics-port``: Prometheus scrapes the per-connection, per-queue counters while traffic runs, and they
match what the front-end counted."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pyvhost import protocol as P
from pyvhost.frontend.net import Frontend, FrontendError
from pyvhost.metrics import MetricsServer
from pyvhost.protocol import Request as R

TX = 1  # queue index of the first TX queue


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def queue_value(samples, name: str, socket: str, queue: int, connection: int = 1) -> float:
    return samples[(name, (("connection", str(connection)), ("queue", str(queue)), ("socket", socket)))]


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    """Poll ``predicate`` until it returns a true value (no fixed sleep: the server's counters land when the
    worker publishes them)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.01)


def test_scrape_while_traffic_runs(serve, sock_path):
    srv = serve("sink")
    metrics = MetricsServer(lambda: [srv.server], 0)
    try:
        before = scrape(metrics.port)
        assert before[("pyvhost_connection_up", (("socket", sock_path),))] == 0
        with Frontend(sock_path, queue_size=64) as fe:
            fe.setup()
            stop = threading.Event()
            rounds: list[dict] = []

            def traffic() -> None:  # rounds of TX until the scraper has seen the counters grow
                while not stop.is_set():
                    rounds.append(fe.run("tx", count=500))

            t = threading.Thread(target=traffic)
            t.start()
            try:
                # a scrape, then two more rounds done, then the next: the back-end has counted more in between
                # (each round posts exactly 500 frames), so the counter must have grown
                seen: list[float] = []
                while len(seen) < 3:
                    seen.append(queue_value(scrape(metrics.port), "pyvhost_queue_packets_total", sock_path, TX))
                    done = len(rounds)
                    wait_for(lambda: len(rounds) >= done + 2 or not t.is_alive(), what="two more rounds of traffic")
                    assert t.is_alive(), "the traffic thread ended"
                assert seen[0] < seen[1] < seen[2]
            finally:
                stop.set()
                t.join(60)
            assert not t.is_alive()
            final = fe.drain("tx")
            sent = final["packets"]
            assert sent == sum(r["packets"] for r in rounds) > 0

            def settled():
                s = scrape(metrics.port)
                return s if queue_value(s, "pyvhost_queue_packets_total", sock_path, TX) == sent else None

            s = wait_for(settled, what=f"{sent} packets in the metrics")
            assert queue_value(s, "pyvhost_queue_chains_total", sock_path, TX) == sent
            assert queue_value(s, "pyvhost_queue_bytes_total", sock_path, TX) == sent * 64  # the frames run() sends
            assert queue_value(s, "pyvhost_queue_drops_total", sock_path, TX) == 0
            assert queue_value(s, "pyvhost_queue_wakeups_total", sock_path, TX) >= 1
            assert queue_value(s, "pyvhost_queue_broken", sock_path, TX) == 0
            assert s[("pyvhost_connection_up", (("socket", sock_path),))] == 1
            assert s[("pyvhost_connections_total", (("socket", sock_path),))] == 1
            assert s[("pyvhost_connection_errors_total", (("connection", "1"), ("socket", sock_path)))] == 0

            # a request the back-end refuses counts as an error of the connection
            try:
                fe.command(R.SET_VRING_NUM, P.VRING_STATE.pack(0, 3))  # not a power of two
            except FrontendError:
                pass
            s = scrape(metrics.port)
            assert s[("pyvhost_connection_errors_total", (("connection", "1"), ("socket", sock_path)))] == 1
            assert s[("process_resident_memory_bytes", ())] > 0
    finally:
        metrics.close()


def test_cli_metrics_port(tmp_path: Path):
    """``serve rng --metrics-port 0`` logs the port it listens on and serves the text format there."""
    sock = str(tmp_path / "rng.sock")
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvhost", "serve", "rng", "--socket-path", sock, "--metrics-port", "0"]
        + ["--ready-file", str(ready)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        port = None
        for line in proc.stderr:
            if "metrics on http://127.0.0.1:" in line:
                port = int(line.rsplit(":", 1)[1].split("/")[0])
                break
        assert port is not None, "no metrics port logged"
        wait_for(ready.exists, what="the ready file")
        s = scrape(port)
        assert s[("pyvhost_connection_up", (("socket", sock),))] == 0
        assert s[("pyvhost_connections_total", (("socket", sock),))] == 0
    finally:
        proc.terminate()
        proc.wait(30)
