"""Many front-ends in one process (``serve DEVICE --socket-count N``): one server per socket, each in a thread.

The rust-vmm vhost-device convention: with N > 1, ``--socket-path PATH`` names the sockets ``PATH0`` ..
``PATH{N-1}``, one guest each.  Every socket gets a :class:`~pyvhost.backend.Server` with a device of its own
(no device state is shared between guests) and a control-plane thread of its own, so a front-end that stalls in
the middle of a message, stops reading its replies or breaks its rings holds only its own thread and queues:
the others are answered and run on (their datapath workers are threads of their own already).
"""

from __future__ import annotations

import logging
import threading

from .backend import Server

log = logging.getLogger(__name__)


def socket_paths(path: str, count: int) -> list[str]:
    """The socket paths ``--socket-path PATH --socket-count N`` serves: PATH itself for one, PATH0.. otherwise."""
    if count < 1:
        raise ValueError(f"socket count {count}: at least 1")
    return [path] if count == 1 else [f"{path}{i}" for i in range(count)]


class ServerGroup:
    """Servers run side by side, each in a thread of its own; one failing never stops the others."""

    def __init__(self, servers: list[Server]) -> None:
        self.servers = servers
        self.threads: list[threading.Thread] = []

    def serve(self, connections: int | None = None) -> None:
        """Serve every socket until stop() (or until each has seen ``connections`` connections end)."""
        self.threads = [
            threading.Thread(target=self._run, args=(s, connections), name=f"pyvhost-socket{i}", daemon=True)
            for i, s in enumerate(self.servers)
        ]
        for t in self.threads:
            t.start()
        for t in self.threads:
            while t.is_alive():  # a timed join, so the main thread still runs its signal handlers
                t.join(0.5)

    @staticmethod
    def _run(server: Server, connections: int | None) -> None:
        try:
            server.serve(connections=connections)
        except Exception:  # a bug in one socket's server: logged; the other sockets go on
            log.exception("the server on %s failed", server.socket_path)

    def stop(self) -> None:
        """Ask every server to return (safe from a signal handler or another thread)."""
        for s in self.servers:
            s.stop()

    def stats(self) -> dict[str, dict]:
        """Each socket's counters (``Server.stats``), by socket path."""
        return {s.socket_path: s.stats() for s in self.servers}

    def close(self) -> None:
        for s in self.servers:
            s.close()
