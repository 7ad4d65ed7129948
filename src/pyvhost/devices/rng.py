"""virtio-rng (virtio 1.2 §5.4): random bytes into the driver's buffers, from the kernel's getrandom or from a
file, optionally at most ``max_bytes`` per ``period`` (a fixed window, as vhost-device-rng's --max-bytes and
--period).

Without a limit and with getrandom, a chain is filled in the ring's worker (``handle``).  Otherwise the chains
go to one feeder thread, in the order taken: it fills each with what the current window still allows (a
request may get fewer bytes than its buffers hold, never 0), and when the window is used up it sleeps until
the next one starts.  A ring that stops completes the requests still waiting at once, each with 1 byte: virtio
1.2 §5.4.7.2 wants "one or more random bytes", and Linux's driver posts no new buffer after a completion of 0
bytes (its reads of /dev/hwrng then hang after the ring restarts).  Those bytes beyond the window are counted
(``over_limit``) and taken from the next window, so the limit holds over time.

A file source is read as it comes: a FIFO is opened read-write, so that it never reads end-of-file and its
writers may come and go (the feeder waits for their data); a regular file or a device that reaches its end is
an error -- logged once, and from then on every request completes with the bytes it got (0 for new ones).
Bytes are never repeated: wrapping around would hand the guest the same "entropy" twice.  A ring that stops
does not wait for a source: its requests get what the source has at once (0 bytes if it has none).
"""

from __future__ import annotations

import collections
import logging
import os
import select
import stat
import threading
import time
from collections.abc import Callable

from .chain_device import ChainDevice, Request

log = logging.getLogger(__name__)

VIRTIO_ID_RNG = 4
#: windows whose byte counts ``stats()`` reports (the most recent)
WINDOW_HISTORY = 64


class Window:
    """At most ``max_bytes`` per window of ``period`` seconds; a window starts at the first request after the
    previous one ended (vhost-device-rng's fixed window)."""

    def __init__(self, max_bytes: int, period: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes <= 0 or period <= 0:
            raise ValueError(f"rate limit: max_bytes ({max_bytes}) and period ({period}) must be > 0")
        self.max_bytes, self.period, self.clock = max_bytes, period, clock
        self.start = -float("inf")
        self.used = 0
        #: (window start, bytes given in it), the most recent last
        self.history: collections.deque[list] = collections.deque(maxlen=WINDOW_HISTORY)

    def room(self) -> int:
        """Bytes the current window still allows (a new window starts if the last one has ended)."""
        now = self.clock()
        if now >= self.start + self.period:
            # bytes given beyond a window (when a ring stopped) are taken from the next one
            self.start, self.used = now, max(0, self.used - self.max_bytes)
            self.history.append([now, 0])
        return self.max_bytes - self.used

    def take(self, n: int) -> None:
        """Count ``n`` bytes (at most :meth:`room`) in the current window."""
        self.used += n
        self.history[-1][1] += n

    def left(self) -> float:
        """Seconds until the current window ends."""
        return max(0.0, self.start + self.period - self.clock())


class Source:
    """Random bytes from an open file: ``read_into(buf, wake_fd, wait)`` reads what the file has now into ``buf``,
    or (``wait``) waits for data when there is none, until ``wake_fd`` is readable; returns the bytes read."""

    def __init__(self, path: str) -> None:
        st = os.stat(path)
        # a FIFO opened read-write never reads end-of-file: its writers may come and go
        mode = os.O_RDWR if stat.S_ISFIFO(st.st_mode) else os.O_RDONLY
        self.path = path
        self.fd = os.open(path, mode | os.O_NONBLOCK | os.O_CLOEXEC)
        self.eof = False

    def read_into(self, buf: memoryview, wake_fd: int, wait: bool = True) -> int:
        got = 0
        while got < len(buf) and not self.eof:
            try:
                n = os.readv(self.fd, [buf[got:]])
            except BlockingIOError:
                if got or not wait:
                    break  # what the file has now: the driver takes fewer bytes than it asked for
                ready, _, _ = select.select([self.fd, wake_fd], [], [])
                if wake_fd in ready:
                    break
                continue
            if n == 0:
                self.eof = True
                break
            got += n
        return got

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def getrandom_into(buf: memoryview) -> None:
    """Fill ``buf`` from the kernel's getrandom (a call gives at most 32 MiB - 1 bytes, so in pieces)."""
    off = 0
    while off < len(buf):
        chunk = os.getrandom(min(len(buf) - off, 1 << 24))
        buf[off : off + len(chunk)] = chunk
        off += len(chunk)


class RngDevice(ChainDevice):
    """One request queue; the driver posts writable buffers, the device fills them with random bytes.

    ``source``: a file to read (default: getrandom); ``max_bytes``/``period`` (seconds): the rate limit
    (default: none)."""

    device_id = VIRTIO_ID_RNG
    num_queues = 1

    def __init__(self, source: str | None = None, max_bytes: int = 0, period: float = 1.0) -> None:
        self.window = Window(max_bytes, period) if max_bytes else None
        self.source = Source(source) if source else None
        self.bytes_served = 0
        self.bad_requests = 0
        self.waited = 0  # requests that waited for a new window
        self.over_limit = 0  # bytes given beyond a window to requests a stopping ring completed
        #: requests for the feeder, each with the value of ``_stops`` when it came
        self._pending: collections.deque[tuple[Request, int]] = collections.deque()
        self._cond = threading.Condition()
        self._stops = 0  # bumped by stopping(): the requests that came before wait no more
        self._closed = False
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._feeder: threading.Thread | None = None

    # -- in the ring's worker ------------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        if not req.writable or not any(len(b) for b in req.writable):
            self._bad(req)
            return
        if self.window is None and self.source is None:  # nothing can wait: fill it here
            n = sum(len(b) for b in req.writable)
            for b in req.writable:
                getrandom_into(b)
            self.bytes_served += n
            req.complete(n)
            return
        with self._cond:
            if self._closed:
                req.complete(0)
                return
            if self._feeder is None:
                self._feeder = threading.Thread(target=self._feed, name="rng-feeder", daemon=True)
                self._feeder.start()
            self._pending.append((req, self._stops))
            self._cond.notify()

    def _bad(self, req: Request) -> None:
        """A chain with no device-writable byte (virtio 1.2 §5.4.6.1: the driver MUST NOT place
        driver-readable buffers into the queue): completed with 0 bytes, logged once."""
        self.bad_requests += 1
        if self.bad_requests == 1:
            log.error(
                "rng queue %d: chain %d has no device-writable byte (%d readable buffers); completed with 0 bytes "
                "(further ones are counted in bad_requests)",
                req.queue,
                req.head,
                len(req.readable),
            )
        req.complete(0)

    def stopping(self, queue: int) -> None:
        """The feeder completes every request that came before now without waiting (the ring's drain waits
        for them)."""
        with self._cond:
            self._stops += 1
            self._cond.notify_all()
        os.eventfd_write(self._wake, 1)  # a feeder waiting for a FIFO's data

    # -- in the feeder thread ------------------------------------------------------------------------------
    def _feed(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                req, stops = self._pending.popleft()
            try:
                n = self._serve(req, stops)
            except Exception:
                log.exception("rng: serving chain %d failed", req.head)
                n = 0
            self.bytes_served += n
            req.complete(n)

    def _serve(self, req: Request, stops: int) -> int:
        """Fill ``req`` with what the window allows, waiting for a window with room -- unless the ring stops
        meanwhile (``_stops`` moved on from ``stops``): then 1 byte beyond the window; the bytes written."""
        want = sum(len(b) for b in req.writable)
        if self.window is not None:
            room = self.window.room()
            if room <= 0:
                self.waited += 1
            while room <= 0 and self._stops == stops and not self._closed:
                with self._cond:
                    self._cond.wait_for(lambda: self._stops != stops or self._closed, self.window.left())
                room = self.window.room()
            if self._closed:
                return 0
            want = min(want, room) if room > 0 else 1
        written = 0
        for b in req.writable:
            if written == want:
                break
            part = b[: want - written]
            if self.source is None:
                getrandom_into(part)
                got = len(part)
            else:
                got = self._read(part, stops)
            written += got
            if got < len(part):
                break
        if self.window is not None:
            self.over_limit += max(0, written - max(room, 0))
            self.window.take(written)
        return written

    def _read(self, buf: memoryview, stops: int) -> int:
        assert self.source is not None
        if self.source.eof:
            return 0
        try:
            os.eventfd_read(self._wake)  # a wake-up from an earlier stop
        except BlockingIOError:
            pass
        got = self.source.read_into(buf, self._wake, wait=self._stops == stops)
        if self.source.eof:
            log.error(
                "rng source %s: end of file; requests complete with the bytes they got (none from now on)",
                self.source.path,
            )
        return got

    # -- the device ---------------------------------------------------------------------------------------
    def stats(self) -> dict:
        s: dict[str, object] = {"bytes": self.bytes_served, "bad_requests": self.bad_requests}
        if self.window is not None:
            s["waited"] = self.waited
            s["over_limit"] = self.over_limit
            s["window_bytes"] = [b for _, b in self.window.history]
        if self.source is not None:
            s["source_eof"] = self.source.eof
        return s

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            feeder = self._feeder
            waiting = list(self._pending)
            self._pending.clear()
        for req, _ in waiting:
            req.complete(0)
        os.eventfd_write(self._wake, 1)
        if feeder is not None:
            feeder.join(10)
        if self.source is not None:
            self.source.close()
        os.close(self._wake)
