"""Prometheus metrics (``serve --metrics-port N``): the counters the back-end already keeps, read at scrape time.

A :class:`ServerCollector` walks the servers of the process when Prometheus scrapes and turns each live
connection's per-queue counters (the queue state arrays the compiled loops update anyway) into metric families,
so the datapath pays nothing for being observed.  Labels: ``socket`` (the server's socket path: one guest),
``connection`` (the connection's number on that socket, from 1) and ``queue`` (the virtqueue index).  A counter
the queue stats gain later (IOTLB misses, dirty-log writes) is exported as ``pyvhost_queue_<name>_total`` with
no change here.  The text format is served by ``prometheus_client``'s own HTTP server, in a thread of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .backend import Server

QUEUE_LABELS = ["socket", "connection", "queue"]
#: per-queue counters: (stats key, metric name without ``_total``, help)
QUEUE_COUNTERS = (
    ("packets", "pyvhost_queue_packets", "Packets (net) or requests (other devices) the queue completed"),
    ("bytes", "pyvhost_queue_bytes", "Bytes the queue moved"),
    ("drops", "pyvhost_queue_drops", "Packets the queue dropped (no buffer, too short, refused)"),
    ("chains", "pyvhost_queue_chains", "Descriptor chains the queue completed"),
    ("calls", "pyvhost_queue_calls", "Interrupts (call eventfd writes) the queue signalled"),
    ("wakeups", "pyvhost_queue_wakeups", "Passes of the queue's loop that found work"),
)


class ServerCollector(Collector):
    """Metric families for every live connection of ``servers`` (a callable, asked at each scrape)."""

    def __init__(self, servers: Callable[[], Iterable[Server]]) -> None:
        self.servers = servers

    def collect(self) -> Iterator[Metric]:
        live = GaugeMetricFamily(
            "pyvhost_connection_up", "1 while a front-end is connected to the socket", labels=["socket"]
        )
        accepted = CounterMetricFamily("pyvhost_connections", "Connections the socket accepted", labels=["socket"])
        errors = CounterMetricFamily(
            "pyvhost_connection_errors",
            "Messages of the connection that failed (malformed, refused or failed by their handler)",
            labels=["socket", "connection"],
        )
        queues = {key: CounterMetricFamily(name, text, labels=QUEUE_LABELS) for key, name, text in QUEUE_COUNTERS}
        broken = GaugeMetricFamily(
            "pyvhost_queue_broken",
            "1 if the queue is broken (stopped on a bad guest value or a failure)",
            labels=QUEUE_LABELS,
        )
        error = GaugeMetricFamily(
            "pyvhost_queue_error",
            "The queue's last error code (pyvhost.errors.QueueError; 0: none)",
            labels=QUEUE_LABELS,
        )
        for server in self.servers():
            sock = server.socket_path
            conn = server.connection  # read once: the server's thread may end it meanwhile
            live.add_metric([sock], 0 if conn is None else 1)
            accepted.add_metric([sock], server.accepted)
            if conn is None:
                continue
            number = str(server.accepted)
            errors.add_metric([sock, number], conn.failed)
            vrings = {vr.index: vr for vr in list(conn.vrings)}
            for index, counters in sorted(conn.stats().items()):
                labels = [sock, number, str(index)]
                for key, value in counters.items():
                    if key == "error":
                        continue
                    family = queues.get(key)
                    if family is None:  # a counter the back-end keeps that is not named here (a newer feature's)
                        family = queues[key] = CounterMetricFamily(
                            f"pyvhost_queue_{key}", f"The queue's {key} counter", labels=QUEUE_LABELS
                        )
                    family.add_metric(labels, value)
                vr = vrings.get(index)
                broken.add_metric(labels, 1 if vr is not None and vr.broken else 0)
                error.add_metric(labels, counters["error"])
        yield live
        yield accepted
        yield errors
        yield from queues.values()
        yield broken
        yield error


class MetricsServer:
    """The HTTP endpoint: ``/metrics`` in the Prometheus text format (the process's own CPU and memory too)."""

    def __init__(self, servers: Callable[[], Iterable[Server]], port: int, addr: str = "127.0.0.1") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServerCollector(servers))
        self.registry.register(ProcessCollector(registry=None))
        self.httpd: WSGIServer
        self.thread: threading.Thread
        self.httpd, self.thread = start_http_server(port, addr, registry=self.registry)

    @property
    def port(self) -> int:
        """The port it listens on (the one chosen when asked for port 0)."""
        return int(self.httpd.server_port)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
