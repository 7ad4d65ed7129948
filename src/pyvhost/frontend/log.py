"""The front-end's side of the dirty log (live migration): the bitmap it shares and reads while the back-end logs.

As QEMU does before migrating: a memfd log of one bit per ``VHOST_LOG_PAGE`` guest-physical page (page ``p``
at bit ``p % 8`` of byte ``p // 8``) sized for guest memory, handed over by SET_LOG_BASE (with
``VHOST_USER_PROTOCOL_F_LOG_SHMFD``; the back-end answers it), then ``VHOST_F_LOG_ALL`` switched on by
SET_FEATURES.  The back-end sets bits with an atomic OR while the driver reads them: :meth:`FrontendLog.take`
reads and clears each 64-bit word by one atomic exchange, so a bit set at the same moment is either returned
now or left for the next call, never lost.
"""

from __future__ import annotations

import mmap
import os
import socket

import numpy as np

from .. import protocol as P
from ..atomic import ld64, xchg64
from ..dirtylog import LOG_PAGE_SHIFT, log_size_for
from ..jit import kernel

#: bytes per word read and cleared at once
WORD = 8


class LogRefused(Exception):
    """The back-end answered SET_LOG_BASE with a failure status."""


class FrontendLog:
    """A dirty log covering guest-physical [0, ``mem_end``), in a memfd to hand over by SET_LOG_BASE.

    ``size`` (what SET_LOG_BASE says) is the bytes needed rounded up to whole words; the file holds
    ``offset`` bytes before the log (SET_LOG_BASE's ``mmap_offset``), so a back-end that ignores the offset
    writes where :meth:`take` never looks, and ``tail`` bytes after it (tests put sentinels around the log)."""

    def __init__(self, mem_end: int, offset: int = 0, tail: int = 0) -> None:
        if mem_end <= 0:
            raise ValueError(f"no guest memory to log (end {mem_end:#x})")
        if offset % WORD or tail < 0:
            raise ValueError(f"log offset {offset:#x} not a multiple of {WORD}, or a negative tail {tail}")
        self.size = -(-log_size_for(mem_end) // WORD) * WORD
        self.offset = offset
        self.fd = os.memfd_create("pyvhost-dirty-log", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, offset + self.size + tail)
            self.mm = mmap.mmap(self.fd, offset + self.size + tail, flags=mmap.MAP_SHARED)
        except OSError:
            os.close(self.fd)
            raise
        self.file: np.ndarray = np.frombuffer(self.mm, dtype=np.uint8)
        #: the bitmap itself (a view; its bytes change under it while the back-end logs)
        self.bitmap: np.ndarray = self.file[offset : offset + self.size]

    def message(self) -> tuple[bytes, list[int]]:
        """SET_LOG_BASE's payload and fds."""
        return P.LOG_HDR.pack(self.size, self.offset), [self.fd]

    def set_base(self, sock: socket.socket) -> None:
        """Hand the log over by SET_LOG_BASE and read the back-end's reply, as QEMU does with LOG_SHMFD
        negotiated (no REPLY_ACK asked: the reply is owed anyway; empty, or a non-zero u64 status if refused)."""
        payload, fds = self.message()
        P.send_message(sock, P.Request.SET_LOG_BASE, payload, fds)
        reply = P.recv_reply(sock, P.Request.SET_LOG_BASE).payload
        if len(reply) >= P.U64.size and P.U64.unpack(reply[: P.U64.size])[0]:
            raise LogRefused(f"the back-end refused the dirty log ({self.size} bytes at offset {self.offset:#x})")

    @property
    def covers(self) -> int:
        """Guest-physical bytes the log covers, from address 0."""
        return self.size * 8 * P.VHOST_LOG_PAGE

    def dirty_pages(self) -> np.ndarray:
        """Page numbers whose bit is set now (a snapshot; nothing cleared)."""
        return np.flatnonzero(np.unpackbits(self.bitmap, bitorder="little"))

    def take(self) -> np.ndarray:
        """Page numbers whose bit was set, each word read and cleared by one atomic exchange (what a
        migration's dirty-sync does)."""
        words = np.zeros(self.size // WORD, dtype=np.uint64)
        take_words(self.bitmap, words)
        return np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little"))

    def clear(self) -> None:
        """Clear every bit (atomically, as :meth:`take`)."""
        self.take()

    @staticmethod
    def pages_of(gpa: int, length: int) -> range:
        """The log pages guest-physical [gpa, gpa+length) touches."""
        if length <= 0:
            return range(0)
        return range(gpa >> LOG_PAGE_SHIFT, ((gpa + length - 1) >> LOG_PAGE_SHIFT) + 1)

    def close(self) -> None:
        self.bitmap = self.file = None  # type: ignore[assignment]
        try:
            self.mm.close()
        except BufferError:  # a view of the bitmap still alive (a test's); the mapping goes with it
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@kernel
def take_words(bitmap, out):
    """Read and clear each 64-bit word of ``bitmap`` (uint8, a multiple of 8 bytes, 8-aligned) into ``out``:
    a plain load first, the atomic exchange only for words with a bit set."""
    for i in range(out.shape[0]):
        if ld64(bitmap, WORD * i) != 0:
            out[i] = xchg64(bitmap, WORD * i, np.uint64(0))
        else:
            out[i] = 0


def warm_up() -> None:
    """Compile (or load from the cache) the log reader."""
    take_words(np.zeros(WORD, dtype=np.uint8), np.zeros(1, dtype=np.uint64))
